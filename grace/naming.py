"""Tensor and module names: in memory, on disk, and against compressed-tensors ``ignore`` lists.

transformers renames checkpoint tensors on load (LLaVA's ``language_model.model.*`` becomes
``model.language_model.*``; the llava-hf Hub layout's ``vision_tower.vision_model.*`` becomes
``model.vision_tower.*``) and reverses the renaming on save. :func:`checkpoint_names` gives the name
a tensor has in a particular file layout, by letting transformers' own conversion rules recognise
that file's tensor names, exactly as ``from_pretrained`` does. Export (:mod:`grace.export`) and loading
(:mod:`grace.load`) both name tensors through this module.
"""

from __future__ import annotations

import re

import torch
from torch import nn


def adopt_checkpoint_layout(model: nn.Module, file_keys: list[str]) -> None:
    """Make ``model`` save (and :func:`checkpoint_names` map) its tensors under the names of the file
    whose tensor names are ``file_keys``, as ``from_pretrained`` would have had it loaded that file.

    transformers keeps, on a model it loaded, the renaming rules that matched the file's names, and
    reverses exactly those on save; a model built from a config gets the default rules instead, which
    differ for some layouts (the llava-hf Hub layout's ``vision_tower.vision_model.*``). Here the file's
    names are run through the same rules and the ones that matched are kept on the model.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:   # transformers 4.x: no renaming rules, names on disk are the names in memory
        return
    mapping = get_model_conversion_mapping(model)
    renamings = [c for c in mapping if isinstance(c, WeightRenaming)]
    converters = [c for c in mapping if isinstance(c, WeightConverter)]
    state = model.state_dict()
    for key in sorted(file_keys, key=dot_natural_key):
        rename_source_key(key, renamings, converters, model.base_model_prefix, state)
    model._weight_conversions = [c for c in mapping if c.was_used()]


def checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """In-memory state-dict key -> the key ``save_pretrained`` writes for it (transformers reverses its
    load-time renamings on save, e.g. LLaVA's ``model.language_model`` -> ``language_model.model``).

    Each key is sent through transformers' own reversal with a distinct one-element tensor, so the
    tensor that comes out under a new name says which key it was.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:   # transformers 4.x saves the in-memory names as they are
        return {k: k for k in keys}
    probe = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    out = revert_weight_conversion(model, dict(probe))
    if len(out) != len(keys) or any(t.numel() != 1 for t in out.values()):
        raise ValueError(f"{type(model).__name__} converts (not just renames) tensors on save; "
                         "this project handles renaming-only model families")
    return {keys[int(t.item())]: new for new, t in out.items()}


def module_checkpoint_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module name in memory -> its name on disk (the name of its ``.weight`` tensor, minus ``.weight``)."""
    m = checkpoint_names(model, [f"{n}.weight" for n in names])
    return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in m.items()}


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's plain nn.Linear modules (W4A16Linear and QuantLinear are not nn.Linear)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def matches_ignore(name: str, ignore: list[str]) -> bool:
    """compressed-tensors' and vLLM's rule for one name: ``re:<pattern>`` is ``re.match``, anything else
    the exact name."""
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in ignore)
