import pytest
import torch

from blip2_lite.evaluate.captioning import caption_image_gap, caption_scores
from blip2_lite.evaluate.retrieval import recalls, semantic_recall_at_1


def test_recalls_follow_the_retrieval_protocol():
    text_image = torch.tensor([0, 0, 1, 1, 2, 2])  # 3 images, 2 captions each
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: own caption 0 first
        [0.5, 0.0, 0.1, 0.2, 0.0, 0.0],  # image 1: best own caption (3) second
        [0.0, 0.05, 0.0, 0.0, 0.1, 0.3],  # image 2: own caption 5 first
    ])
    r = recalls(scores, text_image, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(100 * 2 / 3) and r["i2t_r2"] == pytest.approx(100)
    # every text finds its own image first except caption 2 (image 1), which ranks image 0 first
    assert r["t2i_r1"] == pytest.approx(100 * 5 / 6) and r["t2i_r2"] == pytest.approx(100)
    relevant = text_image[None, :] == torch.arange(3)[:, None]
    relevant[0, 2] = True  # caption 2 also describes image 0: semantically right
    semantic = semantic_recall_at_1(scores, relevant)
    assert semantic["t2i_semantic_r1"] == pytest.approx(100) and semantic["i2t_semantic_r1"] == pytest.approx(100 * 2 / 3)


def test_caption_image_gap_is_zero_for_a_blind_captioner_and_positive_for_one_that_looks():
    references = [["a red circle", "one red circle"], ["a blue square", "one blue square"],
                  ["a green star", "one green star"]]
    looking = ["a red circle", "a blue square", "a green star"]
    assert caption_scores(looking, references)["unigram_f1"] == pytest.approx(100)
    # against the next image's references only "a" overlaps: F1 = 1/3 each
    assert caption_image_gap(looking, references) == pytest.approx(100 - 100 / 3)
    assert caption_image_gap(["a blue square"] * 3, references) == pytest.approx(0)  # fluent, blind
    with pytest.raises(ValueError, match="two images"):
        caption_image_gap(["a red circle"], references[:1])
