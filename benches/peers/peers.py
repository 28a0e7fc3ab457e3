#!/usr/bin/env python3
"""Times the peers' formulations (formulations.py) at the shapes headwise's benches ran, and
prints each ratio peer / headwise.

    python3 benches/peers/peers.py --log BENCH_LOG [--backend torch|numpy] [--budget-s 60]

BENCH_LOG holds the benches' `FLOOR kernel=... shape=... measured_us=...` lines
(benches/support/mod.rs); every one with a peer is timed once, in log order, until the time
budget is spent. One line per case, on stdout:

    PEER kernel=K shape=S peer=P backend=B peer_us=X headwise_us=Y ratio=X/Y

(`error=...` instead of a time when the peer fails, e.g. runs out of memory). Peers:
- select snapkv / pyramidkv_l0: SnapKV/PyramidKV as the authors run it: repeat_kv to all query
  heads, window scoring, max-pool 7, torch.topk, gather of the repeated K/V (per-head budget =
  the bench's kept rows / KV heads);
- select adakv: AdaKV, batch 1: KV-head scores, flattened top-k across heads, budgets, masked
  flat gather;
- append: the per-step whole-cache copy AdaKV/HeadKV do on append (torch.cat);
- attention: scaled_dot_product_attention decode over the heads' tokens padded to the longest;
- redundancy: R-KV's scoring (importance + cosine redundancy) + top-k + gather, all segments.
select headkv_l0 has no peer here. Inputs are random model-dtype tensors; GPU times are the
median of CUDA-event-timed repetitions. `--backend numpy --scale 64` runs the same code on the
CPU at shapes divided by 64 (the dry pass: CPU numbers, not GPU ones).
"""

import argparse
import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import formulations as F  # noqa: E402

FLOOR_RE = re.compile(r"^FLOOR (.*)$")


def parse_floor_lines(text):
    """Each `FLOOR k=v ...` line as a dict, first occurrence of each (kernel, shape) only."""
    out, seen = [], set()
    for line in text.splitlines():
        m = FLOOR_RE.match(line.strip())
        if not m:
            continue
        rec = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv)
        key = (rec.get("kernel"), rec.get("shape"))
        if None in key or key in seen:
            continue
        seen.add(key)
        out.append(rec)
    return out


class Timer:
    def __init__(self, B):
        self.B = B

    def median_us(self, fn, min_reps=3, max_reps=20, target_s=0.2):
        fn()  # warm-up (allocator, kernels)
        self.B.sync()
        times = []
        start = time.perf_counter()
        while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < target_s):
            if self.B.name == "torch":
                torch = self.B.torch
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)


def randn(B, shape):
    if B.name == "torch":
        return B.torch.randn(shape, device=B.device, dtype=B.dtype)
    import numpy as np

    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def n(rec, key, scale=1, lo=1):
    return max(lo, int(rec[key]) // scale)


def peer_case(B, rec, scale):
    """(peer name, zero-argument function to time) for one FLOOR record, or None."""
    kernel = rec["kernel"]
    if kernel == "select":
        policy, d = rec.get("policy"), int(rec["head_dim"])
        hk, g, w = int(rec["kv_heads"]), int(rec["group"]), int(rec["window"])
        q = n(rec, "q", scale, 2 * w + 8)
        k, v = randn(B, (1, hk, q, d)), randn(B, (1, hk, q, d))
        queries = randn(B, (1, hk * g, w, d))
        if policy in ("snapkv", "pyramidkv_l0"):
            budget = max(w + 1, min(q, int(rec["kept"]) // hk // scale))
            return "snapkv_repeat_kv", lambda: F.snapkv_compress(B, k, v, queries, budget, window=w)
        if policy == "adakv":
            base = max(w + 1, min(q, int(rec["budget"]) // scale))
            return "adakv_flat", lambda: F.adakv_compress(B, k, v, queries, base, 0.2, window=w)
        return None
    if kernel == "append":
        rows, d = n(rec, "batch") * int(rec["kv_heads"]), int(rec["head_dim"])
        ctx = n(rec, "ctx", scale)
        ck, cv, new = randn(B, (rows, ctx, d)), randn(B, (rows, ctx, d)), randn(B, (rows, d))
        return "adakv_append_copy", lambda: (F.append_copy(B, ck, new), F.append_copy(B, cv, new))
    if kernel == "attention":
        b, hk, g, d = n(rec, "batch"), int(rec["kv_heads"]), int(rec["group"]), int(rec["head_dim"])
        ctx, streaming = n(rec, "ctx", scale), int(rec["streaming_heads"])
        short = min(ctx, int(rec["sink"]) + int(rec["window"]))
        k, v = randn(B, (b, hk, ctx, d)), randn(B, (b, hk, ctx, d))
        q = randn(B, (b, hk * g, d))
        heads = B.arange(hk)[None, :, None]
        lens = B.where(heads < streaming, 0 * heads + short, 0 * heads + ctx)
        mask = B.arange(ctx)[None, None, :] < lens
        mask = B.expand(mask, (b, hk, ctx))
        return "sdpa_padded", lambda: F.decode_sdpa(B, q, k, v, mask, 1.0 / math.sqrt(d))
    if kernel == "redundancy":
        segs = n(rec, "batch") * int(rec["kv_heads"])
        g, d, alpha = int(rec["group"]), int(rec["head_dim"]), int(rec["alpha"])
        budget = max(alpha + 1, int(rec["budget"]) // scale)
        length = budget + max(1, (int(rec["len"]) - int(rec["budget"])) // scale)
        k, v = randn(B, (segs, length, d)), randn(B, (segs, length, d))
        queries = randn(B, (segs, g, alpha, d))
        return "rkv_torch_ops", lambda: F.rkv_evict(B, k, v, queries, budget, alpha=alpha)
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", required=True, help="file with the benches' FLOOR lines")
    ap.add_argument("--backend", choices=["torch", "numpy"], default="torch")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting cases after this")
    ap.add_argument("--scale", type=int, default=1, help="divide token counts by this (dry runs)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    with open(args.log, errors="replace") as f:
        recs = parse_floor_lines(f.read())
    if not recs:
        print("PEERS: no FLOOR lines in", args.log, "- nothing to compare")
        return 1
    try:
        B = F.Torch() if args.backend == "torch" else F.Numpy()
    except Exception as e:  # no torch, or no CUDA
        print(f"PEERS: backend {args.backend} unavailable: {e}")
        return 1
    if B.name == "torch" and not B.torch.cuda.is_available():
        print("PEERS: torch has no CUDA device")
        return 1
    timer = Timer(B)
    failures = 0
    for rec in recs:
        head = f"kernel={rec['kernel']} shape={rec['shape']}"
        if time.monotonic() - start > args.budget_s:
            print(f"PEER {head} backend={args.backend} skipped=budget")
            continue
        try:
            case = peer_case(B, rec, args.scale)
            if case is None:
                continue
            name, fn = case
            peer_us = timer.median_us(fn)
        except Exception as e:  # OOM at the largest shapes, a missing op in an old torch
            failures += 1
            msg = re.sub(r"\s+", "_", str(e).splitlines()[0] if str(e) else type(e).__name__)[:120]
            print(f"PEER {head} backend={B.name} error={msg}", flush=True)
            if B.name == "torch":
                B.torch.cuda.empty_cache()
            continue
        ours = float(rec["measured_us"])
        ratio = peer_us / ours if ours > 0 else float("nan")
        print(
            f"PEER {head} peer={name} backend={B.name} scale={args.scale} peer_us={peer_us:.3f} "
            f"headwise_us={ours:.3f} ratio={ratio:.3f}",
            flush=True,
        )
        fn = case = None
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
