#!/usr/bin/env bash
# The main job (README): set up .venv, build, then patched SFT training of the built-in small model on the
# built-in chat data, against the same steps unpatched (GPU when there is one). Extra arguments go to
# `fastsft demo`.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python -m fastsft demo "$@"
