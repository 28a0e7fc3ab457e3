#!/usr/bin/env bash
# The whole GPU pass, in one go, on a GPU machine that has no Rust toolchain.
#
# Here (with Rust):   scripts/gpu_pass.sh build     -> test and bench binaries in gpu-bin/
#                                                       (test-<name>, bench-<name>, kernels embedded)
# There (with a GPU): scripts/gpu_pass.sh run [OUT]  -> every GPU test, then the GPU tests under
#                                                       compute-sanitizer memcheck and racecheck,
#                                                       then the benches; logs in OUT
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    rm -rf gpu-bin && mkdir -p gpu-bin
    export HEADWISE_REQUIRE_NVCC=1
    {
      cargo test --release --features gpu-tests,capi --no-run --message-format=json
      cargo bench --no-run --message-format=json
    } 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind = m["target"]["kind"][0]
    # capi_c compiles C against the source tree and the cdylib: a CI test, not a GPU one.
    if m["target"]["name"] == "capi_c":
        continue
    if kind in ("test", "bench"):
        shutil.copy(m["executable"], "gpu-bin/%s-%s" % (kind, m["target"]["name"]))
'
    ls -la gpu-bin
    ;;
  run)
    out=${2:-gpu-out}
    mkdir -p "$out"
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    status=0
    for t in gpu-bin/test-*; do
      echo "== $t" | tee -a "$out/tests.log"
      "$t" --test-threads=1 2>&1 | tee -a "$out/tests.log" || status=1
    done
    for tool in memcheck racecheck; do
      for t in gpu-bin/test-gpu; do
        echo "== compute-sanitizer --tool $tool $t" | tee -a "$out/sanitizer.log"
        compute-sanitizer --tool "$tool" --error-exitcode 9 "$t" --test-threads=1 2>&1 | tee -a "$out/sanitizer.log" || status=1
      done
    done
    for b in gpu-bin/bench-*; do
      echo "== $b" | tee -a "$out/bench.log"
      "$b" --bench 2>&1 | tee -a "$out/bench.log" || status=1
    done
    exit $status
    ;;
  *)
    echo "usage: $0 build | run [OUT]" >&2
    exit 2
    ;;
esac
