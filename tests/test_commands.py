"""The course's model from the command line (caption, vqa, retrieve, attention) on a tiny lite world
with the smoke presets: output per input, the lite model trained once then reused, and bad input
ending in one line with exit code 2."""

from dataclasses import replace

import pytest
from PIL import Image

from blip2_lite.__main__ import main
from blip2_lite.families import FAMILIES
from blip2_lite.lite import presets, shapes_world
from blip2_lite.lite.world import load_lite_world

SIZES = {"train": 24, "val": 8, "test": 8}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiny world in its own cache (the commands build the default world: made this one), and
    two of its test images as files."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIP2_LITE_CACHE", str(cache))
        for split, size in SIZES.items():
            patch.setitem(shapes_world.DEFAULT_SIZES, split, size)
        for family in FAMILIES:
            patch.setitem(presets.LLM_TRAIN, family, replace(presets.LLM_TRAIN[family], steps=3, warmup_steps=1,
                                                             eval_every=3, checkpoint_every=3))
        world = load_lite_world(progress=False)
        folder = tmp_path_factory.mktemp("images")
        paths = []
        for i in range(2):
            paths.append(str(folder / f"scene{i}.png"))
            world.dataset["test"][i]["image"].save(paths[-1])
        yield paths


def run(capsys, *argv):
    main([*argv, "--preset", "smoke"])
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_caption_and_vqa_answer_per_image(images, capsys, family):
    lines = run(capsys, "caption", *images, "--family", family)
    assert [line.split(": ")[0] for line in lines[-2:]] == images
    answer = run(capsys, "vqa", images[0], "what color is the circle?", "--family", family)
    assert answer[-1].startswith(f"{images[0]}:")


def test_retrieve_ranks_both_ways(images, capsys):
    texts = ["a red circle", "two blue squares", "a green triangle at the top"]
    lines = run(capsys, "retrieve", "--images", *images, "--texts", *texts)[-5:]
    assert [line.split(": ")[0] for line in lines[:2]] == images
    assert all("best image" in line for line in lines[2:])


def test_attention_writes_a_picture_with_and_without_a_caption(images, capsys, tmp_path):
    for name, extra in (("queries.png", []), ("words.png", ["--caption", "a small red circle"])):
        out = tmp_path / name
        run(capsys, "attention", images[0], "--out", str(out), *extra)
        assert Image.open(out).format == "PNG"


def test_bad_input_ends_in_one_line(images, capsys, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for argv in (["caption", str(tmp_path / "missing.png")], ["caption", str(broken)],
                 ["vqa", images[0], "  "], ["attention", images[0], "--out", str(tmp_path / "no" / "map.png")]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--preset", "smoke"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), (argv, err)


def test_model_option_takes_a_local_hugging_face_checkpoint(images, capsys, tmp_path):
    from hf_tiny import tiny_conditional, tiny_retrieval, word_tokenizer

    captioner, matcher = tmp_path / "captioner", tmp_path / "matcher"
    tiny_conditional(captioner, "opt")
    tiny_retrieval(matcher, num_layers=3, cross_attention_freq=2, num_query_tokens=4)
    for folder in (captioner, matcher):
        word_tokenizer().save_pretrained(folder)  # ids below both tiny vocabularies
    lines = run(capsys, "caption", *images, "--model", str(captioner))
    assert [line.split(": ")[0] for line in lines] == images
    lines = run(capsys, "retrieve", "--images", *images, "--texts", "w2 w3", "w4", "--model", str(matcher))
    assert len(lines) == 4 and "best image" in lines[-1]
    with pytest.raises(SystemExit) as exit_:
        main(["caption", images[0], "--model", str(matcher)])  # a retrieval checkpoint cannot caption
    assert exit_.value.code == 2 and "not a captioning checkpoint" in capsys.readouterr().err
