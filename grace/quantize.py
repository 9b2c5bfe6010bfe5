"""Model surgery: swap the language backbone's nn.Linear layers for LSQ QuantLinear layers."""

from __future__ import annotations

import fnmatch
import logging

import torch
from torch import nn

from grace_kernels.nn import QuantLinear

log = logging.getLogger(__name__)

def select_linears(model: nn.Module, *, group_size: int, include: list[str] | None = None,
                   exclude: list[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs GRACE quantizes: by default every linear layer of the family's language
    model (:attr:`Family.language_model`), never one the family keeps in full precision
    (:attr:`Family.full_precision`: the vision tower, projector/merger and LM head), as the paper does.

    Raises:
        ValueError: a model of no supported family with ``include`` or ``exclude`` left to the family;
            nothing matched; or a selected layer's in_features is not a multiple of ``group_size``
            (every offender named; checked before anything is changed).
    """
    if include is None or exclude is None:
        from grace.families import family_of

        family = family_of(getattr(model, "config", None))
        include = [f"{family.language_model}.*"] if include is None else include
        exclude = list(family.full_precision) if exclude is None else exclude

    def selected(name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in include)
                and not any(fnmatch.fnmatchcase(name, p) for p in exclude))

    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and selected(n)]  # exact type: never re-wrap a QuantLinear
    if not targets:
        raise ValueError(f"no nn.Linear matched include={include} exclude={exclude}")
    bad = [f"{n} (in_features={m.in_features})" for n, m in targets if m.in_features % group_size]
    if bad:
        raise ValueError(f"group_size {group_size} does not divide the input dimension of: {', '.join(bad)}")

    return targets


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified name ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def rtn_int4_model(model: nn.Module, *, group_size: int = 128, scale_dtype: torch.dtype = torch.float16,
                   include: list[str] | None = None, exclude: list[str] | None = None) -> nn.Module:
    """Round-to-nearest INT4 post-training quantization (absmax / 7 scales per group), in place: the same
    layers as :func:`quantize_model`, swapped for real INT4 :class:`~grace_kernels.nn.W4A16Linear` layers.
    The PTQ baseline of the paper's tables."""
    from grace_kernels.nn import W4A16Linear

    targets = select_linears(model, group_size=group_size, include=include, exclude=exclude)
    for name, lin in targets:
        replace_module(model, name, W4A16Linear.from_linear(lin, group_size=group_size, scale_dtype=scale_dtype))
    model.grace_quantized_modules = [n for n, _ in targets]
    return model


def quantize_model(
    model: nn.Module, *, bits: int = 4, group_size: int = 128, include: list[str] | None = None,
    exclude: list[str] | None = None, method: str = "percentile", scale_dtype: torch.dtype | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Replace selected nn.Linear modules of ``model`` by :class:`QuantLinear`, in place.

    Args:
        include: fnmatch patterns over qualified module names; default: everything under the family's
            language model (:attr:`grace.families.Family.language_model`).
        exclude: patterns never quantized; default: the family's :attr:`~grace.families.Family.full_precision`
            (vision tower, projector/merger, LM head).
        method, scale_dtype: passed to :meth:`QuantLinear.from_linear`.

    Returns:
        ``model``, with the swapped names in ``model.grace_quantized_modules``.

    Raises:
        ValueError: nothing matched, or a selected layer's in_features is not a multiple of
            ``group_size`` (named; checked for every layer before anything is swapped).
    """
    targets = select_linears(model, group_size=group_size, include=include, exclude=exclude)
    for name, lin in targets:
        quant = QuantLinear.from_linear(lin, bits, group_size, method=method, scale_dtype=scale_dtype)
        replace_module(model, name, quant)
    names = [n for n, _ in targets]
    model.grace_quantized_modules = names
    n_params = sum(lin.weight.numel() for _, lin in targets)
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    msg = (f"quantize_model: {len(names)} linear layers ({n_params / 1e6:.2f}M weights) -> INT{bits} LSQ, "
           f"group {group_size}; {len(kept)} kept in full precision")
    log.info(msg)
    if verbose:
        print(msg)
    return model
