#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine with one CUDA GPU (about 10 minutes on an
# H200). Each line prints the card; numbers go to the README with it. PYTHON=python where the
# machine has torch and transformers installed globally instead of in .venv.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda  # bf16 autocast and exact resume on CUDA
$PY benchmarks/fast_decode.py --repeats 5  # decode ms/token, floor, token identity (OPT-2.7B, FlanT5-XL)
$PY benchmarks/stage1_step_full.py --compile  # full-size stage-1 step: TFLOP/s vs matmul rate, vs naive
$PY benchmarks/stage2_generate.py  # blip2_lite vs transformers' BLIP-2 (forward, generation)
