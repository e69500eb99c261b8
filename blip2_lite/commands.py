"""The course's model from the command line: ``caption``, ``vqa``, ``retrieve`` and ``attention``.

Each command takes image files and defaults to the lite model (the course presets, trained on first
use with progress bars and cached, like the notebooks' runs); ``--model`` takes a Hugging Face
BLIP-2 checkpoint (``Salesforce/blip2-opt-2.7b`` for captions and answers,
``Salesforce/blip2-itm-vit-g`` for retrieval and attention; online) or a local copy of one.
``python -m blip2_lite`` parses the arguments and turns every error of bad input into one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .attention_maps import cross_attention_maps, itm_gradcam, plot_maps, token_grid, word_maps
from .encoders.images import load_image
from .evaluate.retrieval import itc_embeddings, itc_score_matrix, itm_rerank
from .evaluate.tasks import vqa_decoding
from .stage1 import Blip2Stage1
from .stage2 import Blip2


def _lite(preset: str, family: str | None, device: str):
    """The lite stage-1 model, or the stage-2 model of ``family``, with the frozen encoder attached
    so that it reads image files (the runs themselves train on cached features)."""
    from .lite import load_lite_world, run_stage1, run_stage2
    from .lite.presets import STAGE2_PRESETS

    world = load_lite_world()
    stage1, _, _ = run_stage1(STAGE2_PRESETS[preset].stage1 if family else preset, world=world, device=device)
    model = run_stage2(family, preset, world=world, stage1_model=stage1, device=device)[0] if family else stage1
    model.image_encoder = world.encoder.requires_grad_(False).to(device)
    return model.eval()


def load_model(kind: type, model: str | None, preset: str, family: str, device: str):
    """``(model, tokenizer)``: a ``Blip2`` (captions, answers; it holds its LLM's tokenizer) or a
    ``Blip2Stage1`` (retrieval, attention) with the Q-Former's BERT tokenizer."""
    from .convert.bert import bert_tokenizer

    if model is None:
        loaded = _lite(preset, family if kind is Blip2 else None, device)
        return loaded, (loaded.tokenizer if kind is Blip2 else bert_tokenizer())
    from .convert.pretrained import _tokenizer_if_present, from_pretrained, resolve_checkpoint

    loaded = from_pretrained(model, device=device)
    if not isinstance(loaded, kind):
        wanted = "a captioning checkpoint (e.g. Salesforce/blip2-opt-2.7b)" if kind is Blip2 else \
            "a retrieval checkpoint (e.g. Salesforce/blip2-itm-vit-g)"
        raise ValueError(f"{model} is not {wanted}")
    tokenizer = loaded.tokenizer if kind is Blip2 else _tokenizer_if_present(resolve_checkpoint(model))
    if tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files")
    return loaded, tokenizer


def load_images(paths: list[str]):
    """The image files, decoded; a missing or undecodable file is named (before any model loads)."""
    if not paths:
        raise ValueError("no image given")
    return [load_image(Path(p)) for p in paths]


def check_question(question: str) -> str:
    if not question.strip():
        raise ValueError("the question is empty")
    return question.strip()


def caption(model: Blip2, images, prompt: str = "", num_beams: int = 5) -> list[str]:
    return model.generate(images, prompt, num_beams=num_beams, max_new_tokens=30)


def vqa(model: Blip2, image, question: str) -> str:
    """The answer with the family's prompt and LAVIS's zero-shot decoding (``evaluate.tasks.vqa_decoding``)."""
    prompt = model.family.vqa_prompt.format(check_question(question))
    return model.generate([image], prompt, **vqa_decoding(model.family))[0]


def _tokens(model: Blip2Stage1, texts: list[str], tokenizer):
    if not texts or not all(t.strip() for t in texts):
        raise ValueError("give at least one non-empty text")
    batch = tokenizer(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    device = next(model.parameters()).device
    return batch.input_ids.to(device), batch.attention_mask.to(device)


@torch.no_grad()
def retrieve(model: Blip2Stage1, tokenizer, images, texts: list[str]) -> dict:
    """ITC scores of every (image, text) pair, and ITM + ITC scores for ranking texts per image
    (``i2t``) and images per text (``t2i``): every candidate is re-ranked, the sets given on a command
    line being small. Each ``[images, texts]``."""
    features = model.image_encoder(model.image_encoder.preprocess(images))
    ids, mask = _tokens(model, texts, tokenizer)
    itc = itc_score_matrix(*itc_embeddings(model, features, ids, mask))
    i2t, t2i = itm_rerank(model, features, ids, mask, itc, k_test=max(len(texts), len(images)))
    return {"itc": itc, "i2t": i2t, "t2i": t2i}


def check_output(out: str) -> Path:
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of {out} does not exist")
    return out


def attention(model: Blip2Stage1, tokenizer, image, out: str, caption_text: str | None = None) -> Path:
    """Save the queries' maps of the last cross-attention layer (heads averaged), or, with a caption,
    each word's map and the ITM Grad-CAM, as a PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = check_output(out)
    grid = token_grid(model.image_encoder)
    embeds = model.image_embeds(model.image_encoder.preprocess([image]).to(next(model.parameters()).device))
    if caption_text is None:
        maps = cross_attention_maps(model.qformer, embeds, grid)
        last = maps.layers[-1]
        heats = maps.layer(last)[0].mean(dim=0)
        fig = plot_maps(image, heats.cpu(), [f"layer {last}, query {q}" for q in range(len(heats))])
    else:
        ids, mask = _tokens(model, [caption_text], tokenizer)
        words = tokenizer.convert_ids_to_tokens(ids[0])[1:-1]  # without [CLS] and [SEP]
        per_word = word_maps(model, embeds, ids, mask, grid)[0, 1:-1]
        cams, logits = itm_gradcam(model, embeds, ids, mask, grid)
        heats = torch.cat([per_word, cams.maps[0].sum(dim=(0, 1, 2))[None]]).cpu()
        fig = plot_maps(image, heats, [f"'{w}'" for w in words] + [f"ITM Grad-CAM ({logits[0, 1]:.2f})"])
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
