"""Checks the public op wrappers run where inputs enter (the library-wide rule in the README).

Metadata checks (type, dtype, rank, shape, device) are free and always run. Checks that read
values (target ranges, finiteness) need a host sync, so each op folds them into one reduction and
one sync, and skips them where values cannot be read: while torch.compile traces, and on fake or
meta tensors (torch.library's fake implementations, opcheck's fake-tensor test).
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake


def values_visible(*tensors: object) -> bool:
    """Whether a data-dependent check can read these tensors' values now (non-tensors are ignored:
    their type is checked elsewhere)."""
    if torch.compiler.is_compiling():
        return False
    return not any(isinstance(t, torch.Tensor) and (t.is_meta or is_fake(t)) for t in tensors)


def check_floating(name: str, t: object, rank: int) -> None:
    """TypeError unless ``t`` is a floating-point tensor; ValueError unless it has ``rank`` dimensions."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D, got shape {tuple(t.shape)}")


def check_integer(name: str, t: object) -> None:
    """TypeError unless ``t`` is a tensor of an integer dtype (bool is not an integer here)."""
    if (not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t))}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """ValueError naming the first tensor of ``others`` that is not on ``reference``'s device."""
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_positive_finite(name: str, value: float) -> None:
    """ValueError unless ``value`` is a finite number > 0 (NaN fails every comparison, so test it)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_finite_number(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
