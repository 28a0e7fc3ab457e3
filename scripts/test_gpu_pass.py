"""Tests of the GPU pass runner (scripts/gpu_pass.py) without a GPU: stage order, time boxes,
the budget, the summary, the file cap, and the dry mode end to end.

Run from the repository root: `python3 -m unittest scripts/test_gpu_pass.py`.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gpu_pass as G  # noqa: E402


def py(code):
    return [sys.executable, "-c", code]


class RunnerTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.out = os.path.join(self.tmp.name, "out")

    def tearDown(self):
        self.tmp.cleanup()

    def run_pass(self, stages, budget=30.0, dry=False):
        p = G.Pass(stages, budget, self.out, dry=dry)
        rc = p.run()
        return p, rc

    def test_stages_run_in_order_and_are_logged(self):
        trace = os.path.join(self.tmp.name, "trace")
        stages = [G.Stage(n, py(f"open({trace!r}, 'a').write('{n}\\n'); print('hello from {n}')"), 10)
                  for n in ("first", "second", "third")]
        p, rc = self.run_pass(stages)
        self.assertEqual(rc, 0)
        with open(trace) as f:
            self.assertEqual(f.read().split(), ["first", "second", "third"])
        self.assertEqual([r["name"] for r in p.results], ["first", "second", "third"])
        self.assertTrue(all(r["status"] == "ok" and r["wall_s"] >= 0 for r in p.results))
        with open(os.path.join(self.out, "pass.log")) as f:
            log = f.read()
        self.assertLess(log.index("hello from first"), log.index("hello from second"))
        self.assertIn("== third: ok", log)

    def test_a_stage_past_its_box_is_killed_with_its_children(self):
        pidfile = os.path.join(self.tmp.name, "child.pid")
        # The stage starts a grandchild that would outlive a plain kill of the stage's process.
        code = ("import subprocess, sys, time; "
                f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                f"open({pidfile!r}, 'w').write(str(c.pid)); time.sleep(60)")
        stages = [G.Stage("sleeper", py(code), 1.0), G.Stage("next", py("print('still runs')"), 5)]
        t0 = time.monotonic()
        p, rc = self.run_pass(stages)
        self.assertLess(time.monotonic() - t0, 10)
        self.assertEqual(p.results[0]["status"], "timed out")
        self.assertEqual(p.results[0]["timeout_s"], 1.0)
        self.assertLess(p.results[0]["wall_s"], 5)
        self.assertEqual(p.results[1]["status"], "ok")
        self.assertEqual(rc, 1)
        with open(pidfile) as f:
            child = int(f.read())
        time.sleep(0.2)
        alive = True
        try:
            os.kill(child, 0)
            # A zombie still answers kill(0); the process must at least be gone from ps's state R/S.
            with open(f"/proc/{child}/stat") as f:
                alive = f.read().split()[2] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        self.assertFalse(alive, "the stage's child survived the time box")

    def test_budget_exhaustion_skips_later_stages(self):
        stages = [G.Stage("long", py("import time; time.sleep(30)"), 20),
                  G.Stage("later", py("print(1)"), 5), G.Stage("last", py("print(2)"), 5)]
        t0 = time.monotonic()
        p, rc = self.run_pass(stages, budget=2.5)
        self.assertLess(time.monotonic() - t0, 8)
        self.assertEqual(p.results[0]["status"], "timed out")
        self.assertLessEqual(p.results[0]["timeout_s"], 2.5)
        self.assertEqual([r["status"] for r in p.results[1:]], ["skipped: budget spent"] * 2)

    def test_failed_and_unavailable_stages(self):
        stages = [G.Stage("fails", py("import sys; sys.exit(3)"), 5),
                  G.Stage("absent", ["/nonexistent/binary"], 5, skip="missing gpu-bin/test-x"),
                  G.Stage("unstartable", ["/nonexistent/binary"], 5)]
        stages.append(G.Stage("bench measured nothing", py("print('bench: NOT RUN: no GPU')"), 5, expect="FLOOR "))
        p, rc = self.run_pass(stages)
        self.assertEqual([r["status"] for r in p.results],
                         ["failed", "skipped: missing gpu-bin/test-x", "failed", "failed"])
        self.assertEqual(p.results[3]["note"], "no FLOOR line")
        self.assertEqual(p.results[0]["rc"], 3)
        self.assertEqual(rc, 1)

    def test_summary_json_and_markdown_are_well_formed(self):
        floor = ("FLOOR kernel=select shape=snapkv_q8k_b64 measured_us=12.5 floor_us=10.0 ratio=1.250 "
                 "basis=bytes/copy_bw policy=snapkv q=8192 budget=64 kept=512")
        peer = ("PEER kernel=select shape=snapkv_q8k_b64 peer=snapkv_repeat_kv backend=torch scale=1 "
                "peer_us=125.0 headwise_us=12.5 ratio=10.000")
        tests = "test result: ok. 7 passed; 0 failed; 0 ignored"
        stages = [G.Stage("bench", py(f"print({floor!r}); print({peer!r})"), 5),
                  G.Stage("tests", py(f"print({tests!r})"), 5)]
        p, rc = self.run_pass(stages)
        with open(os.path.join(self.out, "summary.json")) as f:
            s = json.load(f)
        for key in ("dry", "started_utc", "budget_s", "spent_s", "stages", "floors", "peers", "ncu"):
            self.assertIn(key, s)
        self.assertFalse(s["dry"])
        self.assertEqual(s["floors"][0]["measured_us"], "12.5")
        self.assertEqual(s["peers"][0]["ratio"], "10.000")
        self.assertEqual(s["stages"][1]["tests_passed"], 7)
        with open(os.path.join(self.out, "summary.md")) as f:
            md = f.read()
        self.assertTrue(md.startswith("# headwise GPU pass\n"))
        for heading in ("## Stages", "## Benches: measured / floor", "## Peers: peer / headwise"):
            self.assertIn(heading, md)
        # Every table row has as many cells as its header.
        for block in md.split("\n\n"):
            rows = [line for line in block.splitlines() if line.startswith("|")]
            if rows:
                self.assertEqual(len({line.count("|") for line in rows}), 1, block)
        self.assertIn("| select | snapkv_q8k_b64 | 12.5 | 10.0 | 1.250 |", md)

    def test_ncu_csv_is_collected(self):
        csv = "\n".join([
            '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
            '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"',
            '"0","1","test-gpu","h","hw_append_d128","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0",'
            '"Command line profiler metrics","launch__registers_per_thread","register/thread","32"',
            '"0","1","test-gpu","h","hw_append_d128","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0",'
            '"Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","12.5"',
        ])
        p, rc = self.run_pass([G.Stage("ncu append", py(f"print({csv!r})"), 5)])
        self.assertEqual(p.ncu, [{"kernel": "hw_append_d128", "launch__registers_per_thread": "32",
                                  "dram__throughput.avg.pct_of_peak_sustained_elapsed": "12.5",
                                  "stage": "ncu append"}])

    def test_output_stays_within_the_file_cap(self):
        p, rc = self.run_pass([G.Stage(f"s{i}", py("print('FLOOR kernel=a shape=b q=1 measured_us=1')"), 5)
                               for i in range(12)])
        files = os.listdir(self.out)
        self.assertLessEqual(len(files), G.MAX_FILES)
        self.assertTrue({"pass.log", "summary.json", "summary.md"} <= set(files))
        for i in range(G.MAX_FILES):
            open(os.path.join(self.out, f"extra{i}"), "w").close()
        with self.assertRaises(RuntimeError):
            p.check_files()

    def test_the_real_stage_list_keeps_the_order_and_the_knobs(self):
        names = [s.name for s in G.gpu_stages()]
        kinds = [n.split()[0] for n in names]
        order = ["device", "tests-quick", "memcheck", "racecheck", "synccheck", "bench", "peers", "ncu",
                 "tests-full"]
        self.assertEqual([k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k], order)
        by_name = {s.name: s for s in G.gpu_stages()}
        self.assertEqual(by_name["tests-quick gpu"].env.get("HEADWISE_GPU_QUICK"), "1")
        self.assertNotIn("HEADWISE_GPU_QUICK", by_name["tests-full gpu"].env)
        bench = by_name["bench select"]
        self.assertEqual(bench.env.get("HEADWISE_BENCH_QUICK"), "1")
        joined = " ".join(bench.cmd)
        self.assertIn("--warm-up-time 0.5 --measurement-time 2", joined)
        for t in G.MEMCHECK:
            self.assertIn(t, by_name["memcheck"].cmd)
        # Every box before tests-full fits the default budget together.
        self.assertLessEqual(sum(s.cap_s for s in G.gpu_stages() if s.name != "tests-full gpu"), 420)


class DryModeTests(unittest.TestCase):
    def test_dry_pass_end_to_end_within_its_budget(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "dry")
            env = dict(os.environ, HEADWISE_GPU_DRY_BUDGET_S="15")
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, os.path.join(HERE, "gpu_pass.py"), "--dry", out], env=env,
                               capture_output=True, text=True, timeout=60)
            wall = time.monotonic() - t0
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertLess(wall, 15 + 10)
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
            self.assertTrue(s["dry"])
            self.assertIn("DRY", s["note"])
            status = {x["name"]: x["status"] for x in s["stages"]}
            self.assertEqual(status["ncu append"], "timed out")
            self.assertEqual(status["after the budget"], "skipped: budget spent")
            self.assertEqual(status["peers"], "ok")
            # Every number in a dry summary is labelled fake or comes from the CPU backend.
            self.assertTrue(all(f.get("fake") == "dry" for f in s["floors"]))
            with open(os.path.join(out, "pass.log")) as f:
                log = f.read()
            self.assertTrue(s["peers"] and all(p.get("backend") == "numpy" for p in s["peers"]), log)
            with open(os.path.join(out, "summary.md")) as f:
                self.assertIn("DRY RUN", f.readline())
            self.assertLessEqual(len(os.listdir(out)), G.MAX_FILES)


if __name__ == "__main__":
    unittest.main()
