"""Command line: ``python -m blip2_lite {stage1,stage2,course,reproduce}``, e.g. ``stage1 --preset course``.

``stage1`` and ``stage2`` run the same functions as the notebooks (``blip2_lite.lite.run_stage1`` /
``run_stage2``): they generate the shapes world, its frozen features and the lite LLMs if they are
not cached, train (resuming an interrupted run in the same run directory), and print the test
metrics. ``course`` executes every notebook of the course in order (``blip2_lite.course``),
skipping chapters an earlier run finished, and prints each chapter's time. ``reproduce`` writes the
paper's tables in miniature (``blip2_lite.reproduce``).
"""

import argparse
import json
import os
import sys
from pathlib import Path

from .course import CourseError, run_course
from .families import FAMILIES
from .lite import STAGE1_PRESETS, STAGE2_PRESETS, run_stage1, run_stage2
from .lite.paths import repo_root
from .reproduce import REPRODUCE_PRESETS, reproduce


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blip2_lite", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stage1 = commands.add_parser("stage1", help="BLIP-2 stage 1 (ITC + ITM + ITG) in the lite world")
    stage1.add_argument("--preset", choices=sorted(STAGE1_PRESETS), default="course")
    stage2 = commands.add_parser("stage2", help="BLIP-2 stage 2 (soft visual prompts for a frozen LLM)")
    stage2.add_argument("--family", choices=sorted(FAMILIES), default="opt")
    stage2.add_argument("--preset", choices=sorted(STAGE2_PRESETS), default="course")
    for command in (stage1, stage2):
        command.add_argument("--root", default=None,
                             help="dataset, feature, LLM and run caches (default: blip2_lite.lite.paths.cache_root())")
        command.add_argument("--run-dir", default=None, help="checkpoints and metrics (default ROOT/runs/STAGE-...-HASH)")
        command.add_argument("--device", default="cpu", help="where to train: cpu (default), cuda, cuda:1, ...")
    tables = commands.add_parser("reproduce", help="the paper's tables in miniature: train what is missing, "
                                                      "write build/reproduce/report.md")
    tables.add_argument("--preset", choices=sorted(REPRODUCE_PRESETS), default="course")
    tables.add_argument("--root", default=None, help="the lite world's caches (default: cache_root())")
    tables.add_argument("--out", default=None, help="report, plots and results files (default REPO/build/reproduce)")
    course = commands.add_parser("course", help="execute every notebook in order; a rerun resumes where the last one stopped")
    course.add_argument("--notebooks", default=None, help="folder of the NN_*.ipynb chapters (default REPO/notebooks)")
    course.add_argument("--out", default=None, help="executed notebooks and course_state.json (default REPO/build/course)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lite world never needs a hub
    try:
        if args.command == "course":
            checkout = repo_root() or Path.cwd()
            out = args.out or checkout / "build" / "course"
            times = run_course(args.notebooks or checkout / "notebooks", out)
        elif args.command == "reproduce":
            report = reproduce(args.preset, root=args.root,
                               out_dir=args.out or (repo_root() or Path.cwd()) / "build" / "reproduce")
        elif args.command == "stage1":
            _, _, metrics = run_stage1(args.preset, root=args.root, run_dir=args.run_dir, device=args.device)
        else:
            _, _, metrics = run_stage2(args.family, args.preset, root=args.root, run_dir=args.run_dir,
                                       device=args.device)
    except CourseError as e:  # already one line naming the chapter, the cell and the error
        parser.exit(2, f"error: {e}\n")
    except (ValueError, TypeError, OSError, ArithmeticError) as e:  # our errors name their cause: one line, no traceback
        parser.exit(2, f"error: {type(e).__name__}: {e}\n")
    except KeyboardInterrupt:
        where = "the interrupted chapter (its training from its last checkpoint)" if args.command == "course" \
            else "the last checkpoint"
        parser.exit(130, f"interrupted: run the same command again to resume from {where}\n")
    if args.command == "course":
        width = max(map(len, times))
        print("\n".join(f"{name:<{width}}  {seconds:8.1f} s" for name, seconds in times.items()))
        print(f"course done: executed notebooks are in {out}")
    elif args.command == "reproduce":
        print(f"report written: {report}")
    else:
        print(json.dumps(metrics, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
