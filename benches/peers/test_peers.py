"""The peers' formulations (formulations.py, numpy backend) against the crate's CPU reference.

Fixture: `cargo run --example peer_fixtures -- target/peer_fixtures.json` (the path can be set
with HEADWISE_PEER_FIXTURES; when that variable is set the fixture must exist).
Run: `python3 -m unittest benches/peers/test_peers.py` from the repository root.

Where torch is installed (not in CI; the GPU machine has it) the same checks also run on the
torch backend (CPU, float64), and every peer case of peers.py runs once in bf16 on the CPU.

Selections must match the reference's kept positions exactly (ties: lower position, SPEC.md
section 7); a disagreement is excused only when both tokens' reference scores lie within
TIE_TOL of the k-th score. Floats: relative tolerance FLOAT_TOL (both sides are f64 over the
same f16-exact inputs, only the summation order differs).
"""

import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(os.path.dirname(HERE))

import numpy as np  # noqa: E402

import formulations as F  # noqa: E402

FLOAT_TOL = 1e-9
TIE_TOL = 1e-12


def load_fixture():
    path = os.environ.get("HEADWISE_PEER_FIXTURES") or os.path.join(ROOT, "target", "peer_fixtures.json")
    if not os.path.exists(path):
        if os.environ.get("HEADWISE_PEER_FIXTURES"):
            raise FileNotFoundError(path)
        raise unittest.SkipTest(f"no fixture at {path}: cargo run --example peer_fixtures -- {path}")
    with open(path) as f:
        return json.load(f)


class PeersMatchReference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fx = load_fixture()
        cls.B = F.Numpy()

    def arr(self, x):
        return np.asarray(x, dtype=np.float64)

    def assert_close(self, got, want, what):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        self.assertEqual(got.shape, want.shape, what)
        scale = max(np.max(np.abs(want)), 1e-300) if want.size else 1.0
        err = np.max(np.abs(got - want)) / scale if want.size else 0.0
        self.assertLessEqual(err, FLOAT_TOL, f"{what}: max relative error {err:.3e}")

    def assert_same_selection(self, got, want, scores, window, what):
        """Exact kept set, except near-ties at the cut (SPEC section 7)."""
        got, want = [int(x) for x in got], [int(x) for x in want]
        self.assertEqual(got, sorted(got), f"{what}: not in position order")
        self.assertEqual(len(got), len(want), f"{what}: kept count")
        differ = set(got) ^ set(want)
        if not differ:
            return
        n = len(scores)
        keep = len(want) - window
        kth = sorted(scores, reverse=True)[keep - 1]
        for t in differ:
            self.assertLess(t, n, f"{what}: window token {t} differs")
            self.assertLessEqual(abs(scores[t] - kth), TIE_TOL, f"{what}: token {t} is no near-tie")

    def test_fixture_covers_every_formulation(self):
        for key in ("snapkv", "adakv", "rkv", "attention"):
            self.assertGreater(len(self.fx[key]), 0, key)

    def test_snapkv_scores_and_selection(self):
        B = self.B
        for c in self.fx["snapkv"]:
            d, w, g, q = c["head_dim"], c["window"], c["group"], c["q"]
            k = self.arr(c["k"]).reshape(1, 1, q, d)
            queries = self.arr(c["queries"]).reshape(1, g, w, d)
            scores = F.snapkv_scores(B, k, queries, w, c["kernel"], c["pool"], c["gqa"])[0, 0]
            self.assert_close(scores, c["scores"], f"snapkv {c['name']} scores")
            kept = F.select_positions(B, scores, w, c["budget"])
            self.assert_same_selection(kept, c["kept"], c["scores"], w, f"snapkv {c['name']} kept")

    def test_snapkv_tied_case_keeps_lowest_positions(self):
        c = next(c for c in self.fx["snapkv"] if c["name"] == "all_tied")
        self.assertEqual(len(set(c["scores"])), 1)
        keep = c["budget"] - c["window"]
        n = c["q"] - c["window"]
        self.assertEqual(c["kept"], list(range(keep)) + list(range(n, n + c["window"])))

    def test_snapkv_per_query_head_is_group_of_one(self):
        # The papers' mode (repeat_kv, one selection per query head) equals the KV-head mode
        # with G = 1 on each query head.
        B = self.B
        c = self.fx["snapkv"][0]
        d, w, g, q = c["head_dim"], c["window"], c["group"], c["q"]
        k = self.arr(c["k"]).reshape(1, 1, q, d)
        queries = self.arr(c["queries"]).reshape(1, g, w, d)
        per_head = F.snapkv_scores(B, k, queries, w, c["kernel"], c["pool"], per_query_head=True)
        for h in range(g):
            one = F.snapkv_scores(B, k, queries[:, h : h + 1], w, c["kernel"], c["pool"])
            self.assert_close(per_head[0, h], one[0, 0], f"query head {h}")

    def test_adakv_budgets_and_selection(self):
        B = self.B
        for i, c in enumerate(self.fx["adakv"]):
            d, w, g, q, hk = c["head_dim"], c["window"], c["group"], c["q"], c["kv_heads"]
            k = self.arr(c["k"]).reshape(1, hk, q, d)
            queries = self.arr(c["queries"]).reshape(1, hk * g, w, d)
            scores = F.snapkv_scores(B, k, queries, w, c["kernel"], c["pool"], c["gqa"])[0]
            self.assert_close(scores, c["scores"], f"adakv {i} scores")
            budgets, kept = F.adakv_select(B, scores, w, c["base"], c["floor_alpha"])
            self.assertEqual([int(x) for x in budgets], c["budgets"], f"adakv {i} budgets")
            for h in range(hk):
                self.assert_same_selection(kept[h], c["kept"][h], c["scores"][h], w, f"adakv {i} head {h}")
            # The flattened gather holds exactly those rows, head after head.
            flat_k, _ = F.adakv_compress(B, k, k, queries, c["base"], c["floor_alpha"], w, c["kernel"])
            prefix = [int(t) for h in range(hk) for t in c["kept"][h][: c["budgets"][h] - w]]
            self.assertEqual(flat_k.shape[0], len(prefix))

    def test_rkv_importance_redundancy_scores_and_selection(self):
        B = self.B
        for i, c in enumerate(self.fx["rkv"]):
            n_len, d, g, nq, alpha = c["len"], c["head_dim"], c["group"], c["nq"], c["alpha"]
            k = self.arr(c["k"]).reshape(1, n_len, d)
            queries = self.arr(c["queries"]).reshape(1, g, nq, d)
            imp = F.rkv_importance(B, k, queries, alpha, c["kernel"])[0]
            self.assert_close(imp, c["importance"], f"rkv {i} importance")
            red = F.rkv_redundancy(B, k, c["fidelity_quirk"])[0]
            self.assert_close(red, c["redundancy"], f"rkv {i} redundancy")
            scores = F.rkv_scores(B, k, queries, alpha, c["kernel"], c["lambda"], c["fidelity_quirk"])[0]
            self.assert_close(scores, c["scores"], f"rkv {i} scores")
            kept = F.select_positions(B, scores, alpha, c["budget"])
            self.assert_same_selection(kept, c["kept"], c["scores"], alpha, f"rkv {i} kept")

    def test_decode_sdpa_over_padded_heads(self):
        B = self.B
        for i, c in enumerate(self.fx["attention"]):
            d, g, lens = c["head_dim"], c["group"], c["lens"]
            ks = [self.arr(x).reshape(n, d) for x, n in zip(c["k"], lens)]
            vs = [self.arr(x).reshape(n, d) for x, n in zip(c["v"], lens)]
            kp, mask = F.pad_ragged(B, ks)
            vp, _ = F.pad_ragged(B, vs)
            q = self.arr(c["q"]).reshape(1, len(lens) * g, d)
            out = F.decode_sdpa(B, q, kp[None], vp[None], mask[None], c["scale"])
            self.assert_close(out.reshape(-1), c["out"], f"attention {i} out")

    def test_append_copy_keeps_every_head_in_order(self):
        B = self.B
        cache = np.arange(3 * 4 * 2, dtype=np.float64).reshape(3, 4, 2)
        new = -np.arange(3 * 2, dtype=np.float64).reshape(3, 2)
        out = F.append_copy(B, cache, new)
        self.assertEqual(out.shape, (3, 5, 2))
        np.testing.assert_array_equal(out[:, :4], cache)
        np.testing.assert_array_equal(out[:, 4], new)


class TorchPathMatchesReference(PeersMatchReference):
    """The same checks on the torch backend (CPU, float64 throughout) where torch is
    installed (the GPU machine; not CI): the code path peers.py times. torch.topk breaks ties
    in no fixed order, so only near-tie disagreements are excused, as SPEC 7 allows."""

    @classmethod
    def setUpClass(cls):
        try:
            import torch
        except ImportError:
            raise unittest.SkipTest("torch is not installed")
        cls.fx = load_fixture()
        cls.B = F.Torch(device="cpu", dtype="float64", acc="float64")

    def arr(self, x):
        return self.B.torch.tensor(x, dtype=self.B.torch.float64)

    def test_snapkv_tied_case_keeps_lowest_positions(self):
        self.skipTest("torch.topk's tie order is not fixed (the authors' behaviour)")

    def test_append_copy_keeps_every_head_in_order(self):
        self.skipTest("backend-independent")


FAKE_FLOORS = """\
FLOOR kernel=select shape=snapkv_q8k_b1024 measured_us=100.0 floor_us=50.0 ratio=2.0 basis=bytes/copy_bw policy=snapkv q=8192 budget=1024 kept=8192 batch=1 kv_heads=8 group=4 head_dim=128 window=32 bytes=1
FLOOR kernel=select shape=pyramidkv_l0_q8k_b1024 measured_us=100.0 floor_us=50.0 ratio=2.0 basis=bytes/copy_bw policy=pyramidkv_l0 q=8192 budget=1024 kept=16000 batch=1 kv_heads=8 group=4 head_dim=128 window=32 bytes=1
FLOOR kernel=select shape=headkv_l0_q8k_b1024 measured_us=100.0 floor_us=50.0 ratio=2.0 basis=bytes/copy_bw policy=headkv_l0 q=8192 budget=1024 kept=8192 batch=1 kv_heads=8 group=4 head_dim=128 window=32 bytes=1
FLOOR kernel=select shape=adakv_q8k_b1024 measured_us=100.0 floor_us=50.0 ratio=2.0 basis=bytes/copy_bw policy=adakv q=8192 budget=1024 kept=8192 batch=1 kv_heads=8 group=4 head_dim=128 window=32 bytes=1
FLOOR kernel=append shape=batch1_ctx32k measured_us=5 floor_us=1 ratio=5 basis=bytes/copy_bw batch=1 ctx=32768 kv_heads=8 head_dim=128 bytes=1
FLOOR kernel=attention shape=rlkv_s0.4_ctx32k_b16 measured_us=5 floor_us=1 ratio=5 basis=bytes/copy_bw batch=16 ctx=32768 streaming_heads=3 sink=16 window=64 kv_heads=8 group=4 head_dim=128 bytes=1
FLOOR kernel=redundancy shape=qwen7b_r1_b1_budget512 measured_us=5 floor_us=1 ratio=5 basis=flops/datasheet_bf16 model=qwen7b_r1 batch=1 budget=512 len=640 kv_heads=4 group=7 head_dim=128 alpha=8 flops=1 bytes=1
FLOOR kernel=select shape=snapkv_q8k_b1024 measured_us=1.0 floor_us=1.0 ratio=1.0 basis=dup policy=snapkv q=8192 budget=1024 kept=8192 batch=1 kv_heads=8 group=4 head_dim=128 window=32 bytes=1
"""


class PeersScript(unittest.TestCase):
    """peers.py end to end on the numpy backend at shapes / 256: every kernel's peer case
    (the code the GPU runs with torch) builds and runs, and each FLOOR line gets one PEER."""

    def test_every_bench_kernel_gets_its_peer(self):
        import contextlib
        import io
        import tempfile

        import peers

        with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
            f.write(FAKE_FLOORS + "criterion noise\nFLOOR broken\n")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                rc = peers.main(["--log", f.name, "--backend", "numpy", "--scale", "256", "--budget-s", "60"])
        finally:
            os.unlink(f.name)
        lines = [line for line in out.getvalue().splitlines() if line.startswith("PEER ")]
        self.assertEqual(rc, 0, out.getvalue())
        got = {(r["shape"], r["peer"]) for r in (dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines)}
        self.assertEqual(got, {
            ("snapkv_q8k_b1024", "snapkv_repeat_kv"), ("pyramidkv_l0_q8k_b1024", "snapkv_repeat_kv"),
            ("adakv_q8k_b1024", "adakv_flat"), ("batch1_ctx32k", "adakv_append_copy"),
            ("rlkv_s0.4_ctx32k_b16", "sdpa_padded"), ("qwen7b_r1_b1_budget512", "rkv_torch_ops"),
        })
        # The first FLOOR line of a shape is the one compared with.
        snap = next(line for line in lines if "shape=snapkv_q8k_b1024" in line)
        self.assertIn("headwise_us=100.000", snap)

    def test_torch_cases_run_in_the_model_dtype(self):
        """Each peer case as the GPU runs it (torch, bf16, f32 softmax), here on the CPU at
        shapes / 256, where torch is installed."""
        try:
            import torch  # noqa: F401
        except ImportError:
            self.skipTest("torch is not installed")
        import peers

        B = F.Torch(device="cpu", dtype="bfloat16")
        names = set()
        for rec in peers.parse_floor_lines(FAKE_FLOORS):
            case = peers.peer_case(B, rec, 256)
            if case is not None:
                name, fn = case
                out = fn()
                first = out[0] if isinstance(out, tuple) else out
                self.assertFalse(bool(first.float().isnan().any()), name)
                names.add(name)
        self.assertEqual(names, {"snapkv_repeat_kv", "adakv_flat", "adakv_append_copy", "sdpa_padded",
                                 "rkv_torch_ops"})

    def test_no_floor_lines_is_an_error(self):
        import contextlib
        import io
        import tempfile

        import peers

        with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
            f.write("select bench: NOT RUN: no GPU\n")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                rc = peers.main(["--log", f.name, "--backend", "numpy"])
        finally:
            os.unlink(f.name)
        self.assertEqual(rc, 1)
        self.assertIn("no FLOOR lines", out.getvalue())


if __name__ == "__main__":
    unittest.main()
