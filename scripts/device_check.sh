#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run for the `device` tool (a bare CUDA machine
# with torch and transformers but no package index and no ../shared):
#   run(command="scripts/device_check.sh", timeout_s=480)   (~400 s of limits inside)
# 1. the CUDA tests: offloading's device cache, the pinned host tier and Fiddler's compute on
#    a miss (tests/offload/test_device_offload.py), and the engine's parity and offloading
#    suites with the device left at "auto" (= cuda there);
# 2. the offload benchmark on the GPU: mixtral-mini (bf16 dummy weights written there) at a
#    25% expert budget read from disk, with a pinned host tier, with Fiddler, and all resident.
# Logs and JSON land in $OUT (the tool's folder that comes back) or /tmp/device_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=/tmp/sparsa-ext
PY=python3
if [ -d .whl ]; then  # wheels the image lacks, carried (see /work/.library/device/README.md)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
rc=0
$PY - <<'EOF' 2>&1 | tee "$OUT/env.log" || rc=1
import torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "transformers", transformers.__version__)
import sparsa  # noqa: F401  (imports without the optional packages)
EOF
nproc | sed 's/^/cpus /' | tee -a "$OUT/env.log"

echo "== tests" | tee "$OUT/tests.log"
timeout 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rfEs --durations=5 \
  tests/offload/test_device_offload.py tests/offload/test_host_tier.py \
  tests/offload/test_offload_engine.py tests/loader/test_fit_check.py \
  tests/models/test_parity.py 2>&1 \
  | tee -a "$OUT/tests.log" || rc=1

echo "== bench" | tee "$OUT/bench.log"
M=/tmp/mixtral-mini-bf16
[ -f "$M/config.json" ] || $PY -m sparsa.cli write-dummy mixtral-mini "$M" --dtype bfloat16 \
  >>"$OUT/bench.log" 2>&1 || rc=1
B="$PY -m sparsa.bench.offload $M --device cuda --prompt-len 64 --max-tokens 64"
timeout 90 $B --budgets 25%,all --json "$OUT/bench_disk.json" 2>&1 | tee -a "$OUT/bench.log" \
  || rc=1
timeout 90 $B --budgets 25% --host-memory 100% --on-miss wait,host \
  --json "$OUT/bench_host.json" 2>&1 | tee -a "$OUT/bench.log" || rc=1
echo "device_check exit $rc" | tee -a "$OUT/bench.log"
exit $rc
