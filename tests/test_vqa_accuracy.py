"""VQAv2 accuracy against hand-worked cases of the official script's normalisation and scoring."""

import pytest

from blip2_lite.evaluate.vqa import CONTRACTIONS, PROTOCOLS, normalize_answer, vqa_accuracy, vqa_scores


@pytest.mark.parametrize("answer, normalized", [
    ("the two dogs", "2 dogs"),
    ("1,000", "1000"),  # a digit-comma-digit deletes the punctuation instead of spacing it
    ("t-shirt", "t shirt"),  # a mark between letters becomes a space
    ("yes!", "yes"),
    ("Yes, it is.", "yes it is"),  # ", " deletes the comma; a final "." goes
    ("3.5", "3.5"),  # a "." before a digit stays
    ("dont", "don't"),  # the script's contraction table
    ("None", "0"),
    ("  An\tapple\n", "apple"),
])
def test_normalisation_by_hand(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_contraction_table_is_the_scripts():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # its one reversed entry, kept as it is


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_scores_by_hand(protocol):
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7, protocol) == pytest.approx(0.9)  # (7 * 1 + 3 * 2/3) / 10
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8, protocol) == pytest.approx(0.6)  # (8 * 2/3 + 2 * 1/3) / 10
    assert vqa_accuracy("a dog", ["dog"] * 4 + ["puppy"] * 6, protocol) == 1.0  # >= 3 others agree every time
    assert vqa_accuracy("cat", ["dog"] * 4 + ["puppy"] * 6, protocol) == 0.0
    assert vqa_accuracy("1", ["1"], protocol) == 0.0  # one annotator: no other answer to agree with


def test_protocols_differ_where_the_scripts_do():
    ten_twos = ["2"] * 10
    # the official script leaves the prediction as it is when all answers agree; LAVIS normalises it
    assert vqa_accuracy("two", ten_twos, "official") == 0.0
    assert vqa_accuracy("two", ten_twos, "lavis") == 1.0
    assert vqa_accuracy("two", ten_twos, "symmetric") == 1.0
    # LAVIS gives differing answers only processPunctuation: their articles stay
    articles = ["a dog"] * 5 + ["the dog"] * 5
    assert vqa_accuracy("dog", articles, "lavis") == 0.0
    assert vqa_accuracy("dog", articles, "official") == vqa_accuracy("dog", articles, "symmetric") == 1.0
    # only the symmetric protocol normalises answers that all agree
    assert vqa_accuracy("circle", ["a circle"] * 10, "symmetric") == 1.0
    assert vqa_accuracy("circle", ["a circle"] * 10, "official") == 0.0


def test_per_type_aggregation():
    scores = vqa_scores(["2", "red", "blue"], [["2"] * 10, ["red"] * 10, ["red"] * 10], ["count", "color", "color"])
    assert scores == pytest.approx({"vqa_overall": 100 * 2 / 3, "vqa_count": 100.0, "vqa_color": 50.0})


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="prediction must be a string"):
        vqa_accuracy(2, ["2"] * 10)
    with pytest.raises(ValueError, match="answers must be a non-empty list"):
        vqa_accuracy("2", [])
    with pytest.raises(ValueError, match=r"answers\[1\] must be a string"):
        vqa_accuracy("2", ["2", None])
    with pytest.raises(ValueError, match="unknown protocol"):
        vqa_accuracy("2", ["2"], protocol="vqav2")
    with pytest.raises(ValueError, match=r"question 1: answers must be a non-empty list"):
        vqa_scores(["2", "3"], [["2"], []], ["count", "count"])
    with pytest.raises(ValueError, match="differ in length"):
        vqa_scores(["2"], [["2"], ["3"]], ["count"])
