"""Image-text retrieval: ITC ranking of every pair, then ITM re-ranking of each query's top k.

As LAVIS evaluates BLIP-2 (``lavis/models/blip2_models/blip2.py``, ``compute_sim_matrix``, and
``lavis/tasks/retrieval.py``, ``_report_metrics``): the ITC score of a pair is the raw cosine of
the best-matching query (``losses.itc_similarity``); each image's top ``k_test`` texts, and each
text's top ``k_test`` images, are re-scored as ITM match logit (averaged over queries) + ITC
cosine, and every other cell is left out of the ranking (LAVIS: -100; here -inf). Image->text rank
is the best rank among the image's captions; text->image rank is the rank of its one image;
R@K = % of queries with rank < K; ``r_mean`` is the mean of the two directions' mean recall
(LAVIS's ``txt_r_mean`` = our ``i2t_r_mean``, ``img_r_mean`` = ``t2i_r_mean``).

After re-ranking only the top k, every candidate outside it is tied, so a re-ranked R@K with K > k
says nothing: it is not reported (and asking for it raises), unless k covers every candidate.

A *semantic* recall is reported beside the exact one when a relevance matrix is given: the top
result counts when its content fits the query, even if it is another image that the caption also
describes (captions of synthetic scenes can fit several).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..devices import autocast
from ..inputs import check_index
from ..losses import itc_similarity

K_TEST = 128  # LAVIS's k_test for BLIP-2 on COCO and Flickr30k
RECALL_KS = (1, 5, 10)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_text_image(text_image, num_images: int, num_texts: int) -> torch.Tensor:
    """``text_image`` as a 1-D long tensor of valid image indices, every image having a caption."""
    text_image = torch.as_tensor(text_image).cpu()
    if text_image.dim() != 1 or len(text_image) != num_texts:
        raise ValueError(f"text_image must give the image of each of the {num_texts} texts, "
                         f"got shape {tuple(text_image.shape)}")
    check_index(text_image, num_images, "text_image", "images")
    captioned = torch.zeros(num_images, dtype=torch.bool)
    captioned[text_image] = True
    if not bool(captioned.all()):  # an uncaptioned image would score its image->text rank as 0
        raise ValueError(f"text_image gives image {int((~captioned).nonzero()[0])} no caption")
    return text_image.long()


def _check_relevant(relevant, num_images: int, num_texts: int) -> torch.Tensor:
    relevant = torch.as_tensor(relevant).cpu()
    if relevant.shape != (num_images, num_texts):
        raise ValueError(f"relevant must be [{num_images} images, {num_texts} texts], "
                         f"got shape {tuple(relevant.shape)}")
    return relevant.bool()


def recalls(scores: torch.Tensor, text_image: torch.Tensor, ks=RECALL_KS) -> dict[str, float]:
    """R@K in both directions from ``scores [N_images, M_texts]``; ``text_image[j]`` is text j's image."""
    scores = scores.cpu()
    num_images, num_texts = scores.shape
    text_image = _check_text_image(text_image, num_images, num_texts)
    is_own = text_image[None, :] == torch.arange(num_images)[:, None]  # [N, M]
    # image -> text: position of the best-ranked own caption
    order = scores.argsort(dim=1, descending=True)
    i2t_rank = is_own.gather(1, order).float().argmax(dim=1)
    # text -> image: position of the one own image
    order = scores.t().argsort(dim=1, descending=True)
    t2i_rank = (order == text_image[:, None]).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return out


def recall_means(metrics: dict[str, float], ks=RECALL_KS, prefix: str = "") -> dict[str, float]:
    """LAVIS's summary: each direction's mean over ``ks`` and their mean (``r_mean``)."""
    i2t = sum(metrics[f"{prefix}i2t_r{k}"] for k in ks) / len(ks)
    t2i = sum(metrics[f"{prefix}t2i_r{k}"] for k in ks) / len(ks)
    return {f"{prefix}i2t_r_mean": i2t, f"{prefix}t2i_r_mean": t2i, f"{prefix}r_mean": (i2t + t2i) / 2}


def semantic_recall_at_1(scores: torch.Tensor, relevant: torch.Tensor) -> dict[str, float]:
    """% of queries whose top result is relevant; ``relevant [N, M]``: caption j describes image i."""
    scores = scores.cpu()
    relevant = _check_relevant(relevant, *scores.shape)
    i2t = relevant.gather(1, scores.argmax(dim=1, keepdim=True)).float().mean().item()
    t2i = relevant.t().gather(1, scores.t().argmax(dim=1, keepdim=True)).float().mean().item()
    return {"i2t_semantic_r1": 100.0 * i2t, "t2i_semantic_r1": 100.0 * t2i}


@torch.no_grad()
def itc_embeddings(model, image_features, input_ids, attention_mask, batch_size: int = 128, bf16: bool = False):
    """Normalised ITC features of every image ``[N, Q, E]`` and every text ``[M, E]`` (float32), on the
    model's device. ``bf16``: under bf16 autocast (twice as fast on a CPU with AVX512-BF16; the lite
    course's R@1 moves by less than a point, README)."""
    device = _device(model)
    with autocast(device, enabled=bf16):
        image_itc = [
            model.itc_image(model.image_embeds(image_features=image_features[i : i + batch_size]))[0].float()
            for i in range(0, len(image_features), batch_size)
        ]
        # texts in order of length, each batch cut to its longest: less padding, the same features to ~1e-6
        order = attention_mask.sum(dim=1).argsort(stable=True)
        text_itc = []
        for i in range(0, len(input_ids), batch_size):
            rows = order[i : i + batch_size]
            length = int(attention_mask[rows].nonzero()[:, 1].max()) + 1
            text_itc.append(model.itc_text(input_ids[rows, :length].to(device),
                                           attention_mask[rows, :length].to(device)).float())
    return torch.cat(image_itc), torch.cat(text_itc)[order.argsort()]


def itc_score_matrix(image_itc: torch.Tensor, text_itc: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """``itc_similarity`` of every pair ``[N, M]`` on the CPU, a block of images at a time (the
    per-query cosines of all pairs at once would take N*M*Q floats)."""
    return torch.cat([itc_similarity(image_itc[i : i + batch_size], text_itc).cpu()
                      for i in range(0, len(image_itc), batch_size)])


@torch.no_grad()
def itm_match_logits(model, image_embeds, input_ids, attention_mask, pair_image, pair_text, batch_size: int = 64,
                     progress: bool = False, bf16: bool = True, images_per_group: int = 32) -> torch.Tensor:
    """ITM match logit (``itm_logits[:, 1]``, the mean over queries) of each (image, text) pair.

    ``image_embeds [N, P, D]`` (after the vision LayerNorm) may live on the CPU. Pairs run a group of
    ``images_per_group`` images at a time: the group's image keys/values are computed once on the
    model's device (memory bounded by the group, not N), and its pairs go in order of text length, so
    that a batch pads its texts little (the lite world's test captions have 9 to 30 tokens, 18 on
    average, and batches in arbitrary order were padded to 29: the re-ranking took 1.4x as long).
    """
    device = _device(model)
    pair_image, pair_text = torch.as_tensor(pair_image).long(), torch.as_tensor(pair_text).long()
    lengths = attention_mask.sum(dim=1)
    pair_length = lengths[pair_text]
    group = pair_image.div(images_per_group, rounding_mode="floor")
    logits = torch.empty(len(pair_image))
    if not len(pair_image):
        return logits
    order = (group * (int(pair_length.max()) + 1) + pair_length).argsort(stable=True)
    with tqdm(total=len(order), disable=not progress, desc="ITM re-rank") as bar:
        for rows in order.split(group[order].unique_consecutive(return_counts=True)[1].tolist()):
            images, image_index = pair_image[rows].unique(return_inverse=True)
            with autocast(device, enabled=bf16):  # on a CPU 1.7x faster; ranks barely move
                image_kv = model.qformer.image_keys_values(image_embeds[images].to(device))
                for i in range(0, len(rows), batch_size):
                    batch = rows[i : i + batch_size]
                    text = pair_text[batch]
                    length = int(pair_length[batch].max())  # texts are right-padded: skip all-padding columns
                    logit = model.itm_logits(None, input_ids[text, :length].to(device),
                                             attention_mask[text, :length].to(device),
                                             image_index[i : i + batch_size].to(device), image_kv)
                    logits[batch] = logit[:, 1].float().cpu()
                    bar.update(len(batch))
    return logits


@torch.no_grad()
def itm_rerank(model, image_features, input_ids, attention_mask, itc_scores, k_test: int = K_TEST,
               batch_size: int = 64, progress: bool = False, bf16: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVIS's ``compute_sim_matrix`` after the ITC pass: each image's top ``k_test`` texts and each
    text's top ``k_test`` images (``k_test`` clamped to the number of candidates) get ITM match
    logit + ITC cosine; all other cells -inf. Returns the ``[N, M]`` image->text scores and the
    (separately re-ranked) text->image scores, also ``[N, M]``. ``itc_scores`` is ``[N, M]`` on the
    CPU; ``bf16=False`` scores in full precision."""
    if k_test < 1:
        raise ValueError(f"k_test must be at least 1, got {k_test}")
    num_images, num_texts = itc_scores.shape
    image_embeds = torch.cat([
        model.image_embeds(image_features=image_features[i : i + batch_size]).cpu()  # once per image
        for i in range(0, num_images, batch_size)
    ])
    i2t_top = itc_scores.topk(min(k_test, num_texts), dim=1).indices  # [N, k] texts
    t2i_top = itc_scores.t().topk(min(k_test, num_images), dim=1).indices  # [M, k] images
    i2t_cells = torch.arange(num_images)[:, None] * num_texts + i2t_top
    t2i_cells = t2i_top * num_texts + torch.arange(num_texts)[:, None]
    cells = torch.cat([i2t_cells.flatten(), t2i_cells.flatten()])
    # A pair in both directions' top k is scored once; sorted cells keep an image's pairs together.
    pairs, inverse = cells.unique(return_inverse=True)
    itm = itm_match_logits(model, image_embeds, input_ids, attention_mask, pairs // num_texts, pairs % num_texts,
                           batch_size, progress, bf16)
    scores = itm[inverse] + itc_scores.flatten()[cells]
    i2t, t2i = (torch.full((num_images, num_texts), float("-inf")) for _ in range(2))
    i2t.view(-1)[i2t_cells.flatten()] = scores[: i2t_cells.numel()]
    t2i.view(-1)[t2i_cells.flatten()] = scores[i2t_cells.numel() :]
    return i2t, t2i


def _reranked_ks(ks, k: int, num_candidates: int, explicit: bool, direction: str) -> tuple[int, ...]:
    """The K whose re-ranked R@K means something: K <= k, or any K once k covers every candidate."""
    k = min(k, num_candidates)
    valid = tuple(K for K in ks if K <= k or k == num_candidates)
    if explicit and valid != tuple(ks):
        raise ValueError(f"{direction} R@K for K > rerank_k = {k} is undefined after re-ranking only the top "
                         f"{k}: ask for ks <= {k}, or raise rerank_k")
    return valid


@torch.no_grad()
def retrieval(model, image_features, input_ids, attention_mask, text_image, relevant=None, rerank_k: int = 0,
              progress: bool = False, ks=None, batch_size: int = 64, bf16: bool = True) -> dict[str, float]:
    """Retrieval metrics of ``model`` over every image-text pair.

    ITC ranking: ``i2t_r{K}``, ``t2i_r{K}`` for K in ``ks`` (default ``RECALL_KS``), their means
    ``i2t_r_mean``, ``t2i_r_mean``, ``r_mean``, and with ``relevant [N, M]`` ``i2t_semantic_r1`` and
    ``t2i_semantic_r1``. With ``rerank_k`` (LAVIS's ``k_test``; its BLIP-2 configs use ``K_TEST``)
    the same after ITM re-ranking, prefixed ``itm_``: only the R@K with K <= ``rerank_k`` (module
    docstring; explicit ``ks`` with a larger K raise), and the means only when every K is there.
    Both passes run under bf16 autocast unless ``bf16=False``.
    """
    num_images, num_texts = len(image_features), len(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} differ")
    text_image = _check_text_image(text_image, num_images, num_texts)
    if relevant is not None:
        relevant = _check_relevant(relevant, num_images, num_texts)
    if rerank_k < 0:
        raise ValueError(f"rerank_k must be 0 (no re-ranking) or positive, got {rerank_k}")
    explicit, ks = ks is not None, tuple(RECALL_KS if ks is None else ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks K of R@K, got {ks}")

    scores = itc_score_matrix(*itc_embeddings(model, image_features, input_ids, attention_mask, bf16=bf16))
    metrics = recalls(scores, text_image, ks)
    metrics |= recall_means(metrics, ks)
    if relevant is not None:
        metrics |= semantic_recall_at_1(scores, relevant)
    if rerank_k:
        i2t_ks = _reranked_ks(ks, rerank_k, num_texts, explicit, "image->text")
        t2i_ks = _reranked_ks(ks, rerank_k, num_images, explicit, "text->image")
        i2t, t2i = itm_rerank(model, image_features, input_ids, attention_mask, scores, rerank_k, batch_size,
                              progress, bf16)
        reranked = {k: v for k, v in recalls(i2t, text_image, i2t_ks).items() if k.startswith("i2t")}
        reranked |= {k: v for k, v in recalls(t2i, text_image, t2i_ks).items() if k.startswith("t2i")}
        if i2t_ks == t2i_ks == ks:
            reranked |= recall_means(reranked, ks)
        if relevant is not None:
            reranked["i2t_semantic_r1"] = semantic_recall_at_1(i2t, relevant)["i2t_semantic_r1"]
            reranked["t2i_semantic_r1"] = semantic_recall_at_1(t2i, relevant)["t2i_semantic_r1"]
        metrics |= {f"itm_{k}": v for k, v in reranked.items()}
    return metrics
