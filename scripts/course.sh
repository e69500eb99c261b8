#!/usr/bin/env bash
# Set up, then run the whole course headless: every notebook in order, outputs in build/course/.
# Running it again resumes: chapters finished earlier (same notebook, same package code) are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m blip2_lite course --notebooks notebooks --out build/course
