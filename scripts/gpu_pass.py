#!/usr/bin/env python3
"""The GPU pass in one short device call: stages in order, each time-boxed, under one budget.

    python3 scripts/gpu_pass.py run [OUT]     # on the GPU machine, binaries from gpu-bin/
    python3 scripts/gpu_pass.py --dry [OUT]   # fake stages, small budget: tests the logic here

Python 3 standard library only (the GPU machine has Python, PyTorch and no Rust); matplotlib
is used for the plot when importable. Budget: HEADWISE_GPU_BUDGET_S (default 420 s; dry:
HEADWISE_GPU_DRY_BUDGET_S, default 15 s). Each stage runs with timeout min(its cap, budget
left) in a process group of its own (killed whole when the box closes) and ends as one of
`ok`, `failed`, `timed out`, `skipped: budget spent` (under MIN_START_S left) or
`skipped: <reason>` (binary or tool missing). Order:

  0. device: nvidia-smi
  1. tests-quick: the gpu-tests binaries (GPU == CPU reference), all kernels and dtypes,
     HEADWISE_GPU_QUICK=1 shapes
  2. memcheck on one test per kernel; racecheck and synccheck on two
  3. benches, HEADWISE_BENCH_QUICK=1 sizes, criterion --warm-up-time 0.5 --measurement-time 2:
     their FLOOR lines (measured / floor)
  4. peers: benches/peers/peers.py (PyTorch) at the benches' shapes: PEER lines (peer / headwise)
  5. ncu: the first launches of each kernel family, one per kernel (DRAM throughput,
     achieved occupancy, registers, duration)
  6. tests-full: the gpu tests at full shapes, with whatever budget is left

Output (OUT, default $OUT or gpu-out): pass.log (every stage's output), summary.json,
summary.md (written again after every stage, so a killed run still leaves one), plot.png;
never more than MAX_FILES files.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILES = 8
MIN_START_S = 2.0
SECTION_LIMIT = 1 << 20  # bytes of one stage's output kept in pass.log (head + tail)
GPU_TESTS = ("gpu", "capi_gpu")
BENCHES = ("attention", "select", "append", "redundancy")
# One test per kernel family for memcheck; a smaller set for racecheck / synccheck (the
# kernels with shared memory and barriers).
MEMCHECK = (
    "append_matches_reference_on_gpu",
    "attention_matches_reference_on_gpu",
    "select_compress_into_on_gpu",
    "rkv_matches_reference_on_gpu",
    "h2o_matches_reference_on_gpu",
    "attention_chunk_on_gpu",
)
RACE_SYNC = ("select_compress_into_on_gpu", "rkv_matches_reference_on_gpu")
# Kernel family -> (test that launches it, ncu kernel-name regex, launches profiled, box s).
# N = one pass of the family's pipeline, in launch order (src/select/launch.rs: stats, stats merge,
# score, pool, top-k, gather (+ AdaKV when the budgets are AdaKV's); src/redundancy.rs:
# importance, norms, similarity, select; src/attention.rs: the pass, then the merge when the
# planner splits), so the first N matching launches are about one of each kernel.
NCU = {
    "append": ("append_matches_reference_on_gpu", "regex:^hw_append", 1, 10),
    "attention": ("attention_matches_reference_on_gpu", "regex:^hw_attention", 2, 12),
    "select": ("select_compress_into_on_gpu", "regex:^hw_select", 6, 15),
    "redundancy": ("rkv_matches_reference_on_gpu", "regex:^hw_rkv", 4, 11),
}
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes.sum.per_second",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
)


class Stage:
    """One step: `cmd` (argv list) run with `env` added, for at most `cap_s` seconds.
    `skip` (a reason) marks a stage that cannot run here; `prepare` runs just before and may
    rewrite the command (e.g. to point at a file an earlier stage produced); `expect` (a line
    prefix) turns an exit 0 without such a line into `failed` (a bench that measured nothing)."""

    def __init__(self, name, cmd, cap_s, env=None, skip=None, prepare=None, expect=None):
        self.name, self.cmd, self.cap_s = name, cmd, cap_s
        self.env, self.skip, self.prepare, self.expect = env or {}, skip, prepare, expect


def _kill_group(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=2)
            return
        except subprocess.TimeoutExpired:
            continue


def _trim(text):
    if len(text) <= SECTION_LIMIT:
        return text
    head, tail = SECTION_LIMIT // 5, SECTION_LIMIT - SECTION_LIMIT // 5
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[-tail:]}"


def run_stage(stage, timeout_s, log):
    """Runs one stage in its own process group; returns (status, rc, wall_s, output)."""
    env = dict(os.environ, **stage.env)
    with tempfile.TemporaryFile(mode="w+", errors="replace") as buf:
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                stage.cmd, stdout=buf, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
        except OSError as e:
            return "failed", None, 0.0, f"could not start: {e}\n"
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = proc.returncode, "timed out"
        wall = time.monotonic() - t0
        buf.seek(0)
        out = buf.read()
    log.write(_trim(out))
    if not out.endswith("\n"):
        log.write("\n")
    return status, rc, wall, out


FLOOR_RE = re.compile(r"^(FLOOR|PEER) (.*)$", re.M)
TEST_RE = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed", re.M)


def parse_records(text):
    """FLOOR and PEER lines as dicts (key=value fields, plus `line` = FLOOR or PEER)."""
    out = []
    for m in FLOOR_RE.finditer(text):
        rec = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
        rec["line"] = m.group(1)
        out.append(rec)
    return out


def parse_ncu_csv(text):
    """ncu --csv rows -> [{kernel, metric: value...}] (one entry per profiled launch)."""
    rows, header = {}, None
    for line in text.splitlines():
        if not line.startswith('"'):
            continue
        cells = next(__import__("csv").reader([line]))
        if "Metric Name" in cells:
            header = cells
            continue
        if header is None or len(cells) != len(header):
            continue
        r = dict(zip(header, cells))
        key = (r.get("ID"), r.get("Kernel Name"))
        rows.setdefault(key, {"kernel": r.get("Kernel Name", "")})[r["Metric Name"]] = r.get("Metric Value")
    return list(rows.values())


class Pass:
    """The pass: runs the stages under the budget and keeps the summary current."""

    def __init__(self, stages, budget_s, out_dir, dry=False, clock=time.monotonic):
        self.stages, self.budget_s, self.out, self.dry, self.clock = stages, budget_s, out_dir, dry, clock
        self.results, self.records, self.ncu, self.device = [], [], [], None
        self.started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def remaining(self):
        return self.budget_s - (self.clock() - self.t0)

    def run(self):
        os.makedirs(self.out, exist_ok=True)
        self.t0 = self.clock()
        log_path = os.path.join(self.out, "pass.log")
        with open(log_path, "w") as log:
            log.write(f"headwise GPU pass{' (DRY: fake stages)' if self.dry else ''}, {self.started}, "
                      f"budget {self.budget_s:.0f} s\n")
            for st in self.stages:
                left = self.remaining()
                res = {"name": st.name, "cmd": " ".join(st.cmd), "cap_s": st.cap_s}
                if left < MIN_START_S:
                    res.update(status="skipped: budget spent", wall_s=0.0, rc=None)
                elif st.skip:
                    res.update(status=f"skipped: {st.skip}", wall_s=0.0, rc=None)
                else:
                    if st.prepare:
                        st.prepare(self, st)
                        res["cmd"] = " ".join(st.cmd)
                    box = min(st.cap_s, left)
                    log.write(f"\n== {st.name} (box {box:.1f} s): {res['cmd']}\n")
                    log.flush()
                    status, rc, wall, out = run_stage(st, box, log)
                    res.update(status=status, rc=rc, wall_s=round(wall, 2), timeout_s=round(box, 2))
                    if status == "ok" and st.expect and not re.search(f"^{st.expect}", out, re.M):
                        res.update(status="failed", note=f"no {st.expect.strip()} line")
                    try:
                        self.collect(st, out, res)
                    except Exception as e:  # odd output must not cost the rest of the pass
                        res["note"] = f"output not parsed: {e}"
                log.write(f"== {st.name}: {res['status']} ({res['wall_s']:.1f} s)\n")
                log.flush()
                print(f"[gpu-pass] {st.name}: {res['status']} ({res['wall_s']:.1f} s, "
                      f"{max(self.remaining(), 0):.0f} s left)", flush=True)
                self.results.append(res)
                self.write_summary()
        self.write_plot()
        self.check_files()
        return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in self.results) else 1

    def collect(self, st, out, res):
        recs = parse_records(out)
        for r in recs:
            r["stage"] = st.name
        self.records.extend(recs)
        tests = [(int(a), int(b)) for a, b in TEST_RE.findall(out)]
        if tests:
            res["tests_passed"] = sum(a for a, _ in tests)
            res["tests_failed"] = sum(b for _, b in tests)
        if st.name.startswith("ncu"):
            for row in parse_ncu_csv(out):
                row["stage"] = st.name
                self.ncu.append(row)
        if st.name == "device" and out.strip():
            self.device = out.strip().splitlines()[-1]
        res["tail"] = out.splitlines()[-15:]

    def floors(self):
        return [r for r in self.records if r["line"] == "FLOOR"]

    def peers(self):
        return [r for r in self.records if r["line"] == "PEER"]

    def summary(self):
        return {
            "dry": self.dry,
            "note": "DRY RUN: fake stages and fake numbers, no GPU" if self.dry else "GPU pass",
            "started_utc": self.started,
            "budget_s": self.budget_s,
            "spent_s": round(self.clock() - self.t0, 2),
            "device": self.device,
            "stages": self.results,
            "floors": self.floors(),
            "peers": self.peers(),
            "ncu": self.ncu,
        }

    def write_summary(self):
        s = self.summary()
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(s, f, indent=1)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(markdown(s))

    def write_plot(self):
        try:
            write_plot(self.floors(), self.peers(), os.path.join(self.out, "plot.png"), self.dry)
        except ImportError:
            pass
        except Exception as e:  # a plot must never cost the summary
            print(f"[gpu-pass] plot failed: {e}", flush=True)

    def check_files(self):
        files = [f for _, _, fs in os.walk(self.out) for f in fs]
        if len(files) > MAX_FILES:
            raise RuntimeError(f"{len(files)} files in {self.out}, more than {MAX_FILES}")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(s):
    out = [f"# headwise GPU pass{' - DRY RUN (fake stages, fake numbers, no GPU)' if s['dry'] else ''}\n",
           f"Started {s['started_utc']}, budget {s['budget_s']:.0f} s, spent {s['spent_s']:.1f} s. "
           f"Device: {s['device'] or 'unknown'}.\n", "## Stages\n"]
    out.append(_table(["stage", "status", "wall s", "box s", "tests passed/failed", "note"], [
        [r["name"], r["status"], f"{r['wall_s']:.1f}", r.get("timeout_s", "-"),
         f"{r['tests_passed']}/{r['tests_failed']}" if "tests_passed" in r else "-", r.get("note", "")]
        for r in s["stages"]]))
    if s["floors"]:
        out.append("\n## Benches: measured / floor\n")
        out.append(_table(["kernel", "shape", "measured us", "floor us", "ratio", "floor basis"], [
            [r.get("kernel"), r.get("shape"), r.get("measured_us"), r.get("floor_us"), r.get("ratio"),
             r.get("basis", "")] for r in s["floors"]]))
    if s["peers"]:
        out.append("\n## Peers: peer / headwise\n")
        out.append("backend torch: the authors' PyTorch formulation on the same GPU in the same run; numpy: the "
                   "CPU dry path at scaled-down shapes (not GPU numbers).\n")
        out.append(_table(["kernel", "shape", "peer", "backend", "peer us", "headwise us", "ratio"], [
            [r.get("kernel"), r.get("shape"), r.get("peer", "-"), r.get("backend", "-"), r.get("peer_us", "-"),
             r.get("headwise_us", "-"), r.get("ratio", r.get("error", r.get("skipped", "-")))]
            for r in s["peers"]]))
    if s["ncu"]:
        out.append("\n## ncu (first launch of each kernel)\n")
        out.append(_table(["stage", "kernel"] + list(NCU_METRICS), [
            [r["stage"], r["kernel"][:60]] + [r.get(m, "-") for m in NCU_METRICS] for r in s["ncu"]]))
    return "\n".join(out)


X_KEYS = ("q", "ctx", "len")  # the context length of each kernel's shapes
NOT_SERIES = set(X_KEYS) | {"line", "stage", "shape", "measured_us", "floor_us", "ratio", "bytes", "kept",
                            "flops", "peer_us", "headwise_us", "scale", "basis"}


def plot_series(floors, peers):
    """{kernel: {series label: [(context, us)]}}: headwise's measured times and the peers'
    times against the context length, one series per remaining shape parameter set."""
    by_shape = {(r.get("kernel"), r.get("shape")): r for r in floors}
    out = {}
    for r, value, who in [(r, r.get("measured_us"), "headwise") for r in floors] + [
        (by_shape.get((p.get("kernel"), p.get("shape"))), p.get("peer_us"), p.get("peer")) for p in peers
    ]:
        if r is None or value is None or who is None:
            continue
        x = next((r[k] for k in X_KEYS if k in r), None)
        if x is None:
            continue
        params = ",".join(f"{k}={v}" for k, v in sorted(r.items()) if k not in NOT_SERIES and k != "kernel"
                          and k not in ("head_dim", "kv_heads", "group", "window", "alpha", "sink", "model"))
        out.setdefault(r["kernel"], {}).setdefault(f"{who} {params}", []).append((int(x), float(value)))
    return out


def write_plot(floors, peers, path, dry):
    series = plot_series(floors, peers)
    if not series:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
    for ax, (kernel, lines) in zip(axes[0], sorted(series.items())):
        for label, pts in sorted(lines.items()):
            pts.sort()
            style = "-o" if label.startswith("headwise") else "--x"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4)
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="us per call", title=kernel)
        ax.legend(fontsize=6)
    if dry:
        fig.suptitle("DRY RUN: fake numbers")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bin(name):
    return os.path.join(ROOT, "gpu-bin", name)


def _missing_bin(name):
    return None if os.path.exists(_bin(name)) else f"missing gpu-bin/{name} (scripts/gpu_pass.sh build)"


def _missing_tool(tool, binary="test-gpu"):
    if shutil.which(tool) is None:
        return f"{tool} not found"
    return _missing_bin(binary)


def _peers_prepare(p, st):
    """Hands the peers the benches' FLOOR lines through a file outside OUT."""
    f = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    for r in p.floors():
        f.write("FLOOR " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("line", "stage")) + "\n")
    f.close()
    st.cmd = [a if a != "@FLOORS@" else f.name for a in st.cmd]
    st.cmd[st.cmd.index("--budget-s") + 1] = str(max(1, int(min(st.cap_s, p.remaining()) - 5)))


def gpu_stages():
    q = {"HEADWISE_GPU_QUICK": "1"}
    st = [Stage("device", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                5, skip=None if shutil.which("nvidia-smi") else "nvidia-smi not found")]
    # The caps of every stage before tests-full add up to under the default budget (401 of
    # 420 s), so a stage that times out never starves a later one of its whole box.
    caps = {"gpu": 70, "capi_gpu": 20}
    for t in GPU_TESTS:
        st.append(Stage(f"tests-quick {t}", [_bin(f"test-{t}"), "--test-threads=1"], caps[t], q,
                        skip=_missing_bin(f"test-{t}")))
    sanitizer = ["compute-sanitizer", "--error-exitcode", "9"]
    st.append(Stage("memcheck", sanitizer + ["--tool", "memcheck", _bin("test-gpu"), "--test-threads=1", *MEMCHECK],
                    50, q, skip=_missing_tool("compute-sanitizer")))
    for tool in ("racecheck", "synccheck"):
        for t in RACE_SYNC:
            st.append(Stage(f"{tool} {t}", sanitizer + ["--tool", tool, _bin("test-gpu"), "--test-threads=1", t],
                            12, q, skip=_missing_tool("compute-sanitizer")))
    caps = {"attention": 30, "select": 45, "append": 15, "redundancy": 25}
    for b in BENCHES:
        st.append(Stage(f"bench {b}", [_bin(f"bench-{b}"), "--bench", "--noplot", "--warm-up-time", "0.5",
                                       "--measurement-time", "2"], caps[b], {"HEADWISE_BENCH_QUICK": "1"},
                        skip=_missing_bin(f"bench-{b}"), expect="FLOOR "))
    st.append(Stage("peers", [sys.executable, os.path.join(ROOT, "benches/peers/peers.py"), "--log", "@FLOORS@",
                              "--budget-s", "40"], 45, prepare=_peers_prepare, expect="PEER "))
    for fam, (test, regex, launches, cap) in NCU.items():
        st.append(Stage(f"ncu {fam}", ["ncu", "--launch-count", str(launches), "--kernel-name", regex, "--csv",
                                       "--metrics", ",".join(NCU_METRICS), _bin("test-gpu"), "--test-threads=1",
                                       test], cap, q, skip=_missing_tool("ncu")))
    st.append(Stage("tests-full gpu", [_bin("test-gpu"), "--test-threads=1"], 600, skip=_missing_bin("test-gpu")))
    return st


FAKE_FLOORS = [
    "FLOOR kernel=select shape=snapkv_q{k}k_b1024 measured_us={m} floor_us={f} ratio=2.000 basis=fake policy=snapkv "
    "q={q} budget=1024 kept=8192 batch=1 kv_heads=8 group=4 head_dim=128 window=32 bytes=1 fake=dry",
    "FLOOR kernel=attention shape=full_ctx{k}k_b1 measured_us={m} floor_us={f} ratio=2.000 basis=fake batch=1 "
    "ctx={q} streaming_heads=0 sink=16 window=64 kv_heads=8 group=4 head_dim=128 bytes=1 fake=dry",
]


def _fake(name, sleep_s, lines=()):
    text = "\n".join([f"DRY (fake stage {name}): no GPU, canned output", *lines])
    code = f"import time; time.sleep({sleep_s}); print({text!r})"
    return [sys.executable, "-c", code]


def dry_stages():
    """The real stage list's shape, each stage a fake command; `ncu append` sleeps past its
    box (timed out), and it is sized so the budget runs out before the end (skipped)."""
    floors = [t.format(k=q // 1024, q=q, m=10.0 * q / 8192, f=5.0 * q / 8192) for q in (8192, 32768) for t in
              FAKE_FLOORS]
    tests = ["test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s"]
    st = [Stage("device", _fake("device", 0.05, ["FAKE GPU (dry run), 0 MiB, 0"]), 5)]
    st += [Stage(f"tests-quick {t}", _fake(t, 0.1, tests), 5) for t in GPU_TESTS]
    st += [Stage("memcheck", _fake("memcheck", 0.1, ["========= ERROR SUMMARY: 0 errors"]), 5)]
    st += [Stage(f"{tool} {t}", _fake(tool, 0.05), 5) for tool in ("racecheck", "synccheck") for t in RACE_SYNC]
    st += [Stage("bench select+attention", _fake("bench", 0.2, floors), 5, expect="FLOOR ")]
    st.append(Stage("peers", [sys.executable, os.path.join(ROOT, "benches/peers/peers.py"), "--log", "@FLOORS@",
                              "--budget-s", "5", "--backend", "numpy", "--scale", "256"], 8, prepare=_peers_prepare))
    st.append(Stage("ncu append", _fake("ncu", 30), 1.5))
    st.append(Stage("tests-full gpu", _fake("tests-full", 60), 600))
    st.append(Stage("after the budget", _fake("late", 0.1), 5))
    return st


DRY_EXPECTED = {"ncu append": "timed out", "tests-full gpu": "timed out", "after the budget": "skipped: budget spent"}


def dry_verdict(results):
    """The dry pass passes when every stage ended as designed: the two sleepers timed out,
    the stage after the budget was skipped, every other stage ok."""
    bad = [(r["name"], r["status"]) for r in results if r["status"] != DRY_EXPECTED.get(r["name"], "ok")]
    for name, status in bad:
        print(f"[gpu-pass] dry: {name} ended {status!r}, expected {DRY_EXPECTED.get(name, 'ok')!r}", flush=True)
    return 1 if bad or len(results) != len(dry_stages()) else 0


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    dry = "--dry" in argv or (args and args[0] == "dry")
    if args and args[0] in ("run", "dry"):
        args = args[1:]
    out = args[0] if args else os.environ.get("OUT") or os.path.join(ROOT, "gpu-out")
    if dry:
        budget = float(os.environ.get("HEADWISE_GPU_DRY_BUDGET_S", "15"))
        stages = dry_stages()
    else:
        budget = float(os.environ.get("HEADWISE_GPU_BUDGET_S", "420"))
        stages = gpu_stages()
    p = Pass(stages, budget, out, dry=dry)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        rc = p.run()
        if dry:
            rc = dry_verdict(p.results)
    finally:
        if p.results:
            p.write_summary()
    print(f"[gpu-pass] summary: {os.path.join(out, 'summary.md')}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
