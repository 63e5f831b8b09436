#!/usr/bin/env bash
# The patching, attention-integration and trainer tests again, against the newest transformers 5.x (besides the
# pinned 5.17 of requirements.txt): transformers changes model internals between minor releases (5.24 renamed
# `past_key_values` to `cache` in model outputs). Run after scripts/test.sh, in the same .venv.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
version=${FASTSFT_NEWEST_TRANSFORMERS:-5.24.0}
venv=${FASTSFT_VENV:-$repo/.venv}
target=$(mktemp -d)
"$venv/bin/python" -m pip install -q --no-deps --target "$target" "transformers==$version"
cd "$repo"
PYTHONPATH="$target" "$venv/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
PYTHONPATH="$target" "$venv/bin/python" -m pytest -q tests/test_patching.py tests/test_transformers_attention.py tests/test_convergence.py \
  tests/test_trainer.py tests/test_offload_checkpointing.py tests/test_patch_parity.py tests/test_captured_layers.py "$@"
