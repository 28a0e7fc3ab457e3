#!/usr/bin/env bash
# The whole GPU pass in one short device call, on a GPU machine that has no Rust toolchain.
#
# Here (with Rust):   scripts/gpu_pass.sh build     -> gpu-bin/: the gpu-tests test binaries
#                                                       (test-gpu, test-capi_gpu) and the benches
#                                                       (bench-<name>), kernels embedded
# There (with a GPU): scripts/gpu_pass.sh run [OUT]  -> scripts/gpu_pass.py: tests (quick shapes),
#                                                       compute-sanitizer, benches, PyTorch peers,
#                                                       ncu, full tests, each stage time-boxed
#                                                       under HEADWISE_GPU_BUDGET_S (default 420);
#                                                       summary.json/.md, pass.log, plot.png in OUT
#                                                       (default $OUT, else gpu-out)
# Anywhere:           scripts/gpu_pass.sh dry [OUT]  -> the same runner on fake stages in a small
#                                                       budget (HEADWISE_GPU_DRY_BUDGET_S, 15 s)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    rm -rf gpu-bin && mkdir -p gpu-bin
    # The GPU machines are H100/H200 (sm_90): SASS for that alone keeps the binaries small.
    export HEADWISE_CUDA_ARCHS=${HEADWISE_CUDA_ARCHS:-90}
    export HEADWISE_REQUIRE_NVCC=1 CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_BENCH_STRIP=symbols
    {
      cargo test --release --features gpu-tests,capi --test gpu --test capi_gpu --no-run --message-format=json
      cargo bench --no-run --message-format=json
    } 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kind = m["target"]["kind"][0]
    if kind in ("test", "bench"):
        shutil.copy(m["executable"], "gpu-bin/%s-%s" % (kind, m["target"]["name"]))
'
    # Symbols stripped (kernel names live in the embedded fatbins): the device call carries
    # at most 64 MiB.
    ls -la gpu-bin
    size=$(du -sm gpu-bin | cut -f1)
    echo "gpu-bin: ${size} MiB (HEADWISE_CUDA_ARCHS=$HEADWISE_CUDA_ARCHS); a device call carries 64 MiB"
    [ "$size" -lt 60 ] || { echo "gpu-bin is too large to carry" >&2; exit 1; }
    ;;
  run)
    exec python3 scripts/gpu_pass.py run "${2:-${OUT:-gpu-out}}"
    ;;
  dry)
    exec python3 scripts/gpu_pass.py --dry "${2:-${OUT:-gpu-out-dry}}"
    ;;
  *)
    echo "usage: $0 build | run [OUT] | dry [OUT]" >&2
    exit 2
    ;;
esac
