# Sourced by scripts/test.sh and scripts/demo.sh: make (or reuse) .venv with the pinned set, then build fastsft
# and its extension. CUDA sources are compiled whenever nvcc is found, also on machines without a GPU (torch's
# CUDA build links them; they just cannot run there). FASTSFT_VENV overrides the venv's location.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FASTSFT_VENV:-$repo/.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
if ! python -c "import torch, transformers, trl, peft, pytest" 2>/dev/null; then
  python -m pip install -q --upgrade pip setuptools wheel
  python -m pip install -q -r "$repo/requirements.txt"
fi
if command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export PATH=$CUDA_HOME/bin:$PATH
  # torch's headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack; pip's nvidia packages have them
  nv_include=$(python -c 'import glob, os, nvidia; print(":".join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*", "include")))))' 2>/dev/null || true)
  export CPATH=${nv_include}${CPATH:+:$CPATH}
fi
(cd "$repo" && MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install -q --no-build-isolation --no-deps -e .)
python -c "import fastsft, fastsft._extension as e; print('fastsft', fastsft.__version__, '| extension:', 'loaded' if e.load() else e.error())"
