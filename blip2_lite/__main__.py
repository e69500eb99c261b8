"""Command line: ``python -m blip2_lite stage1 --preset course``.

Runs the same function as the notebooks (``blip2_lite.train.run_stage1``): generates the shapes
world and its frozen features if they are not cached, trains (resuming an interrupted run in the
same run directory), and prints the test retrieval metrics.
"""

import argparse
import json
import os

from .train import STAGE1_PRESETS, run_stage1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blip2_lite", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stage1 = commands.add_parser("stage1", help="BLIP-2 stage 1 (ITC + ITM + ITG) in the lite world")
    stage1.add_argument("--preset", choices=sorted(STAGE1_PRESETS), default="course")
    stage1.add_argument("--root", default=None, help="dataset, feature and run caches (default: blip2_lite.paths.cache_root())")
    stage1.add_argument("--run-dir", default=None, help="checkpoints and metrics (default ROOT/runs/stage1-PRESET-HASH)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lite world never needs a hub
    _, _, metrics = run_stage1(args.preset, root=args.root, run_dir=args.run_dir)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
