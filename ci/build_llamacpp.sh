#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp plus its OpenAI-compatible server) from source in its own
# virtual environment, for benchmarks/cpu_peers.py. PyPI has no binary wheel of it; the sdist
# compiles llama.cpp with the system cmake and gcc (about 5 minutes on 2 cores).
#
#   ci/build_llamacpp.sh [VENV]        # default /tmp/llamacpp-venv
#
# GGML_NATIVE=ON builds for this CPU (-march=native): the venv is not portable to other CPUs.
# The build runs at nice 19 so that it does not slow down others on a shared machine.
set -euo pipefail

VENV="${1:-/tmp/llamacpp-venv}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip

start=$(date +%s)
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    nice -n 19 "$VENV/bin/python" -m pip install --no-cache-dir "llama-cpp-python[server]==${VERSION}"
end=$(date +%s)

"$VENV/bin/python" -c "import llama_cpp, llama_cpp.server; print('llama-cpp-python', llama_cpp.__version__)"
echo "built llama-cpp-python ${VERSION} in $((end - start)) s with ${JOBS} jobs on $(nproc) cores ($(date -u +%FT%TZ))"
