"""Salesforce checkpoints in blip2_lite: the Hugging Face layouts end to end (pixels in, logits and
text out, equal to transformers), LAVIS's stage-1 .pth with its ITG head, and the full-size
architectures' parameter counts (meta device, no memory)."""

import json

import pytest
import torch
from transformers import (
    BertConfig,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
)
from transformers.models.bert.modeling_bert import BertLMPredictionHead

from blip2_lite.convert.engine import CheckpointError
from blip2_lite.convert.hf import qformer_config_from_hf
from blip2_lite.convert.lavis import load_lavis_stage1
from blip2_lite.convert.pretrained import (
    SALESFORCE_TEXT_CONFIGS,
    blip2_from_config,
    from_pretrained,
    salesforce_config,
)
from blip2_lite.parameters import count_parameters
from blip2_lite.stage1 import Blip2Stage1
from blip2_lite.stage2 import Blip2

from hf_tiny import (
    IMAGE_TOKEN,
    PAD,
    VOCAB,
    padded_text,
    tiny_conditional,
    tiny_retrieval,
)

TOL = 1e-5


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_from_pretrained_pixels_to_logits_and_text(tmp_path, family):
    reference = tiny_conditional(tmp_path, family)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, Blip2) and ours.image_encoder is not None
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = reference.config.num_query_tokens
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    hf_ids = torch.cat([torch.full((2, q), IMAGE_TOKEN), ids], dim=1)
    extra = {"decoder_input_ids": torch.tensor([[PAD, 3], [PAD, 4]])} if family == "t5" else {}
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=hf_ids, **extra).logits
        got = ours(ids, pixel_values=pixels, **extra).logits
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)

    settings = dict(max_new_tokens=6, num_beams=3, pad_token_id=PAD)
    expected_ids = reference.generate(pixel_values=pixels, input_ids=hf_ids, **settings)
    if family == "opt":
        expected_ids = expected_ids[:, hf_ids.shape[1]:]
    got_ids = ours.generate_ids(ours.soft_prompt(pixel_values=pixels), ids, **settings)
    assert torch.equal(got_ids, expected_ids)


def test_from_pretrained_in_bf16_keeps_the_bridge_in_fp32(tmp_path):
    tiny_conditional(tmp_path, "t5")
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.language_model.dtype == torch.bfloat16 and ours.image_encoder.model.cls_token.dtype == torch.bfloat16
    assert ours.qformer.query_tokens.dtype == torch.float32 and ours.language_projection.weight.dtype == torch.float32
    logits = ours(torch.tensor([[5, 6]]), pixel_values=torch.randn(1, 3, 32, 32),
                  decoder_input_ids=torch.tensor([[PAD]])).logits
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="bfloat16"):
        from_pretrained(tmp_path, dtype=torch.float16)  # FlanT5 overflows in fp16


def test_from_pretrained_retrieval_checkpoint(tmp_path):
    reference = tiny_retrieval(tmp_path, num_layers=3, cross_attention_freq=2, num_query_tokens=4)
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, Blip2Stage1)
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = padded_text(2, 6)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        got = ours.itm_logits(ours.image_embeds(images=pixels), ids, mask)
    torch.testing.assert_close(got, expected.logits_per_image, atol=TOL, rtol=0)


def test_from_pretrained_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not be downloaded"):
        from_pretrained("Salesforce/blip2-opt-2.7b")


def test_unknown_architecture_is_refused(tmp_path):
    tiny_conditional(tmp_path, "opt")
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["Blip2Model"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        from_pretrained(tmp_path)


# -- LAVIS's original stage-1 layout ---------------------------------------------------------------------

_HF_TO_LAVIS = [  # transformers' retrieval names -> LAVIS's (a BertLMHeadModel under "Qformer.")
    ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
    ("qformer.encoder.", "Qformer.bert.encoder."),
    ("embeddings.word_embeddings.", "Qformer.bert.embeddings.word_embeddings."),
    ("embeddings.position_embeddings.", "Qformer.bert.embeddings.position_embeddings."),
    ("vision_projection.", "vision_proj."),
    ("text_projection.", "text_proj."),
    ("vision_model.post_layernorm.", "ln_vision."),
]


def lavis_checkpoint(reference: Blip2ForImageTextRetrieval, path):
    """A LAVIS-layout ``blip2_pretrained.pth`` carrying ``reference``'s weights plus a random ITG head."""
    state = {}
    for key, tensor in reference.state_dict().items():
        if key.startswith("vision_model.") and "post_layernorm" not in key:
            continue  # LAVIS's stage-1 file holds no vision tower
        for hf, lavis in _HF_TO_LAVIS:
            if key.startswith(hf):
                key = lavis + key[len(hf):]
                break
        state[key.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                                  ".crossattention.self.")] = tensor
    torch.manual_seed(1)
    head = BertLMPredictionHead(BertConfig(hidden_size=32, vocab_size=VOCAB, layer_norm_eps=1e-12)).eval()
    with torch.no_grad():
        head.transform.LayerNorm.weight.normal_(1, 0.1)
        head.bias.normal_()
        head.decoder.weight = torch.nn.Parameter(state["Qformer.bert.embeddings.word_embeddings.weight"].clone())
        head.decoder.bias = head.bias  # tied, as BertLMHeadModel does
    state |= {f"Qformer.cls.predictions.{k}": v for k, v in head.state_dict().items()}
    state["temp"] = torch.tensor(0.05)
    torch.save({"model": state}, path)
    return head


def test_lavis_stage1_checkpoint_with_its_itg_head(tmp_path):
    reference = tiny_retrieval(tmp_path, num_layers=3, cross_attention_freq=2, num_query_tokens=4)
    head = lavis_checkpoint(reference, tmp_path / "blip2_pretrained.pth")
    ours, vision = load_lavis_stage1(tmp_path / "blip2_pretrained.pth", num_heads=4)
    ours.eval()
    assert vision == {} and ours.temp.item() == pytest.approx(0.05)
    features = torch.randn(2, 5, reference.config.vision_config.hidden_size)
    ids, mask = padded_text(2, 6)
    with torch.no_grad():
        image_embeds = ours.image_embeds(image_features=features)
        expected_itm = reference.itm_head(reference.qformer(
            query_embeds=reference.query_tokens.expand(2, -1, -1), encoder_hidden_states=image_embeds,
        ).last_hidden_state)  # only the query part is compared below via the queries-only pass
        got = ours.qformer(image_embeds=image_embeds).query_output
        torch.testing.assert_close(ours.itm_head(got), expected_itm, atol=TOL, rtol=0)
        text = ours.qformer(ids, mask, mask="itg", use_queries=False).text_output
        torch.testing.assert_close(ours.itg_logits(text), head(text), atol=TOL, rtol=0)


def test_lavis_untied_head_is_refused(tmp_path):
    reference = tiny_retrieval(tmp_path, num_layers=2, cross_attention_freq=2, num_query_tokens=4)
    lavis_checkpoint(reference, tmp_path / "x.pth")
    checkpoint = torch.load(tmp_path / "x.pth", weights_only=True)
    checkpoint["model"]["Qformer.cls.predictions.decoder.weight"] += 1
    torch.save(checkpoint, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="must be tied"):
        load_lavis_stage1(tmp_path / "x.pth", num_heads=4)


# -- full size, on the meta device ---------------------------------------------------------------------------


count = count_parameters


VIT_G_BLOCKS, VIT_G_WIDTH = 39, 1408


@pytest.mark.parametrize("name", sorted(SALESFORCE_TEXT_CONFIGS))
def test_full_size_parameter_counts_match_transformers(name):
    config = salesforce_config(name)
    with torch.device("meta"):
        ours, reference = blip2_from_config(config), Blip2ForConditionalGeneration(config)
    # transformers stores EVA's (always zero) key bias as parameters: 1408 per block
    assert count(ours) == count(reference) - VIT_G_BLOCKS * VIT_G_WIDTH
    assert count(ours.language_model) == count(reference.language_model)
    assert count(ours.qformer) == count(reference.qformer) + reference.query_tokens.numel()


def test_opt_2_7b_parts_match_the_published_figures():
    with torch.device("meta"):
        model = blip2_from_config(salesforce_config("Salesforce/blip2-opt-2.7b"))
    vision = count(model.image_encoder) + count(model.ln_vision) + VIT_G_BLOCKS * VIT_G_WIDTH
    assert round(vision / 1e6, 2) == 985.95
    assert round(count(model.language_model) / 1e6, 2) == 2651.60
    trainable = count(model.qformer) + count(model.language_projection)
    assert round(trainable / 1e6) == 107  # the paper's Table 1: 107M trainable parameters
    total = count(model) + VIT_G_BLOCKS * VIT_G_WIDTH
    assert round(total / 1e6, 2) == 3744.68  # mmpretrain's 3770.47M also counts the Q-Former's text side


def test_retrieval_model_is_the_paper_188m_qformer_plus_vit_g():
    config = salesforce_config("Salesforce/blip2-itm-vit-g")
    with torch.device("meta"):
        reference = Blip2ForImageTextRetrieval(config)
        qformer_config = qformer_config_from_hf(config.qformer_config.to_dict(), config.num_query_tokens)
        ours = Blip2Stage1(qformer_config, dec_token_id=qformer_config.vocab_size - 1)
    # blip2_lite adds the ITG head's transform and bias (the word embeddings are tied) and the temperature;
    # its ln_vision is transformers' vision_model.post_layernorm
    itg_extra = count(ours.lm_head) + ours.temp.numel()
    assert count(ours) - itg_extra - count(ours.ln_vision) == count(reference) - count(reference.vision_model)
    assert round((count(ours) - count(ours.ln_vision)) / 1e6, 1) == 186.7  # the paper rounds its Q-Former to 188M
