"""The peers' formulations (the authors' PyTorch code paths), written once against an array
module shim so the same code runs on numpy (CPU, tested against the crate's reference in
test_peers.py) and on torch (GPU, timed beside headwise's kernels by peers.py).

What each function computes is SPEC.md's definition (the crate's reference); where the
authors' code differs in a way that only changes cost (repeat_kv to all query heads,
torch.topk's arbitrary tie order, model-dtype matmuls) the torch path keeps the authors' way.

Shapes follow the authors: K/V `[b, hk, q, d]`, the window's queries `[b, h, w, d]`,
`h = hk * g`. Every function takes the backend `B` first.
"""

import math
import struct


class Numpy:
    """numpy backend: float64 accumulation, stable sorts (ties: lower position first)."""

    name = "numpy"

    def __init__(self):
        import numpy as np

        self.np = np
        self.float32 = np.float32

    def asarray(self, x, dtype=None):
        return self.np.asarray(x, dtype=dtype or self.np.float64)

    def acc(self, x):
        return x.astype(self.np.float64)

    def swap_last(self, x):
        return self.np.swapaxes(x, -1, -2)

    def amax(self, x, axis, keepdims=False):
        return self.np.max(x, axis=axis, keepdims=keepdims)

    def sum(self, x, axis, keepdims=False):
        return self.np.sum(x, axis=axis, keepdims=keepdims)

    def exp(self, x):
        return self.np.exp(x)

    def norm(self, x):
        return self.np.sqrt(self.np.sum(x * x, axis=-1, keepdims=True))

    def arange(self, n):
        return self.np.arange(n)

    def where(self, c, a, b):
        return self.np.where(c, a, b)


    def concat(self, xs, axis):
        return self.np.concatenate(xs, axis=axis)

    def expand(self, x, shape):
        return self.np.broadcast_to(x, shape).copy()

    def zeros_like_rows(self, x, rows):
        return self.np.zeros((rows,) + x.shape[1:], dtype=x.dtype)

    def repeat_heads(self, x, g):
        return self.np.repeat(x, g, axis=1)

    def pad_last(self, x, r, value):
        width = [(0, 0)] * (x.ndim - 1) + [(r, r)]
        return self.np.pad(x, width, constant_values=value)

    def topk_indices(self, x, k):
        """Indices of the k largest along the last axis, best first; equal values: lower index."""
        return self.np.argsort(-x, axis=-1, kind="stable")[..., :k]

    def sort(self, x):
        return self.np.sort(x, axis=-1)

    def take(self, x, idx, axis):
        return self.np.take_along_axis(x, idx, axis=axis)

    def round_f32(self, x):
        return self.np.round(x.astype(self.np.float32))  # half to even, as torch.round

    def to_f32(self, x):
        return x.astype(self.np.float32)

    def sdpa(self, q, k, v, mask, scale):
        """Decode attention, q `[b, h, 1, d]`, k/v `[b, hk, L, d]`, mask `[b, h, 1, L]` (True: attend)."""
        g = q.shape[1] // k.shape[1]
        k, v = self.repeat_heads(k, g), self.repeat_heads(v, g)
        logits = self.np.where(mask, (q @ self.swap_last(k)) * scale, -self.np.inf)
        return softmax(self, logits, -1) @ v

    def sync(self):
        pass


class Torch:
    """torch backend (the authors' ops): model-dtype matmuls, f32 softmax, torch.topk."""

    name = "torch"

    def __init__(self, device="cuda", dtype="bfloat16", acc="float32"):
        import torch

        self.torch = torch
        self.device = device
        self.dtype = getattr(torch, dtype)
        self.acc_dtype = getattr(torch, acc)  # float64 only to check the torch path on the CPU
        self.float32 = torch.float32

    def asarray(self, x, dtype=None):
        return self.torch.as_tensor(x, dtype=dtype or self.dtype, device=self.device)

    def acc(self, x):
        return x.to(self.acc_dtype)

    def swap_last(self, x):
        return x.transpose(-1, -2)

    def amax(self, x, axis, keepdims=False):
        return self.torch.amax(x, dim=axis, keepdim=keepdims)

    def sum(self, x, axis, keepdims=False):
        return self.torch.sum(x, dim=axis, keepdim=keepdims)

    def exp(self, x):
        return self.torch.exp(x)

    def norm(self, x):
        return x.norm(dim=-1, keepdim=True)

    def arange(self, n):
        return self.torch.arange(n, device=self.device)

    def where(self, c, a, b):
        return self.torch.where(c, a, b)


    def concat(self, xs, axis):
        return self.torch.cat(xs, dim=axis)

    def expand(self, x, shape):
        return x.expand(shape)

    def zeros_like_rows(self, x, rows):
        return self.torch.zeros((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)

    def repeat_heads(self, x, g):
        # transformers' repeat_kv: expand + reshape (a real copy), as SnapKV/PyramidKV/HeadKV do.
        b, hk, n, d = x.shape
        return x[:, :, None].expand(b, hk, g, n, d).reshape(b, hk * g, n, d)

    def pad_last(self, x, r, value):
        return self.torch.nn.functional.pad(x, (r, r), value=value)

    def topk_indices(self, x, k):
        return self.torch.topk(x, k, dim=-1).indices

    def sort(self, x):
        return self.torch.sort(x, dim=-1).values

    def take(self, x, idx, axis):
        return self.torch.gather(x, axis, idx)

    def round_f32(self, x):
        return self.torch.round(x.float())

    def to_f32(self, x):
        return x.float()

    def sdpa(self, q, k, v, mask, scale):
        f = self.torch.nn.functional.scaled_dot_product_attention
        return f(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def sync(self):
        self.torch.cuda.synchronize()


def softmax(B, x, axis):
    e = B.exp(x - B.amax(x, axis, keepdims=True))
    return e / B.sum(e, axis, keepdims=True)


def pool1d(B, x, kernel, kind):
    """max_pool1d / avg_pool1d along the last axis, stride 1, padding kernel // 2 (avg counts
    the zero padding: edge scores divided by kernel; max padding never wins)."""
    if kernel == 1:
        return x
    r, n = kernel // 2, x.shape[-1]
    padded = B.pad_last(x, r, -math.inf if kind == "max" else 0.0)
    acc = padded[..., 0:n]
    for s in range(1, kernel):
        win = padded[..., s : s + n]
        acc = B.where(win > acc, win, acc) if kind == "max" else acc + win
    return acc if kind == "max" else acc / kernel


def snapkv_scores(B, k, queries, window, kernel, pool, gqa="mean", per_query_head=False):
    """SnapKV / PyramidKV observation-window scores of the `n = q - window` prefix tokens.

    k `[b, hk, q, d]`, queries `[b, h, window, d]`. Logits of the window queries against the
    repeated keys (repeat_kv), causal mask inside the window, softmax over the row in f32,
    mean over the window queries, then (KV-head granularity) `gqa` over each group, then
    pooling. Returns `[b, hk, n]`, or `[b, h, n]` with `per_query_head` (the papers' mode).
    """
    b, hk, q, d = k.shape
    h = queries.shape[1]
    g, n = h // hk, q - window
    logits = B.acc(queries @ B.swap_last(B.repeat_heads(k, g))) / math.sqrt(d)
    i = B.arange(window)
    # Window query i sees window keys 0..=i; every prefix key is visible.
    visible = B.concat([B.expand(i[:, None] >= 0, (window, n)), i[None, :] <= i[:, None]], 1)
    logits = B.where(visible, logits, -math.inf)
    probs = softmax(B, logits, -1)[..., :n]
    scores = B.sum(probs, -2) / window  # [b, h, n]
    if not per_query_head:
        grouped = scores.reshape(b, hk, g, n)
        scores = B.sum(grouped, 2) / g if gqa == "mean" else B.amax(grouped, 2)
    return pool1d(B, scores, kernel, pool)


def select_positions(B, scores, window, budget):
    """Kept positions per row `[..., budget]` in position order: the top `budget - window`
    prefix scores and the `window` window positions; a budget of at least `q` keeps all."""
    n = scores.shape[-1]
    lead = tuple(scores.shape[:-1])
    every = B.expand(B.arange(n + window), lead + (n + window,))
    if budget >= n + window:
        return every
    top = B.sort(B.topk_indices(scores, budget - window))
    return B.concat([top, every[..., n:]], -1)


def gather_rows(B, x, idx):
    """The kept rows: x `[b, hk, q, d]`, idx `[b, hk, kept]` -> `[b, hk, kept, d]`."""
    d = x.shape[-1]
    full_idx = idx[..., None] + 0 * B.arange(d)
    return B.take(x, full_idx, -2)


def snapkv_compress(B, k, v, queries, budget, window=32, kernel=7, pool="max", per_query_head=True):
    """The authors' SnapKV/PyramidKV prefill step: scores, top-k, gather of K and V (with
    `per_query_head`, the papers' mode, K/V are the repeated `[b, h, q, d]` copies)."""
    g = queries.shape[1] // k.shape[1]
    scores = snapkv_scores(B, k, queries, window, kernel, pool, per_query_head=per_query_head)
    idx = select_positions(B, scores, window, budget)
    if per_query_head:
        k, v = B.repeat_heads(k, g), B.repeat_heads(v, g)
    return gather_rows(B, k, idx), gather_rows(B, v, idx)


def _f32(x):
    """x rounded to the nearest f32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def adakv_budgets(B, scores, window, base, floor_alpha):
    """AdaKV's per-head budgets (window included) from one sequence's pooled scores `[hk, n]`:
    the flattened top `hk * (base - window)` across heads counted per head, then
    `round(c * (1 - alpha) + floor(alpha * (base - window)))` in f32 (half to even, as
    torch.round), capped at `n`."""
    hk, n = scores.shape
    bp = base - window
    flat_idx = B.topk_indices(scores.reshape(hk * n), min(hk * bp, hk * n))
    counts = B.sum(B.to_f32((flat_idx // n)[:, None] == B.arange(hk)[None, :]), 0)
    alpha = _f32(floor_alpha)
    x = B.round_f32(counts * _f32(1.0 - alpha) + _f32(math.floor(alpha * bp)))
    x = B.where(x > 0, x, 0 * x)
    return B.where(x < n, x, 0 * x + n) + window


def adakv_select(B, scores, window, base, floor_alpha):
    """Per-head kept positions (a list, position order) under AdaKV's budgets: each head's
    top scores of the largest budget, cut to its own budget (the authors' mask over a shared
    top-k), plus the window."""
    hk, n = scores.shape
    budgets = adakv_budgets(B, scores, window, base, floor_alpha)
    most = int(B.amax(budgets, 0)) - window
    top = B.topk_indices(scores, most)
    kept = []
    for h in range(hk):
        c = int(budgets[h]) - window
        kept.append(B.concat([B.sort(top[h, :c]), B.arange(n + window)[n:]], 0))
    return budgets, kept


def adakv_flat_gather(B, x, top, budgets, window):
    """AdaKV's flattened cache from a shared top-k: x `[hk, q, d]`, top `[hk, most]` -> the
    kept rows of every head, back to back (boolean mask over the shared top-k)."""
    hk, q, d = x.shape
    mask = B.arange(top.shape[-1])[None, :] < (budgets[:, None] - window)
    rows = gather_rows(B, x[None], top[None])[0]
    return rows[mask]


def adakv_compress(B, k, v, queries, base, floor_alpha=0.2, window=32, kernel=7):
    """The AdaKV prefill step for one sequence (batch 1, as the authors): KV-head scores (GQA
    mean), budgets from the flattened top-k, per-head top-k of the largest budget cut by a
    mask, and the kept K/V rows of every head back to back in one flat buffer."""
    scores = snapkv_scores(B, k, queries, window, kernel, "max")[0]  # [hk, n]
    budgets = adakv_budgets(B, scores, window, base, floor_alpha)
    top = B.topk_indices(scores, int(B.amax(budgets, 0)) - window)
    return adakv_flat_gather(B, k[0], top, budgets, window), adakv_flat_gather(B, v[0], top, budgets, window)


def rkv_importance(B, k, queries, alpha, kernel):
    """R-KV importance of the `n = len - alpha` candidates. k `[s, len, d]`, queries
    `[s, g, nq, d]`: max over the group of the raw logits, softmax over the candidates, mean
    over the queries, max-pool."""
    s, length, d = k.shape
    n = length - alpha
    logits = B.acc(queries @ B.swap_last(k[:, None, :n])) / math.sqrt(d)  # [s, g, nq, n]
    probs = softmax(B, B.amax(logits, 1), -1)  # [s, nq, n]
    return pool1d(B, B.sum(probs, 1) / queries.shape[2], kernel, "max")


def rkv_redundancy(B, k, fidelity_quirk=False, threshold=0.5, eps=1e-8):
    """R-KV redundancy of all `len` keys `[s, len, d]` (`cal_similarity`): cosine similarity,
    diagonal and each row's most recent similar token zeroed, column mean, softmax."""
    kf = B.acc(k)
    kn = kf / (B.norm(kf) + eps)
    sim = kn @ B.swap_last(kn)  # [s, len, len]
    length = k.shape[1]
    cols = B.arange(length)
    sim = B.where(cols[:, None] == cols[None, :], 0 * sim, sim)
    last = B.amax(B.where(sim > threshold, 0 * sim + cols, 0 * sim - 1), -1)  # [s, len]
    if fidelity_quirk:
        last = B.where(last >= 0, last, 0 * last)
    sim = B.where(cols == last[..., None], 0 * sim, sim)
    return softmax(B, B.sum(sim, -2) / length, -1)


def rkv_scores(B, k, queries, alpha, kernel, lam, fidelity_quirk=False):
    n = k.shape[1] - alpha
    a = rkv_importance(B, k, queries, alpha, kernel)
    r = rkv_redundancy(B, k, fidelity_quirk)[:, :n]
    return lam * a - (1 - lam) * r


def rkv_evict(B, k, v, queries, budget, alpha=8, kernel=7, lam=0.07):
    """One R-KV eviction of every segment `[s, len, d]`: scores, top-k, gather."""
    scores = rkv_scores(B, k, queries, alpha, kernel, lam)
    idx = select_positions(B, scores, alpha, budget)
    return gather_rows(B, k[None], idx[None])[0], gather_rows(B, v[None], idx[None])[0]


def append_copy(B, cache, new):
    """AdaKV/HeadKV's append: a new buffer and a copy of the whole cache every decode step.
    cache `[rows, len, d]` (one row per sequence x KV head), new `[rows, d]`."""
    return B.concat([cache, new[:, None]], 1)


def pad_ragged(B, seqs):
    """Ragged per-head rows (a list of `[len_i, d]`) padded to the longest: `[heads, L, d]`
    and the mask `[heads, L]` (True: a real token)."""
    longest = max(x.shape[0] for x in seqs)
    rows = [B.concat([x, B.zeros_like_rows(x, longest - x.shape[0])], 0)[None] for x in seqs]
    lens = B.asarray([x.shape[0] for x in seqs])
    return B.concat(rows, 0), B.arange(longest)[None, :] < lens[:, None]


def decode_sdpa(B, q, k_padded, v_padded, mask, scale):
    """Decode attention over the kept tokens padded to the longest head: q `[b, h, d]`,
    k/v `[b, hk, L, d]`, mask `[b, hk, L]`; `scaled_dot_product_attention` on torch."""
    b, h, d = q.shape
    g = h // k_padded.shape[1]
    m = B.repeat_heads(mask[..., None], g)[..., 0][:, :, None, :]
    return B.sdpa(q[:, :, None, :], k_padded, v_padded, m, scale)[:, :, 0, :]
