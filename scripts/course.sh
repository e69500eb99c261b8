#!/usr/bin/env bash
# Set up, then run the whole course headless: every notebook in order, outputs in build/course/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
mkdir -p build/course
for nb in notebooks/[0-9][0-9]_*.ipynb; do
    echo "== $nb"
    .venv/bin/jupyter nbconvert --to notebook --execute "$nb" --output-dir build/course \
        --ExecutePreprocessor.timeout=1200 --log-level=WARN
done
echo "Course done: executed notebooks are in build/course/"
