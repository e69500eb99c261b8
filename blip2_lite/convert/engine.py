"""The one engine behind every checkpoint conversion: rename keys by rules, then load strictly.

Each source layout (Hugging Face, LAVIS, the EfficientNet package, BERT) is a table of rules in
its own module; this module applies them. A conversion never guesses: a key that no rule claims
is an error, and so is a parameter the checkpoint does not fill. All problems are collected and
raised together in one ``CheckpointError``, so a user fixes a layout mismatch in one go.
"""

from __future__ import annotations

import pickle
import re
from typing import Callable, Union

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit: unknown, missing or mis-shaped keys, or an unreadable file."""


# A rule is (regex matched at the start of the key, target). The target is
# - a replacement string (``re`` syntax, ``\1`` for groups): the key's matched part is replaced;
# - SKIP: the key is known and deliberately dropped;
# - a callable ``(match, tensor) -> {new_key: tensor}`` for conversions that split tensors or depend
#   on the key's numbers; it returns None for a key it does not recognise after all.
SKIP = None
Target = Union[str, None, Callable[[re.Match, torch.Tensor], dict]]
Rule = tuple[str, Target]


def prefixed(rules: list[Rule], pattern_prefix: str, key_prefix: str = "") -> list[Rule]:
    """The same renaming rules (string or SKIP targets) for keys under ``pattern_prefix`` (a regex),
    their targets under ``key_prefix``."""
    if any(callable(target) for _, target in rules):
        raise ValueError("prefixed() takes renaming rules only: a callable target names its own keys")
    return [(pattern_prefix + pattern, target if target is SKIP else key_prefix + target) for pattern, target in rules]


def convert(state: dict[str, torch.Tensor], rules: list[Rule], what: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename every key of ``state`` under ``prefix`` (the prefix removed; other keys are ignored) by
    the first rule that matches it. Keys no rule claims raise one ``CheckpointError`` naming them all."""
    converted, unknown = {}, []
    for full_key, tensor in state.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        for pattern, target in rules:
            if match := re.match(pattern, key):
                if callable(target):
                    new = target(match, tensor)
                    unknown += [full_key] if new is None else []
                    converted.update(new or {})
                elif target is not SKIP:
                    converted[match.expand(target) + key[match.end():]] = tensor
                break
        else:
            unknown.append(full_key)
    if unknown:
        raise CheckpointError(f"unrecognised {what} keys: {unknown}")
    return converted


def read_torch_file(path, advice: str = "download it again") -> object:
    """``torch.load(path, weights_only=True)`` (no code runs from the file), or a ``CheckpointError``
    naming the file when it is missing, truncated, or holds more than tensors and containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({str(e).splitlines()[0]}): "
                              f"it is truncated, damaged or not a weights-only file; {advice}") from e


def _tied_aliases(module: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> every name of the same tensor (tied embeddings are saved only once)."""
    names: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(name)
    return {name: group for group in names.values() for name in group}


def misfits(module: nn.Module, state_dict: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()) -> dict:
    """Every way ``state_dict`` fails to fill ``module``: missing, unexpected and mis-shaped keys.

    ``allow_missing``: key prefixes the checkpoint is known not to carry. A tied parameter counts as
    loaded when any of its names is present.
    """
    own = module.state_dict()
    tied = {name for name, group in _tied_aliases(module).items() if len(group) > 1 and group & state_dict.keys()}
    return {
        "missing": [k for k in own if k not in state_dict and k not in tied and not k.startswith(allow_missing)],
        "unexpected": [k for k in state_dict if k not in own],
        "mis-shaped": [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                       for k, v in state_dict.items() if k in own and v.shape != own[k].shape],
    }


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = (),
                what: str = "checkpoint") -> None:
    """``module.load_state_dict`` that reports every missing, unexpected and mis-shaped key at once."""
    problems = {kind: keys for kind, keys in misfits(module, state_dict, allow_missing).items() if keys}
    if problems:
        raise CheckpointError(f"{what} does not fit the model:\n"
                              + "".join(f"  {kind}: {keys}\n" for kind, keys in problems.items()))
    module.load_state_dict(state_dict, strict=False)
