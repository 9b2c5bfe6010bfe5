"""Export a trained GRACE student as a Hugging Face checkpoint (loading lives in :mod:`grace.load`).

The run's scheme (:mod:`grace.schemes`) picks the format. INT4 and INT8: compressed-tensors "pack-quantized"
(what llm-compressor writes and vLLM serves with its WNA16 kernels). Every quantized nn.Linear ``<name>`` becomes

    <name>.weight_packed  int32 [N, K * bits / 32]    u = q + 2**(bits - 1), low bits first along K
    <name>.weight_scale   [N, K / group_size]         the export dtype (float32 by default: the trained
                                                      half-precision scales, widened exactly)
    <name>.weight_shape   int64 [2]                   (N, K)
    <name>.bias           when the layer has one

with W = weight_scale * q, q in [-2**(bits-1), 2**(bits-1) - 1] (symmetric, no zero point). Every other tensor
is stored as it is; config.json gains the ``quantization_config`` block that compressed-tensors writes for a
W4A16 / W8A16 group scheme. A full-precision run becomes a plain checkpoint (no ``quantization_config``).

Tensor names are those of the student checkpoint the run trained from (``student`` in the run's
config.json), whatever its layout: the llava-hf Hub layout ``vision_tower.vision_model.*`` stays as it
is, as it does when transformers itself loads and saves that checkpoint. When that checkpoint is no
longer readable, the names are those transformers' ``save_pretrained`` writes for a new model.

``ignore`` holds ``re:`` patterns in the style of llm-compressor's VLM recipes (``re:.*vision_tower.*``,
``re:.*multi_modal_projector.*``, ``re:.*visual.*``, ``re:.*lm_head$``), which match a module under its
in-memory name (transformers, compressed-tensors' ``apply_quantization_config``), its on-disk name and
vLLM's name alike; a full-precision linear they do not cover gets a pattern of its own.
:func:`ignore_patterns` checks that the list leaves exactly the quantized linears targeted under every
naming.

The codes and scales are exactly those the fake-quantized student trained with
(:meth:`QuantLinear.quantize`), so loading the export into :class:`W4A16Linear` modules reproduces
the student's logits up to matmul rounding.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import torch
from torch import nn

from grace.errors import GraceError
from grace.families import family_of
from grace.io import OWNER_FILE, mark_owner, owner_of, path_relation, read_json
from grace.load import (
    DTYPES,
    final_dir,
    find_final,
    load_checkpoint_student,
    load_student,
    read_quantization,
    safetensors_keys,
)
from grace.naming import (
    adopt_checkpoint_layout,
    checkpoint_names,
    linear_names,
    matches_ignore,
    module_checkpoint_names,
)
from grace.quantize import replace_module
from grace.rundir import find_checkpoint, read_checkpoint
from grace.schemes import Scheme, scheme_for_bits
from grace_kernels.nn import QuantLinear

OWNER = "grace export"   # the command named in an export's grace.io.OWNER_FILE

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- export

def _suffix_pattern(name: str) -> str:
    # Matches the name itself or any name that ends in "." + name.
    return f"re:(.*\\.)?{re.escape(name)}$"


def ignore_patterns(full: list[tuple[str, str]], quantized: list[tuple[str, str]], *,
                    family_patterns: tuple[str, ...]) -> list[str]:
    """The ``ignore`` list for a model whose full-precision linears are ``full`` and whose quantized
    linears are ``quantized``, each given as (in-memory name, on-disk name).

    The family's patterns (``family_patterns``: :meth:`grace.families.Family.ignore_patterns`, in the style
    of llm-compressor's VLM recipes) that cover a full-precision linear and no quantized one come first.
    Each full-precision linear they leave uncovered gets the shortest pattern on the end of its name
    (starting at a component that is not a layer index) that matches its in-memory and on-disk names
    and no quantized linear: names differ between clients only at the front
    (``model.language_model.`` in memory, ``language_model.model.`` on disk and in vLLM), so a
    pattern on the end matches under every naming.

    Raises:
        ValueError: no pattern separates some full-precision linear from the quantized ones (a model whose
            names only differ at the front), or the result does not leave exactly the quantized linears.
    """
    q_names = [n for pair in quantized for n in pair]
    ignore = [p for p in family_patterns
              if any(matches_ignore(n, [p]) for pair in full for n in pair)
              and not any(matches_ignore(n, [p]) for n in q_names)]
    for pair in full:
        if all(matches_ignore(n, ignore) for n in pair):
            continue
        parts = pair[0].split(".")
        # a pattern starting at a name component, never at a layer index ("layers.0.", not "0.")
        for i in [i for i in range(len(parts) - 1, -1, -1) if not parts[i].isdigit()]:
            p = _suffix_pattern(".".join(parts[i:]))
            if all(matches_ignore(n, [p]) for n in pair) and not any(matches_ignore(n, [p]) for n in q_names):
                ignore.append(p)
                break
        else:
            raise ValueError(f"no ignore pattern keeps {pair[0]} in full precision without also matching "
                             "an INT4 layer")
    _warn_split_fused_groups([pair[0] for pair in quantized], [pair[0] for pair in full])
    wrong = [n for n in q_names if matches_ignore(n, ignore)] + [
        n for pair in full for n in pair if not matches_ignore(n, ignore)]
    if wrong:
        raise ValueError(f"ignore list {ignore} does not separate the INT4 layers: {wrong[:8]}")
    return ignore


# vLLM fuses these projections into one layer (its packed_modules_mapping) and refuses a checkpoint that
# quantizes some shards of a fused layer and not the others.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _warn_split_fused_groups(quantized: list[str], full: list[str]) -> None:
    int4, dense = set(quantized), set(full)
    for shards in VLLM_FUSED.values():
        for name in sorted(int4):
            prefix, _, leaf = name.rpartition(".")
            group = {f"{prefix}.{s}" for s in shards}
            if leaf in shards and group & dense:
                logger.warning("export: %s is INT4 but %s stays in full precision; vLLM fuses them into one "
                               "layer and will refuse this checkpoint", name, sorted(group & dense))


def _run_setting(run_dir: str, final: str, key: str) -> str | None:
    """The non-empty string setting ``key`` of the run's config.json (the TrainConfig ``grace train`` writes,
    beside final/), or None when the run has no readable config.json or it names none."""
    for path in (os.path.join(run_dir, "config.json"), os.path.join(os.path.dirname(final), "config.json")):
        if not os.path.isfile(path):
            continue
        try:
            value = read_json(path).get(key)
        except ValueError:
            continue
        if isinstance(value, str) and value:
            return value
    return None


def source_checkpoint(run_dir: str, final: str) -> str | None:
    """The student checkpoint directory a run trained from (``student`` in the run's config.json), or None
    when the run names none or it is not a directory."""
    student = _run_setting(run_dir, final, "student")
    return student if student and os.path.isdir(student) else None


def _adopt_source_layout(model: nn.Module, run_dir: str, final: str) -> None:
    """Give ``model`` the tensor names of the checkpoint the run started from, in the family's Hub layout
    (:meth:`grace.families.Family.hub_checkpoint_keys`: for LLaVA the llava-hf names vLLM maps, whichever
    layout transformers saved the student in); when that checkpoint cannot be read, transformers' default
    names in that layout, and a warning (the export itself is still correct)."""
    family = family_of(model.config)
    source = source_checkpoint(run_dir, final)
    keys = None
    if source is None:
        logger.warning("export: the run names no student checkpoint that still exists; writing transformers' "
                       "default tensor names")
    else:
        try:
            keys = safetensors_keys(source)
        except ValueError as e:
            logger.warning("export: cannot read the student checkpoint's tensor names (%s); writing "
                           "transformers' default tensor names", e)
    if keys is None:
        keys = list(checkpoint_names(model, list(model.state_dict())).values())
    hub = family.hub_checkpoint_keys(keys)
    if source is not None or hub != keys:
        adopt_checkpoint_layout(model, hub)


def _checkpoint_scales(layer: nn.Module, name: str, dtype: str | None) -> None:
    """Store ``layer``'s scales in the dtype of the exported model, in place, or refuse.

    transformers before 5.21 (the declared minimum is 5.17) decompresses a layer to its scales' dtype and
    then multiplies it with activations of the model's dtype, so any other scale dtype fails at the first
    forward. float32 (the default export) holds every half-precision scale exactly, and compressed-tensors
    then dequantizes to exactly the trained float32 product; a half-precision export keeps the trained
    scales only where that dtype holds them exactly.

    Raises:
        ValueError: a scale the export dtype cannot hold exactly (overflow, lost bits), naming the layer.
    """
    scale = layer.weight_scale
    target = DTYPES[dtype or "float32"]
    if scale.dtype == target:
        return
    converted = scale.to(target)
    if not torch.equal(converted.to(scale.dtype), scale) or not bool(torch.isfinite(converted).all()):
        i = int((converted.to(scale.dtype) != scale).flatten().nonzero()[0])
        raise ValueError(f"{name}: its trained {str(scale.dtype).removeprefix('torch.')} scales do not fit "
                         f"{dtype} exactly (e.g. {scale.flatten()[i].item():.6g} -> "
                         f"{converted.flatten()[i].item():.6g}); export with --dtype "
                         f"{str(scale.dtype).removeprefix('torch.')} or float32")
    layer.weight_scale = converted


def _convert(model: nn.Module, scheme: Scheme, dtype: str | None) -> list[str]:
    """Replace every QuantLinear by the scheme's served layer holding its trained codes and scales (stored in
    the export dtype, see :func:`_checkpoint_scales`); returns their names."""
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in quantized:
        try:
            served = scheme.convert(model.get_submodule(name))
        except ValueError as e:   # e.g. an exp(log_scale) that overflows the training scale dtype
            raise ValueError(f"{name}: {e}") from None
        _checkpoint_scales(served, name, dtype)
        replace_module(model, name, served)
    return quantized


def _trained_student(run_dir: str, step: int | None):
    """(scheme, group_size, final/ or None, a function loading (model, processor)): what ``export_run``
    exports, its scheme known before anything large is read."""
    final = find_final(run_dir)
    if step is None and final is None:
        ckpt = find_checkpoint(run_dir)
        if ckpt is not None:
            held = read_checkpoint(ckpt)["step"]
            raise ValueError(f"{run_dir!r} is not a finished training run (no final/); its checkpoint/ holds step "
                             f"{held}: pass --step {held} to export that checkpoint")
        final_dir(run_dir)   # raises, saying what a finished run holds
    if step is None:
        q = read_quantization(final)
        return scheme_for_bits(q["bits"]), q["group_size"], final, lambda: load_student(final)
    ckpt = find_checkpoint(run_dir)
    cfg = read_checkpoint(ckpt)["config"] if ckpt is not None else {}
    return (scheme_for_bits(cfg.get("bits")), cfg.get("group_size"), final,
            lambda: load_checkpoint_student(run_dir, step)[:2])


def export_run(run_dir: str, out_dir: str, *, dtype: str | None = None, overwrite: bool = False,
               step: int | None = None) -> str:
    """Write the trained student of ``run_dir`` as a Hugging Face checkpoint in ``out_dir``.

    The run's scheme (:mod:`grace.schemes`, from its ``bits``) decides the format: INT4 and INT8 runs become
    compressed-tensors pack-quantized checkpoints (config.json with a ``quantization_config``), a
    full-precision run a plain checkpoint transformers loads as it is.

    Args:
        run_dir: a finished training run (with ``final/``), or its ``final/`` directory; with ``step``, any
            run (finished or not) whose ``checkpoint/`` holds that step.
        out_dir: the model directory to create: model.safetensors, config.json, generation config,
            processor/tokenizer files.
        dtype: "bfloat16", "float16" or "float32" for the tensors kept in full precision (vision
            tower, projector, embeddings, norms, LM head, biases) and for the quantized layers' scales;
            None keeps the float32 master weights, so the export is exactly the trained student, with the
            trained scales widened exactly to float32. A half-precision export needs the trained scales to
            fit that dtype exactly (:func:`_checkpoint_scales`).
        overwrite: replace an existing non-empty ``out_dir``.
        step: export the run's ``checkpoint/`` (written every ``save_every`` steps, by any number of ranks),
            which must hold this step, instead of ``final/``: an unfinished or interrupted run.

    Returns:
        ``out_dir``. The directory appears complete or not at all: everything is written to a
        temporary sibling that is renamed into place at the end. Tensor names are those of the
        student checkpoint the run trained from; ``ignore`` holds patterns (see the module docstring).

    Raises:
        ValueError: no finished run (for an unfinished one the message names the step its checkpoint
            holds), a checkpoint that holds another step than ``step``, a run whose bits no scheme serves, an
            unknown dtype, a non-empty ``out_dir`` without ``overwrite``; a file of final/ or checkpoint/
            missing, truncated or malformed (the message names it and what to do); a layer whose scales are
            not finite or do not fit ``dtype``.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {dtype!r}")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        raise ValueError(f"step must be a positive int or None, got {step!r}")
    scheme, group_size, final, load = _trained_student(run_dir, step)
    out_dir = os.path.abspath(out_dir)
    _check_output(out_dir, run_dir, final, overwrite)

    model, processor = load()
    with torch.no_grad():
        quantized = _convert(model, scheme, dtype)
        if dtype is not None:
            # Parameters only: the scales are buffers, stored by _convert.
            for p in model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(DTYPES[dtype])
    _adopt_source_layout(model, run_dir, final or os.path.join(run_dir, "final"))
    qconfig = None
    if scheme.quantized:
        full = linear_names(model)   # the quantized ones are served layers now, no longer nn.Linear
        names = module_checkpoint_names(model, full + quantized)
        ignore = ignore_patterns([(n, names[n]) for n in full], [(n, names[n]) for n in quantized],
                                 family_patterns=family_of(model.config).ignore_patterns())
        qconfig = scheme.checkpoint_config(group_size=group_size, ignore=ignore)
    _write_model_dir(model, processor, qconfig, out_dir)
    return out_dir


def _check_output(out_dir: str, run_dir: str, final: str | None, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that would write into or replace what the export reads, or (with ``overwrite``)
    replace a directory that is not an earlier export: the run directory (the parent of ``final`` when it is a
    run's final/), the student checkpoint the run names, and the run's data file.

    Raises:
        GraceError: ``out_dir`` is, lies inside or holds one of those; it is not a directory; it is a non-empty
            directory and ``overwrite`` is off, or it was not written by ``grace export``.
    """
    final = final or os.path.join(run_dir, "final")   # an export by step: a run that may have no final/ yet
    parent = os.path.dirname(final)
    run_root = parent if os.path.isfile(os.path.join(parent, "config.json")) else final
    inputs = {"the run directory": run_root, "the student checkpoint": source_checkpoint(run_dir, final),
              "the run's data file": _run_setting(run_dir, final, "data")}
    for what, path in inputs.items():
        relation = path_relation(out_dir, path) if path else None
        if relation is not None:
            where = {"is": "is", "inside": "is inside", "holds": "holds"}[relation]
            raise GraceError(f"output {out_dir} {where} {what} {path}: an export never writes into or replaces "
                             "what it reads; choose an output directory outside it")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GraceError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise GraceError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
        if owner_of(out_dir) != OWNER:
            raise GraceError(f"{out_dir} is not empty and was not written by {OWNER} (it has no {OWNER_FILE} "
                             "naming it): --overwrite replaces only an earlier export; choose another output "
                             "directory")


def _write_model_dir(model: nn.Module, processor, qconfig: dict | None, out_dir: str) -> None:
    """save_pretrained into a temporary sibling of ``out_dir`` (config.json gaining ``qconfig`` when given),
    then renamed into place."""
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        # mkdtemp makes the directory private (0700); the model directory gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        model.save_pretrained(tmp)
        if qconfig is not None:
            with open(os.path.join(tmp, "config.json")) as f:
                config = json.load(f)
            config["quantization_config"] = qconfig
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        mark_owner(tmp, OWNER)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: str, out_dir: str) -> None:
    if not os.path.exists(out_dir):
        os.replace(tmp, out_dir)
        return
    # An existing directory cannot be replaced in one rename: move it aside first, so that at every
    # instant out_dir is either the old model or the new one, never a mixture.
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
