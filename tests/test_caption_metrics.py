"""COCO caption metrics through pycocoevalcap (Java): hand-worked BLEU, perfect vs shuffled captions,
no leaks between images, and clear errors for bad input, missing Java and SPICE."""

import math
import shutil

import pytest

from blip2_lite.evaluate import coco_caption
from blip2_lite.evaluate.coco_caption import SPICE_NOTE, coco_caption_scores

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption metrics run Java")
FAST = ("Bleu", "ROUGE_L", "CIDEr")  # all but METEOR, whose Java start loads a paraphrase table

REFERENCES = [
    ["a red circle above a blue square", "one red circle over a blue square", "a blue square below a red circle"],
    ["two green triangles side by side", "a pair of green triangles next to each other", "two triangles, both green"],
    ["a yellow star in the top left corner", "one yellow star at the upper left", "a small yellow star top left"],
    ["three purple dots in a row", "a row of three purple dots", "purple dots, three of them, in a line"],
    ["an orange hexagon in the middle", "one orange hexagon at the center", "a hexagon coloured orange in the centre"],
    ["a black line from left to right", "one horizontal black line", "a black line crossing the image"],
]
PERFECT = [refs[0] for refs in REFERENCES]


@needs_java
def test_bleu_by_hand():
    # hypothesis 5 words, reference 6: unigrams a|cat|on|the|mat, 4 in the reference (not "a");
    # bigrams a-cat|cat-on|on-the|the-mat, 2 in it; brevity penalty exp(1 - 6/5)
    scores = coco_caption_scores(["A cat on the mat."], [["The cat sat on the mat"]], metrics=("Bleu",))
    brevity = math.exp(1 - 6 / 5)
    assert scores["Bleu_1"] == pytest.approx(100 * brevity * 4 / 5, abs=1e-6)
    assert scores["Bleu_2"] == pytest.approx(100 * brevity * math.sqrt(4 / 5 * 2 / 4), abs=1e-6)


@needs_java
def test_perfect_captions_score_high_and_shuffled_ones_low():
    perfect = coco_caption_scores(PERFECT, REFERENCES)
    assert set(perfect) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert perfect["Bleu_4"] == pytest.approx(100) and perfect["METEOR"] == pytest.approx(100)
    assert perfect["ROUGE_L"] == pytest.approx(100) and perfect["CIDEr"] > 300
    shuffled = coco_caption_scores(PERFECT[1:] + PERFECT[:1], REFERENCES, metrics=FAST)
    assert shuffled["Bleu_4"] < 1 and shuffled["CIDEr"] < 10 and shuffled["ROUGE_L"] < 20


@needs_java
def test_order_and_line_breaks_do_not_leak_between_images():
    scores = coco_caption_scores(PERFECT[:3] + ["a red square"] * 3, REFERENCES, metrics=FAST)
    order = [4, 0, 5, 2, 1, 3]
    permuted = coco_caption_scores([(PERFECT[:3] + ["a red square"] * 3)[i] for i in order],
                                   [REFERENCES[i] for i in order], metrics=FAST)
    assert permuted == pytest.approx(scores, abs=1e-9)
    # a line break inside a caption must not shift the captions after it onto other images
    broken = [list(refs) for refs in REFERENCES]
    broken[0][1] = "one red circle\rover a blue square"
    assert coco_caption_scores(PERFECT[:3] + ["a red square"] * 3, broken, metrics=FAST) == pytest.approx(scores)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="predictions has 2 captions but references has 1"):
        coco_caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        coco_caption_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"predictions\[0\] must be a string"):
        coco_caption_scores([None], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\]\[1\] must be a string"):
        coco_caption_scores(["a"], [["a", 3]])
    with pytest.raises(ValueError, match=r"references\[0\] must be a list of strings"):
        coco_caption_scores(["a"], ["a"])


def test_spice_and_missing_java_are_explained(monkeypatch):
    with pytest.raises(ValueError, match="SPICE is not reported") as error:
        coco_caption_scores(["a"], [["a"]], metrics=("CIDEr", "SPICE"))
    assert str(error.value) == SPICE_NOTE
    monkeypatch.setattr(coco_caption.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="openjdk-17-jre-headless"):
        coco_caption_scores(["a"], [["a"]])


@needs_java
def test_one_meteor_process_serves_every_score(monkeypatch):
    captions = PERFECT[:3] + ["a red square"] * 3
    coco_caption.close_meteor()
    first = coco_caption_scores(captions, REFERENCES, metrics=("METEOR",))["METEOR"]
    process = coco_caption.meteor_scorer().meteor_p
    assert coco_caption_scores(PERFECT, REFERENCES, metrics=("METEOR",))["METEOR"] == pytest.approx(100)
    assert coco_caption_scores(captions, REFERENCES, metrics=("METEOR",))["METEOR"] == first
    assert coco_caption.meteor_scorer().meteor_p is process and process.poll() is None
    # a call interrupted mid-exchange stops the process; the next call starts a fresh one, same score
    scorer = coco_caption.meteor_scorer()
    monkeypatch.setattr(scorer, "_stat", lambda *args: 1 / 0)  # leaves its lock held
    with pytest.raises(ZeroDivisionError):
        coco_caption_scores(captions, REFERENCES, metrics=("METEOR",))
    assert process.poll() is not None
    assert coco_caption_scores(captions, REFERENCES, metrics=("METEOR",))["METEOR"] == first
