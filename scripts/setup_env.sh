# Sourced by scripts/test.sh and scripts/demo.sh: make (or reuse) .venv with the pinned set, then build fastsft
# and its extension. CUDA sources are compiled whenever nvcc is found, also on machines without a GPU (torch's
# CUDA build links them; they just cannot run there). FASTSFT_VENV overrides the venv's location.
# The build is skipped when this venv already has the editable install of this checkout and nothing it is built
# from changed since (csrc/, setup.py, pyproject.toml, torch, the build switches); FASTSFT_REBUILD=1 forces it.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FASTSFT_VENV:-$repo/.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# find_spec, not import: importing these takes seconds, and only their presence is asked here
if ! python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
    ('torch', 'transformers', 'trl', 'peft', 'pytest')))" 2>/dev/null; then
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q -r "$repo/requirements.txt"
fi
if command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export PATH=$CUDA_HOME/bin:$PATH
  # setup.py finds the cuBLAS/cuSPARSE headers that a bare toolkit lacks in pip's nvidia packages itself
fi
build_inputs() {
  (cd "$repo" && find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum && sha256sum setup.py pyproject.toml)
  python -c 'import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda)'
  env | LC_ALL=C sort | grep -E '^(CUDA_HOME|FASTSFT_(CUDA_ARCHS|CPU_ONLY|NO_EXTENSION|REQUIRE_EXTENSION))=' || true
}
built_extension() {  # the compiled file the editable install uses (in the checkout), by content
  (cd "$repo" && sha256sum fastsft/_C*.so 2>/dev/null || true)
}
install_is_current() {
  python - "$repo" <<'PY' 2>/dev/null
import os, sys
import fastsft
from fastsft import _extension
inside = os.path.realpath(fastsft.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep)
sys.exit(not (inside and (_extension.load() or os.environ.get(_extension.SKIP_ENV, "") not in ("", "0"))))
PY
}
stamp_file=$venv/.fastsft-build-stamp
stamp=$(build_inputs | sha256sum | cut -d' ' -f1)
if [ "${FASTSFT_REBUILD:-0}" = 0 ] && [ -f "$stamp_file" ] \
    && [ "$(cat "$stamp_file")" = "$stamp $(built_extension | sha256sum | cut -d' ' -f1)" ] && install_is_current; then
  echo "fastsft: csrc/, setup.py and torch unchanged since the last build: not rebuilt (FASTSFT_REBUILD=1 forces it)"
else
  rm -f "$stamp_file"
  (cd "$repo" && MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install -q --no-build-isolation --no-deps -e .)
  echo "$stamp $(built_extension | sha256sum | cut -d' ' -f1)" > "$stamp_file"
fi
python -c "import fastsft, fastsft._extension as e
cuda = 'with' if e.has_kernel('cross_entropy_rows', 'cuda') else 'without'
print('fastsft', fastsft.__version__, '| extension:', f'loaded, {cuda} CUDA kernels' if e.load() else e.error())"
