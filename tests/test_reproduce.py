"""``python -m blip2_lite reproduce`` end to end on a tiny world with the smoke presets: every table,
the Figure 5 curves, the results files, a claim verdict per table, and a rerun from the command line
that reuses the cache."""

import json
from dataclasses import replace

import pytest

from blip2_lite.__main__ import main
from blip2_lite.families import FAMILIES
from blip2_lite.lite import presets, shapes_world
from blip2_lite.reproduce import REPRODUCE_PRESETS, reproduce, seeded

SIZES = {"train": 24, "val": 8, "test": 8}


@pytest.fixture(autouse=True)
def quick_llms(monkeypatch):
    for family in sorted(FAMILIES):
        quick = replace(presets.LLM_TRAIN[family], steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3)
        monkeypatch.setitem(presets.LLM_TRAIN, family, quick)


def test_report_has_every_table_and_a_verdict_per_claim(tmp_path, monkeypatch, capsys):
    report = reproduce("smoke", root=tmp_path / "cache", out_dir=tmp_path / "out", sizes=SIZES, progress=False)
    text = report.read_text()
    for heading in ("Table 1 in miniature", "Table 6 in miniature", "Figure 5 in miniature", "OPT against FlanT5"):
        assert heading in text
    assert text.count(" here**: ") == 4  # ITG, ITM re-ranking, Figure 5, OPT vs FlanT5: "holds" or "does not hold"
    assert (tmp_path / "out" / "figure5.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for family in FAMILIES:
        answers = json.loads((tmp_path / "out" / f"answers_{family}.json").read_text())
        assert len(answers) == 6 * SIZES["test"] and set(answers[0]) == {"question_id", "answer"}
        captions = json.loads((tmp_path / "out" / f"captions_{family}.json").read_text())
        assert len(captions) == SIZES["test"] and set(captions[0]) == {"image_id", "caption"}
        assert 0 <= metrics["results"][family]["CIDEr"] and 0 <= metrics["results"][family]["vqa_overall"] <= 100
        for label, (steps, values) in metrics["figure5"][family].items():
            assert steps == [2, 4] and len(values) == 2, label  # val VQA at each validation of stage 2
    assert metrics["retrieval"] != metrics["retrieval_no_itg"]  # two different stage-1 runs

    first_times = metrics["wall_s"]
    for split, size in SIZES.items():  # the command line builds the default world: make it this tiny one
        monkeypatch.setitem(shapes_world.DEFAULT_SIZES, split, size)
    main(["reproduce", "--preset", "smoke", "--root", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip().endswith("report.md")
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert again["results"] == metrics["results"]  # cached runs, same decoding: the same numbers
    assert again["wall_s"]["stage 1"] < first_times["stage 1"]

    main(["reproduce", "--preset", "smoke", "--root", str(tmp_path / "cache"), "--out", str(tmp_path / "deeper"),
          "--rerank-k", str(SIZES["test"])])  # every test image re-ranked: R@5 after ITM is defined
    deeper = json.loads((tmp_path / "deeper" / "metrics.json").read_text())
    assert metrics["rerank_k"] == 2 and deeper["rerank_k"] == SIZES["test"]
    assert "itm_t2i_r5" not in metrics["retrieval"] and "itm_t2i_r5" in deeper["retrieval"]
    assert deeper["results"] == metrics["results"]  # stage 2 and the runners are untouched by k
    assert f"top k={SIZES['test']} (LAVIS uses 128" in (tmp_path / "deeper" / "report.md").read_text()


def test_cli_refuses_an_unknown_preset_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--preset", "huge"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.fixture
def registries():
    """``seeded`` registers presets: put the registries back as they were."""
    saved = [(registry, dict(registry)) for registry in (presets.STAGE1_PRESETS, presets.STAGE2_PRESETS)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("name", sorted(REPRODUCE_PRESETS))
def test_each_ablation_differs_from_its_run_in_the_ablated_part_only(name, seed, registries):
    chosen = seeded(name, seed)
    full, no_itg = presets.STAGE1_PRESETS[chosen.stage1], presets.STAGE1_PRESETS[chosen.stage1_no_itg]
    assert full.itg and not no_itg.itg and replace(no_itg, itg=True) == full  # Table 6: only ITG differs
    with_stage1, without = presets.STAGE2_PRESETS[chosen.stage2], presets.STAGE2_PRESETS[chosen.stage2_no_stage1]
    assert with_stage1.stage1 == chosen.stage1 and without.skip_stage1 and not with_stage1.skip_stage1
    assert replace(without, skip_stage1=False) == with_stage1  # Figure 5: only stage 1 differs


@pytest.mark.parametrize("name", sorted(REPRODUCE_PRESETS))
def test_a_seed_changes_every_runs_seed_and_nothing_else(name, registries):
    plain, chosen = REPRODUCE_PRESETS[name], seeded(name, 7)
    assert seeded(name, None) == plain
    for field in ("stage1", "stage1_no_itg", "stage2", "stage2_no_stage1"):
        registry = presets.STAGE1_PRESETS if field.startswith("stage1") else presets.STAGE2_PRESETS
        before, after = registry[getattr(plain, field)], registry[getattr(chosen, field)]
        assert getattr(chosen, field) == f"{getattr(plain, field)}-seed7" and after.train.seed == 7 != before.train.seed
        link = {"stage1": before.stage1} if registry is presets.STAGE2_PRESETS else {}
        assert replace(after, train=before.train, **link) == before
