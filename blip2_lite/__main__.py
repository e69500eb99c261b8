"""Command line: ``python -m blip2_lite {stage1,stage2,course,reproduce,train,...}``, e.g. ``stage1 --preset course``.

``stage1`` and ``stage2`` run the same functions as the notebooks (``blip2_lite.lite.run_stage1`` /
``run_stage2``): they generate the shapes world, its frozen features and the lite LLMs if they are
not cached, train (resuming an interrupted run in the same run directory), and print the test
metrics. ``course`` executes every notebook of the course in order (``blip2_lite.course``),
skipping chapters an earlier run finished, and prints each chapter's time. ``reproduce`` writes the
paper's tables in miniature (``blip2_lite.reproduce``). ``train stage1|stage2`` trains at full scale
on real data from a config file, on one process or under torchrun (``blip2_lite.pretrain.run``).
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


def _task(args) -> list[str]:
    """Run ``caption`` / ``vqa`` / ``retrieve`` / ``attention``; returns the lines to print."""
    from . import commands
    from .stage1 import Blip2Stage1
    from .stage2 import Blip2

    # Bad input fails before a model is loaded (or trained, on first use).
    images = commands.load_images(args.images if hasattr(args, "images") else [args.image])
    if args.command == "vqa":
        commands.check_question(args.question)
    if args.command == "attention":
        commands.check_output(args.out)
    kind = Blip2 if args.command in ("caption", "vqa") else Blip2Stage1
    model, tokenizer = commands.load_model(kind, args.model, args.preset, getattr(args, "family", "t5"), args.device)
    if args.command == "caption":
        return [f"{path}: {text}" for path, text in zip(args.images, commands.caption(model, images))]
    if args.command == "vqa":
        return [f"{args.image}: {commands.vqa(model, images[0], args.question)}"]
    if args.command == "attention":
        return [f"written: {commands.attention(model, tokenizer, images[0], args.out, args.caption)}"]
    scores = commands.retrieve(model, tokenizer, images, args.texts)
    lines = []
    for i, path in enumerate(args.images):
        best = int(scores["i2t"][i].argmax())
        lines.append(f"{path}: best text {args.texts[best]!r} (ITM + ITC {scores['i2t'][i, best]:.3f}, "
                     f"ITC alone {scores['itc'][i, best]:.3f})")
    for j, text in enumerate(args.texts):
        best = int(scores["t2i"][:, j].argmax())
        lines.append(f"{text!r}: best image {args.images[best]} (ITM + ITC {scores['t2i'][best, j]:.3f})")
    return lines


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
    tables.add_argument("--seed", type=int, default=None, help="training seed of every run (default: the presets')")
    tables.add_argument("--rerank-k", type=int, default=None,
                        help="ITM re-ranks each query's top k ITC candidates (default: the stage-1 preset's; LAVIS: 128)")
    tables.add_argument("--root", default=None, help="the lite world's caches (default: cache_root())")
    tables.add_argument("--out", default=None, help="report, plots and results files (default REPO/build/reproduce)")
    caption = commands.add_parser("caption", help="caption image files")
    caption.add_argument("images", nargs="+")
    vqa = commands.add_parser("vqa", help="answer a question about an image file")
    vqa.add_argument("image")
    vqa.add_argument("question")
    retrieve = commands.add_parser("retrieve", help="rank texts for images and images for texts (ITC, then ITM)")
    retrieve.add_argument("--images", nargs="+", required=True)
    retrieve.add_argument("--texts", nargs="+", required=True)
    attention = commands.add_parser("attention", help="draw what the queries look at (with --caption: each word)")
    attention.add_argument("image")
    attention.add_argument("--caption", default=None)
    attention.add_argument("--out", default="attention.png", help="the PNG to write (default attention.png)")
    for command in (caption, vqa, retrieve, attention):
        command.add_argument("--model", default=None, help="a Hugging Face BLIP-2 checkpoint or local folder "
                                                           "(default: the lite model, trained on first use)")
        command.add_argument("--preset", choices=("course", "smoke"), default="course", help="the lite model's preset")
        command.add_argument("--device", default="cpu")
    for command in (caption, vqa):
        command.add_argument("--family", choices=sorted(FAMILIES), default="t5", help="the lite model's LLM")
    full = commands.add_parser("train", help="train at full scale on COCO-format or VQAv2 data (torchrun: many processes)")
    full.add_argument("stage", choices=("stage1", "stage2"))
    full.add_argument("--config", required=True, help="a TOML run config, or the name of a packaged one: "
                                                      "stage1_vitg, stage2_opt2.7b, stage2_flant5xl")
    full.add_argument("--annotations", required=True, help="COCO-format captions (or VQAv2 annotations with --questions)")
    full.add_argument("--images", required=True, help="the folder the annotation file's image paths are relative to")
    full.add_argument("--questions", default=None, help="VQAv2 questions (a stage-2 config with task = 'vqa')")
    full.add_argument("--run-dir", required=True, help="checkpoints and config; the same command again resumes there")
    full.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK)")
    full.add_argument("--stop-after", type=int, default=None, help="stop after this many steps in all (resume later)")
    course = commands.add_parser("course", help="execute every notebook in order; a rerun resumes where the last one stopped")
    course.add_argument("--notebooks", default=None, help="folder of the NN_*.ipynb chapters (default REPO/notebooks)")
    course.add_argument("--out", default=None, help="executed notebooks and course_state.json (default REPO/build/course)")
    args = parser.parse_args(argv)

    if args.command != "train" and getattr(args, "model", None) is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lite world never needs a hub (full-scale runs may)
    try:
        if args.command == "course":
            checkout = repo_root() or Path.cwd()
            out = args.out or checkout / "build" / "course"
            times = run_course(args.notebooks or checkout / "notebooks", out)
        elif args.command in ("caption", "vqa", "retrieve", "attention"):
            lines = _task(args)
        elif args.command == "train":
            from .pretrain.run import train_run

            history = train_run(int(args.stage[-1]), args.config, args.run_dir, args.annotations, args.images,
                                args.questions, args.device, args.stop_after)
        elif args.command == "reproduce":
            report = reproduce(args.preset, root=args.root, seed=args.seed, rerank_k=args.rerank_k,
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
    elif args.command == "train":
        if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports
            return
        if history.steps:
            print(f"step {history.steps[-1]}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in history.losses.items()))
        print(f"checkpoint: {Path(args.run_dir) / 'checkpoint.pt'}")
    elif args.command in ("caption", "vqa", "retrieve", "attention"):
        print("\n".join(lines))
    else:
        print(json.dumps(metrics, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
