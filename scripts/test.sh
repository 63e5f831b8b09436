#!/usr/bin/env bash
# The test command (README): set up .venv, build, then the C++ tests (ctest) and the Python tests (pytest).
# Without a GPU the Triton kernels run under TRITON_INTERPRET=1 and GPU-marked tests are skipped.
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$repo"
build=${FASTSFT_CMAKE_BUILD:-$repo/build/cmake}
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
  -DPython3_EXECUTABLE="$(command -v python)" ${CUDA_HOME:+-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_HOME} > "$build/configure.log" 2>&1 \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure
python -m pytest tests -q "$@"
