#!/usr/bin/env bash
# GPU check of the cuda device, for a machine with an NVIDIA GPU (written for the lent H200:
# Python 3.12, torch 2.11 cu130, triton 3.6). Run from the repository root:
#
#     PYTHONPATH=. bash ci/gpu_check.sh            # about 3-5 minutes, most of it Triton compiles
#
# Steps (each timed; a summary table is printed last):
#   1. kernels:     tests/devices/test_triton_kernels.py compiled on the GPU, in bf16, fp16, fp32
#   2. device:      tests/devices/test_cuda_device.py (probe, CUDA-graph replay vs eager, greedy
#                   tokens of a random tiny Llama on cuda through graphs == the cpu device)
#      quant:       tests/quant/test_quant_gemv.py and test_quant_cuda.py compiled on the GPU (the
#                   quant GEMV, fp8 W8A8 vs its emulation, quant kernels in CUDA graphs)
#   3. conformance: the portaserve.testing suite on --portaserve-device cuda, every dtype the device
#                   declares (bf16, fp16, fp32), including greedy SmolLM2 cuda vs cpu when the model
#                   and the gguf package are there (else that one test is deselected, and said so)
#
# The real test model cannot be fetched there (no network) and is larger than one call may carry
# (98 MB > 64 MiB): put SmolLM2-135M-Instruct.Q4_1.gguf under $PORTASERVE_CACHE_DIR/models/
# (e.g. carried in two halves over two warm calls and joined with cat), and carry gguf as a wheel.
# Logs go to $OUT (the lent machine's output folder) or /tmp/gpu_check.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-.}"
LOG_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" - <<'PYEOF'
import torch, triton
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, "
      f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE'}")
from portaserve.plugins.manager import get_registry
registry = get_registry()
print(registry.describe_devices())
for failure in registry.failures:
    print("plugin failure:", failure.plugin, failure.message)
PYEOF

# The conformance plugin: through its pytest11 entry point when portaserve is installed, else -p.
PLUGIN_ARGS=(-p portaserve.testing.pytest_plugin)
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if any(e.name == 'portaserve' for e in m.entry_points(group='pytest11')) else 1)"; then
    PLUGIN_ARGS=()
fi
E2E_ARGS=()
if ! "$PY" - <<'PYEOF'
import importlib.util, sys
from portaserve.core.loaders.fetch import SMOLLM2_135M, models_cache_dir
model = models_cache_dir() / SMOLLM2_135M.filename
missing = [what for what, ok in (("the gguf package", importlib.util.find_spec("gguf") is not None),
                                 (str(model), model.is_file())) if not ok]
if missing:
    print("NOTE: greedy SmolLM2 cuda-vs-cpu is deselected: missing " + " and ".join(missing))
    sys.exit(1)
PYEOF
then
    E2E_ARGS=(-m "not portaserve_e2e")
fi

declare -a NAMES RESULTS TIMES
run_step() {  # name, command...
    local name=$1; shift
    local start=$SECONDS
    echo; echo "=== $name: $*"
    "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    NAMES+=("$name"); TIMES+=($((SECONDS - start)))
    RESULTS+=("$([ "$rc" -eq 0 ] && echo PASS || echo "FAIL(rc=$rc)") $(grep -Eo '[0-9]+ (passed|failed|skipped|deselected|error)[^=]*' "$LOG_DIR/$name.log" | tail -1)")
}

run_step kernels env PORTASERVE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/devices/test_triton_kernels.py
run_step device "$PY" -m pytest -q -p no:cacheprovider -rs tests/devices/test_cuda_device.py
run_step quant env PORTASERVE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/quant/test_quant_gemv.py tests/quant/test_quant_cuda.py
run_step conformance "$PY" -m pytest -q -p no:cacheprovider -rs "${PLUGIN_ARGS[@]}" "${E2E_ARGS[@]}" \
    --portaserve-device cuda --pyargs portaserve.testing

echo
echo "=== gpu_check summary (logs in $LOG_DIR)"
printf '%-12s %6s  %s\n' step seconds result
status=0
for i in "${!NAMES[@]}"; do
    printf '%-12s %6s  %s\n' "${NAMES[$i]}" "${TIMES[$i]}" "${RESULTS[$i]}"
    [[ "${RESULTS[$i]}" == PASS* ]] || status=1
done
exit $status
