"""The Q-Former initialised from the pretrained MiniLM BERT reproduces that BERT's text side."""

import pytest
import torch
from transformers import BertModel

from blip2_lite.convert.bert import DEC_TOKEN, qformer_from_bert, resolve_bert


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    qformer, tokenizer = qformer_from_bert(num_query_tokens=8, encoder_width=1280)
    bert = BertModel.from_pretrained(resolve_bert("minilm"))
    return qformer.eval(), tokenizer, bert.eval()


def test_text_side_reproduces_bert_hidden_states(loaded):
    qformer, tokenizer, bert = loaded
    batch = tokenizer(
        ["a large red circle to the left of a small blue square", "two green stars"],
        padding=True, return_tensors="pt",
    )
    with torch.no_grad():
        expected = bert(**batch).last_hidden_state
        got = qformer(batch.input_ids, batch.attention_mask, use_queries=False).text_output
    assert batch.attention_mask[1].sum() < batch.attention_mask.shape[1]  # padding is exercised
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_query_ffn_starts_as_a_copy_and_dec_is_added(loaded):
    qformer, tokenizer, _ = loaded
    for layer in qformer.layers:
        assert torch.equal(layer.query_ffn.fc1.weight, layer.text_ffn.fc1.weight)
        assert layer.query_ffn.fc1.weight.data_ptr() != layer.text_ffn.fc1.weight.data_ptr()  # a copy, not shared
    assert tokenizer.bos_token == DEC_TOKEN
    assert len(tokenizer) == 30523 == qformer.config.vocab_size
    assert qformer.config.hidden_size == 384 and qformer.config.num_layers == 6
    # cross-attention in every 2nd layer, random
    assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False] * 3


def test_dropout_override():
    qformer, _ = qformer_from_bert(num_query_tokens=2, encoder_width=16, dropout=0.0)
    assert qformer.config.hidden_dropout == qformer.config.attention_dropout == 0.0
    with pytest.raises(ValueError, match="dropout"):
        qformer_from_bert(num_query_tokens=2, encoder_width=16, dropout=1.0)
