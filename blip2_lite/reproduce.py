"""``python -m blip2_lite reproduce``: the paper's tables in miniature, on the shapes world's test split.

It trains what the cache does not hold yet and writes ``report.md`` with its plots and the results
files the runners write (``evaluate.tasks``):

- Table 1 in miniature: zero-shot VQA accuracy, captioning (COCO metrics, CIDEr first) and retrieval
  R@1 both ways;
- Table 6 in miniature: stage 1 with ITC + ITM against ITC + ITM + ITG (retrieval after ITM
  re-ranking, as the paper reports it), and ITC alone against ITC then ITM re-ranking;
- Figure 5 in miniature: stage 2 with and without stage-1 representation learning, zero-shot VQA
  accuracy on validation images over the stage-2 steps, for both LLM families;
- OPT against FlanT5, side by side.

Each paper claim is checked against the numbers and the report says plainly whether it holds here.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from .atomic import atomic_path, write_json
from .evaluate.retrieval import K_TEST
from .evaluate.tasks import caption_task, score_answers, score_captions, vqa_task, write_results
from .families import FAMILIES
from .lite import run_stage1, run_stage2
from .lite.presets import STAGE1_PRESETS, STAGE2_PRESETS, with_seed
from .lite.shapes_world import chance_levels
from .lite.world import load_lite_world


@dataclass(frozen=True)
class ReproducePreset:
    stage1: str  # stage 1 with ITC + ITM + ITG
    stage1_no_itg: str  # the same without ITG (Table 6)
    stage2: str  # stage 2 from the stage-1 Q-Former
    stage2_no_stage1: str  # the same from a Q-Former that skipped stage 1 (Figure 5)


REPRODUCE_PRESETS = {
    "course": ReproducePreset("course", "course-no-itg", "course", "course-no-stage1"),
    # About 2 h on 2 cores from an empty cache (README, measured with --seed 1): two 2000-step
    # stage-1 runs and four 2000-step stage-2 runs.
    "long": ReproducePreset("long", "long-no-itg", "long", "long-no-stage1"),
    "smoke": ReproducePreset("smoke", "smoke-no-itg", "smoke", "smoke-no-stage1"),
}


def seeded(preset: str, seed: int | None) -> ReproducePreset:
    """The runs of ``REPRODUCE_PRESETS[preset]`` with every training seed set to ``seed`` (None: the
    presets' own); both stage-2 runs then start from (or are built like) the seeded stage 1."""
    chosen = REPRODUCE_PRESETS[preset]
    if seed is None:
        return chosen
    stage1 = with_seed(STAGE1_PRESETS, chosen.stage1, seed)
    link = {} if stage1 == chosen.stage1 else {"stage1": stage1}
    return ReproducePreset(stage1, with_seed(STAGE1_PRESETS, chosen.stage1_no_itg, seed),
                           with_seed(STAGE2_PRESETS, chosen.stage2, seed, **link),
                           with_seed(STAGE2_PRESETS, chosen.stage2_no_stage1, seed, **link))


class _Clock:
    """Wall time of each step of this run (a run found in the cache takes seconds)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - start
        return out


def _claim(holds: bool, text: str) -> str:
    return f"**{'holds' if holds else 'does not hold'} here**: {text}"


def _change(before: dict, after: dict, before_key: str = "itm_", after_key: str = "itm_") -> str:
    """R@1 both ways, before -> after, to two decimals (one caption of 2,500 is 0.04 points)."""
    return ", ".join(f"{name} {before[before_key + key]:.2f} -> {after[after_key + key]:.2f}"
                     for name, key in (("image->text", "i2t_r1"), ("text->image", "t2i_r1")))


def _table(header: list[str], rows: list[list]) -> str:
    fmt = lambda x: f"{x:.1f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows])


def _figure5(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, not a window: this also runs headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (family, runs) in zip(axes[0], curves.items()):
        for label, (steps, values) in runs.items():
            ax.plot(steps, values, marker="o", label=label)
        ax.set(title=f"{family.upper()}: zero-shot VQA during stage 2", xlabel="stage-2 step",
               ylabel="val VQA accuracy (%)")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def reproduce(preset: str = "course", root: str | None = None, out_dir: str | None = None, sizes: dict | None = None,
              progress: bool = True, seed: int | None = None, rerank_k: int | None = None) -> Path:
    """Train what is missing for ``preset`` (see ``REPRODUCE_PRESETS``; ``seed`` overrides its training
    seed), evaluate on the test split (ITM re-ranks the top ``rerank_k``, default the stage-1 preset's)
    and write ``out_dir/report.md`` (default ``build/reproduce``) with ``figure5.png``, ``metrics.json``
    and the runners' results files. Returns the report's path."""
    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(REPRODUCE_PRESETS)}")
    chosen = seeded(preset, seed)
    out = Path(out_dir or Path.cwd() / "build" / "reproduce")
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    started = time.perf_counter()
    world = clock.run("world and features", load_lite_world, root, sizes=sizes, progress=progress)
    test, test_features = world.dataset["test"], world.splits["test"].features

    stage1, _, retrieval = clock.run("stage 1", run_stage1, chosen.stage1, root, world=world, progress=progress,
                                     rerank_k=rerank_k)
    _, _, retrieval_no_itg = clock.run("stage 1 without ITG", run_stage1, chosen.stage1_no_itg, root, world=world,
                                       progress=progress, rerank_k=rerank_k)
    results, curves = {}, {}
    for family in sorted(FAMILIES):
        model, history, _ = clock.run(f"stage 2 {family}", run_stage2, family, chosen.stage2, root, world=world,
                                      stage1_model=stage1, progress=progress)
        _, history_skip, _ = clock.run(f"stage 2 {family} without stage 1", run_stage2, family,
                                       chosen.stage2_no_stage1, root, world=world, progress=progress)
        curves[family] = {"with stage 1": (history.eval_steps, history.metrics.get("val_vqa", [])),
                          "without stage 1": (history_skip.eval_steps, history_skip.metrics.get("val_vqa", []))}
        # The lite LLMs learned the world's captions without a prompt: they caption from an empty one.
        captions = clock.run(f"captions {family}", caption_task, model, test, test_features, prompt="",
                             progress=progress)
        answers = clock.run(f"VQA {family}", vqa_task, model, test, test_features, progress=progress)
        write_results(out / f"captions_{family}.json", captions)
        write_results(out / f"answers_{family}.json", answers)
        results[family] = {**score_captions(captions, test), **score_answers(answers, test),
                           "examples": captions[:4]}
    _figure5(curves, out / "figure5.png")
    total = time.perf_counter() - started
    k = STAGE1_PRESETS[chosen.stage1].rerank_k if rerank_k is None else rerank_k
    metrics = {"preset": preset, "rerank_k": k, "results": results, "retrieval": retrieval,
               "retrieval_no_itg": retrieval_no_itg, "figure5": curves, "wall_s": clock.times | {"total": total}}
    write_json(out / "metrics.json", metrics)
    path = out / "report.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(_report(chosen, preset, metrics, chance_levels(world.dataset)))
    return path


def _report(chosen: ReproducePreset, preset: str, m: dict, chance: dict) -> str:
    r, r0, res = m["retrieval"], m["retrieval_no_itg"], m["results"]
    seed = STAGE1_PRESETS[chosen.stage1].train.seed
    k = m["rerank_k"]
    families = sorted(res)
    name = {"opt": "OPT (decoder-only)", "t5": "FlanT5 layout (encoder-decoder)"}
    lines = [
        "# BLIP-2's tables in miniature (shapes world, test split)",
        "",
        f"Preset `{preset}` (stage 1 `{chosen.stage1}`, stage 2 `{chosen.stage2}`), seed {seed}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} with {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {m['wall_s']['total']:.0f} s in this run (steps read from the cache take "
        "seconds). Made by `python -m blip2_lite reproduce`.",
        "",
        "Decoding as LAVIS's BLIP-2 configs: captions with beam 5, 8 to 30 new tokens, from an empty prompt "
        "(the lite LLMs learned captions without one); VQA with the family's prompt, beam 5, 1 to 10 new "
        "tokens, length penalty -1 for FlanT5 and 0 for OPT. Retrieval: ITC over all pairs, then ITM "
        f"re-ranking of the top k={k} "
        + ("(LAVIS's k_test)." if k == K_TEST else
           f"(LAVIS uses {K_TEST}; `--rerank-k {K_TEST}` follows it at a higher cost)."),
        "",
        "## Table 1 in miniature: zero-shot VQA, captioning, retrieval",
        "",
        _table(["model", "VQA acc.", "CIDEr", "BLEU-4", "METEOR", "ROUGE-L"],
               [[f"BLIP-2 lite, {name[f]}", res[f]["vqa_overall"], res[f]["CIDEr"], res[f]["Bleu_4"],
                 res[f]["METEOR"], res[f]["ROUGE_L"]] for f in families]
               + [["majority answer (chance)", chance["vqa_overall"], "", "", "", ""]]),
        "",
        _table(["retrieval (stage 1)", "image->text R@1", "text->image R@1"],
               [["ITC", r["i2t_r1"], r["t2i_r1"]], [f"ITC, then ITM re-ranking (k={k})", r["itm_i2t_r1"],
                                                    r["itm_t2i_r1"]],
                ["chance", chance["i2t_r1"], chance["t2i_r1"]]]),
        "",
        "## Table 6 in miniature: does ITG help retrieval?",
        "",
        _table(["stage-1 objectives", "image->text R@1", "R@5", "text->image R@1", "R@5"],
               [[label, *(run.get(f"itm_{key}", "-") for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"))]
                for label, run in (("ITC + ITM", r0), ("ITC + ITM + ITG", r))]),  # R@5 needs k >= 5
        "",
        _claim(r["itm_i2t_r1"] > r0["itm_i2t_r1"] and r["itm_t2i_r1"] > r0["itm_t2i_r1"],
               "the paper's Table 6 finds that ITG raises R@1 both ways (image->text 84.5 -> 85.4, "
               "text->image 67.2 -> 68.3 on COCO). Here: " + _change(r0, r) + "."),
        "",
        _claim(r["itm_i2t_r1"] > r["i2t_r1"] and r["itm_t2i_r1"] > r["t2i_r1"],
               "ITM re-ranking of ITC's top candidates raises R@1 both ways (the protocol of the paper's "
               "retrieval results). Here: " + _change(r, r, before_key="") + "."),
        "",
        "## Figure 5 in miniature: stage 2 with and without stage-1 representation learning",
        "",
        "![zero-shot VQA accuracy on validation images over stage-2 steps](figure5.png)",
        "",
    ]
    finals = {f: {label: (values[-1] if values else float("nan")) for label, (_, values) in m["figure5"][f].items()}
              for f in families}
    lines += [_table(["LLM", "with stage 1", "without stage 1"],
                     [[name[f], finals[f]["with stage 1"], finals[f]["without stage 1"]] for f in families]), "",
              _claim(all(finals[f]["with stage 1"] > finals[f]["without stage 1"] for f in families),
                     "without representation learning, both LLMs give lower zero-shot VQA accuracy at the end of "
                     "stage 2 (the paper's Figure 5)."), ""]
    types = sorted(k.removeprefix("vqa_") for k in res[families[0]] if k.startswith("vqa_") and k != "vqa_overall")
    lines += ["## OPT against FlanT5", "",
              _table(["metric", *[name[f] for f in families], "majority"],
                     [[f"VQA {t}", *[res[f][f"vqa_{t}"] for f in families], chance.get(f"vqa_{t}", "")] for t in types]
                     + [["CIDEr", *[res[f]["CIDEr"] for f in families], ""]]),
              "",
              _claim(res["t5"]["vqa_overall"] > res["opt"]["vqa_overall"],
                     "the instruction-tuned FlanT5 answers questions better than OPT (the paper's Table 2; the lite "
                     "T5 is not instruction-tuned, only laid out like FlanT5)."), "",
              "## Examples (first test images)", ""]
    for f in families:
        lines += [f"- {name[f]}: " + "; ".join(f"\"{e['caption']}\"" for e in res[f]["examples"])]
    lines += ["", "## Wall time of this run (seconds)", "",
              _table(["step", "s"], [[step, seconds] for step, seconds in m["wall_s"].items()]), ""]
    return "\n".join(lines)

