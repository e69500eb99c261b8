"""The three stage-1 objectives of BLIP-2: ITC, ITM (with hard negatives) and ITG.

Each function takes tensors, not models, so that it can be read, tested and reused on its own.
The model that wires them to the Q-Former is ``blip2_lite.stage1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

LABEL_SMOOTHING = 0.1
TEMPERATURE_RANGE = (0.001, 0.5)  # the learnable temperature is clamped into this range (as in LAVIS)


# ---------------------------------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------------------------------


def distributed_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised (plain single-process use)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = distributed_world()
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's features
        return grad.chunk(world)[rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    Each rank's features receive the gradient of every rank's loss, so after DDP's gradient
    averaging the parameters get exactly the gradient of single-process training on the global
    batch. (LAVIS gathers without gradient: same loss, different gradient.) Needs the same batch
    size on every rank.
    """
    _, world = distributed_world()
    return x if world == 1 else _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    _, world = distributed_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------------
# ITC: image-text contrastive
# ---------------------------------------------------------------------------------------------------


def itc_similarity(image_itc: torch.Tensor, text_itc: torch.Tensor) -> torch.Tensor:
    """Max over queries of the query-text cosine similarity.

    ``image_itc``: ``[Bi, Q, E]`` and ``text_itc``: ``[Bt, E]``, both L2-normalised.
    Returns ``[Bi, Bt]``: for each image-text pair, the best-matching query's cosine.
    """
    return torch.einsum("iqe,te->itq", image_itc, text_itc).amax(dim=-1)


@dataclass
class ITCOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # [B_local, B_global], already divided by the temperature
    sim_t2i: torch.Tensor  # [B_local, B_global]
    positives: torch.Tensor  # [B_local, B_global] bool: which global columns are positives of each local row


def itc_loss(
    image_itc: torch.Tensor,
    text_itc: torch.Tensor,
    temperature: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    label_smoothing: float = LABEL_SMOOTHING,
) -> ITCOutput:
    """Symmetric InfoNCE between query features and text [CLS] features.

    Local rows are compared with the features of every rank. Without ``image_ids`` the positive of
    row ``i`` is global column ``rank * B + i``; with them, every caption of the same image is a
    positive (the target mass is shared among them).
    """
    if image_itc.dim() != 3 or text_itc.dim() != 2 or image_itc.shape[0] != text_itc.shape[0]:
        raise ValueError(
            f"itc_loss expects image_itc [B, Q, E] and text_itc [B, E] with the same B, got "
            f"{tuple(image_itc.shape)} and {tuple(text_itc.shape)}"
        )
    rank, _ = distributed_world()
    batch = image_itc.shape[0]
    temp = temperature.clamp(*TEMPERATURE_RANGE)

    image_itc_all = gather_with_grad(image_itc)
    text_itc_all = gather_with_grad(text_itc)
    sim_i2t = itc_similarity(image_itc, text_itc_all) / temp
    sim_t2i = itc_similarity(image_itc_all, text_itc).t() / temp

    if image_ids is None:
        global_ids = torch.arange(len(text_itc_all), device=text_itc.device)
        local_ids = global_ids[rank * batch : (rank + 1) * batch]
    else:
        local_ids = image_ids.to(text_itc.device)
        global_ids = gather_no_grad(local_ids)
    positives = local_ids[:, None] == global_ids[None, :]
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    ) / 2
    return ITCOutput(loss, sim_i2t, sim_t2i, positives)


# ---------------------------------------------------------------------------------------------------
# ITM: image-text matching with hard negatives
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positives: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one negative image per text and one negative text per image.

    Negatives are drawn from ``softmax(ITC similarity)`` with the positives masked out, so a
    candidate that the contrastive head finds confusable is drawn more often (a hard negative),
    yet every non-positive has a chance. All inputs are ``[K, B]``: the first K rows of the
    *local* batch (K = B: all of them) against its B columns; ``positives`` is symmetric (same
    image id), so its rows serve both directions.

    Returns ``(negative_image_for_text, negative_text_for_image)``, two ``[K]`` index tensors into the B.
    """
    if not bool((~positives).any(dim=1).all()):
        raise ValueError(
            "ITM needs a negative for every pair: each batch must hold at least two different images "
            "(batch size 1, or a batch of captions of one image, has none)"
        )
    if not (torch.isfinite(sim_i2t).all() and torch.isfinite(sim_t2i).all()):
        raise FloatingPointError("ITC similarities are not finite: cannot sample ITM negatives")
    weights_t2i = sim_t2i.float().masked_fill(positives, float("-inf")).softmax(dim=1)
    weights_i2t = sim_i2t.float().masked_fill(positives, float("-inf")).softmax(dim=1)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def itm_pairs(batch_size: int, neg_image: torch.Tensor, neg_text: torch.Tensor):
    """The 3B ITM pairs as (text index, image index, label): B positives, then B texts with a
    negative image, then B images with a negative text."""
    arange = torch.arange(batch_size, device=neg_image.device)
    text_index = torch.cat([arange, arange, neg_text])
    image_index = torch.cat([arange, neg_image, arange])
    labels = torch.cat([torch.ones_like(arange), torch.zeros_like(arange), torch.zeros_like(arange)])
    return text_index, image_index, labels


def itm_logits(itm_head: torch.nn.Module, query_output: torch.Tensor) -> torch.Tensor:
    """Apply the 2-way ITM head to every query output and average over queries: ``[B, 2]``."""
    return itm_head(query_output).mean(dim=1)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------------
# ITG: image-grounded text generation
# ---------------------------------------------------------------------------------------------------


def itg_inputs(
    input_ids: torch.Tensor, text_attention_mask: torch.Tensor, dec_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and labels: ``[DEC]`` replaces the first token ([CLS]) to signal generation;
    padding is labelled -100 so that it costs nothing."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = dec_token_id
    labels = decoder_ids.masked_fill(text_attention_mask == 0, -100)
    return decoder_ids, labels


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=label_smoothing
    )
