#!/usr/bin/env bash
# Set up, then run the tests and execute every notebook (nbval, lax mode; see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest "$@"
