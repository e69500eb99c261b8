"""What the frozen features say: linear probes of the token under each object.

A Q-Former can only bind "red" to "circle" if the frozen tokens carry both. A linear probe (logistic
regression from the token at an object's centre to the object's colour or shape, trained on the
training split, scored on another) measures how readily each group of channels says it. The lite world
uses it to choose which stages of its frozen CNN the tokens carry (``world.LITE_POOLED_STAGES``).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def channel_groups(encoder) -> dict[str, slice]:
    """The token channels of a ``FrozenImageEncoder`` by source: each pooled stage, then the final map."""
    info = encoder.model.feature_info  # timm's stages, in forward_intermediates' index order
    groups, start = {}, 0
    for stage in encoder.pooled_stages:
        width = info[stage]["num_chs"]
        groups[f"stride-{info[stage]['reduction']} stage"] = slice(start, start + width)
        start += width
    groups["final map"] = slice(start, encoder.feature_dim)
    return groups


def object_cell(obj: dict, side: int, image_size: int) -> tuple[int, int]:
    """The (row, col) of the ``side`` x ``side`` token grid over an ``image_size`` image that holds the
    centre of the object's bounding box."""
    x0, y0, x1, y1 = obj["bbox"]
    cell = image_size / side
    return int((y0 + y1) / 2 // cell), int((x0 + x1) / 2 // cell)


def object_tokens(features: torch.Tensor, objects: list[list[dict]], image_size: int):
    """The token under each object's bounding-box centre, ``[num_objects, D]`` (float32), and each
    object's attributes. ``features`` ``[N, H*W, D]`` is a square grid over images of ``image_size``."""
    side = int(features.shape[1] ** 0.5)
    if side * side != features.shape[1] or len(objects) != len(features):
        raise ValueError(f"need [N, side*side, D] features for {len(objects)} scenes, got {tuple(features.shape)}")
    index, rows = [], []
    for image, scene in enumerate(objects):
        for obj in scene:
            row, col = object_cell(obj, side, image_size)
            index.append((image, row * side + col))
            rows.append(obj)
    images, tokens = torch.tensor(index).T
    return features[images, tokens].float(), rows


def linear_probe(train_x: torch.Tensor, train_labels: list, test_x: torch.Tensor, test_labels: list,
                 weight_decay: float = 1e-3, max_iter: int = 200) -> float:
    """Test accuracy (0-1) of an L2-regularised logistic regression trained with L-BFGS on standardised
    inputs. Labels are any hashable values; a test label never seen in training counts as wrong."""
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ValueError("a probe needs at least two classes among the training labels")
    y = torch.tensor([classes.index(v) for v in train_labels])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-3
    x, test = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)  # the Linear's initialisation: the same probe gives the same accuracy
    probe = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=max_iter)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = [classes[i] for i in probe(test).argmax(1).tolist()]
    return sum(p == t for p, t in zip(predicted, test_labels)) / len(test_labels)
