"""Load the model directories this project produces or consumes, for ``grace eval`` / ``grace generate``.

* :func:`load_quantized_model`: a compressed-tensors "pack-quantized" INT4 or INT8 checkpoint (``grace
  export``'s, or another producer's such as llm-compressor's) into :class:`W4A16Linear` / :class:`W8A16Linear`;
* :func:`load_student`: the fake-quantized student a training run left in ``final/``;
* :func:`load_model`: whichever of these (or a plain Hugging Face checkpoint) a directory holds.

Files are checked where they are read: a missing, truncated or malformed file raises ValueError
naming the file and what to do, never a raw parser traceback.

Tensor names on disk and in memory: :mod:`grace.naming`.
"""

from __future__ import annotations

import os
import pickle
import warnings

import torch
from torch import nn

import grace_kernels
from grace.io import one_line, read_json
from grace.naming import (
    adopt_checkpoint_layout,
    checkpoint_names,
    linear_names,
    matches_ignore,
    module_checkpoint_names,
)
from grace.quantize import quantize_model, replace_module
from grace.rundir import find_checkpoint, read_checkpoint
from grace.schemes import ASYMMETRIC_AS_SYMMETRIC_8_BIT, SCHEMES, Scheme, read_checkpoint_config
from grace_kernels.int4 import SCALE_DTYPES
from grace_kernels.nn import convert_to_kernel_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------- files

def safetensors_files(model_dir: str) -> list[str]:
    """Paths of the safetensors files of a model directory (one file, or the shards its index names)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        return [os.path.join(model_dir, n) for n in sorted(set(weight_map.values()))]
    if os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        return [os.path.join(model_dir, "model.safetensors")]
    raise ValueError(f"{model_dir} has no model.safetensors (or model.safetensors.index.json)")


def _corrupt(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path} is truncated or corrupt ({one_line(e, first=True, typed=True)}); "
                      "write it again (re-run `grace export`, or copy the file again)")


def safetensors_keys(model_dir: str) -> list[str]:
    """Tensor names of a model directory's safetensors files, read from the headers only."""
    from safetensors import SafetensorError, safe_open

    keys = []
    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, "pt") as f:
                keys.extend(f.keys())
        except (SafetensorError, OSError) as e:
            raise _corrupt(path, e) from None
    return keys


def read_safetensors(model_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a model directory; ValueError naming the file when one is truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for path in safetensors_files(model_dir):
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise _corrupt(path, e) from None
    return tensors


def read_torch_state(path: str, what_to_do: str) -> dict:
    """A state dict saved with torch.save; ValueError naming the file when it is missing or truncated."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found; {what_to_do}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as e:
        reason = one_line(e, first=True, typed=True)
        raise ValueError(f"{path} is truncated or corrupt ({reason}); {what_to_do}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; {what_to_do}")
    return state


# --------------------------------------------------------------------------- run directories

def find_final(run_dir: str) -> str | None:
    """The ``final/`` directory of a training run (``run_dir`` may also be that directory itself)."""
    for cand in (os.path.join(run_dir, "final"), run_dir):
        if os.path.isfile(os.path.join(cand, "student_state.pt")) and os.path.isfile(
                os.path.join(cand, "quantization.json")):
            return cand
    return None


def final_dir(run_dir: str) -> str:
    final = find_final(run_dir)
    if final is not None:
        return final
    raise ValueError(f"{run_dir!r} is not a finished training run: no final/student_state.pt and "
                     f"final/quantization.json (a run writes them when training ends)")


def read_quantization(final: str) -> dict:
    """final/quantization.json, checked: bits, group_size, scale_dtype and the quantized module names."""
    path = os.path.join(final, "quantization.json")
    q = read_json(path, hint="it is written when training ends (resume the run to write it again)")
    missing = [k for k in ("bits", "group_size", "scale_dtype", "modules") if k not in q]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    if q["scale_dtype"] not in (None, "bfloat16", "float16"):
        raise ValueError(f"{path}: scale_dtype must be bfloat16, float16 or null, got {q['scale_dtype']!r}")
    if not isinstance(q["modules"], list) or not all(isinstance(m, str) for m in q["modules"]):
        raise ValueError(f"{path}: modules must be a list of module names")
    return q


def _config_from_dir(model_dir: str):
    from transformers import AutoConfig

    read_json(os.path.join(model_dir, "config.json"))   # a malformed file fails here, naming itself
    return AutoConfig.from_pretrained(model_dir)


def load_student(run_dir: str, device: str | torch.device = "cpu"):
    """The fake-quantized student of a finished run, as training left it.

    Rebuilds the model from ``final/config.json``, swaps the recorded Linear modules for
    :class:`QuantLinear` with the recorded bits / group size / scale dtype, and loads
    ``final/student_state.pt`` strictly (weights and log-scales).

    Returns:
        (model in eval mode on ``device``, float32; processor, or None when final/ holds none).

    Raises:
        ValueError: ``run_dir`` has no final/ student; a file of final/ is missing, truncated or
            malformed (the message names it); the state does not fit the rebuilt model.
    """
    from transformers import AutoModelForImageTextToText

    final = final_dir(run_dir)
    q = read_quantization(final)
    model = AutoModelForImageTextToText.from_config(_config_from_dir(final))
    if q["bits"] is not None:
        # The recorded names, matched literally (module names hold no fnmatch wildcards), so the
        # rebuilt student has exactly the trained set of QuantLinear layers.
        modules = q["modules"] or None
        quantize_model(model, bits=q["bits"], group_size=q["group_size"], include=modules,
                       exclude=[] if modules else None,
                       scale_dtype=getattr(torch, q["scale_dtype"]) if q["scale_dtype"] else None, verbose=False)
        if modules and sorted(model.grace_quantized_modules) != sorted(modules):
            raise ValueError(f"{final}: the recorded quantized modules do not all exist in the model built from "
                             f"its config: {sorted(set(modules) - set(model.grace_quantized_modules))}")
    path = os.path.join(final, "student_state.pt")
    state = read_torch_state(path, "training writes it when it ends: resume the run (`grace train --resume`) "
                                   "to write final/ again")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the model its config builds: {e}") from e
    return model.to(device).eval(), processor_or_none(final)


def load_pretrained(model_dir: str, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu", *,
                    role: str = "model"):
    """``from_pretrained`` of a Hugging Face checkpoint that refuses what transformers only reports.

    transformers initialises a tensor the file lacks (or holds in another shape) at random and ignores one
    the model has no place for, printing a load report on stderr; a run would then train or distil against
    random rows. Here each of these, a non-finite (NaN or infinite) value in a loaded tensor, and a
    truncated or corrupt safetensors file are a ValueError naming the file and the tensor (its on-disk
    name). ``role`` ("student", "teacher", ...) starts the message. The finiteness check runs on ``device``
    after the move (one reduction per tensor).

    Returns:
        the model on ``device`` in ``dtype`` ("auto": as stored), in training mode as transformers leaves it.
    """
    from transformers import AutoModelForImageTextToText

    file_keys = None
    if any(os.path.isfile(os.path.join(model_dir, n)) for n in WEIGHT_FILES[:2]):
        file_keys = safetensors_keys(model_dir)   # a truncated or corrupt file fails here, naming itself
    model, info = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, output_loading_info=True,
                                                              ignore_mismatched_sizes=True)
    on_disk = checkpoint_names(model, list(model.state_dict()))
    problems = [(on_disk.get(k, k), "is missing") for k in sorted(info["missing_keys"])]
    problems += [(on_disk.get(k, k), f"has shape {tuple(have)}, the model built from config.json needs {tuple(need)}")
                 for k, have, need in sorted(info["mismatched_keys"], key=lambda m: m[0])]
    if info["unexpected_keys"]:
        # transformers reports them renamed into the model's naming; the file's own names are those that map
        # to no tensor of the model
        extra = sorted(set(file_keys) - set(on_disk.values())) if file_keys is not None else []
        names = extra or sorted(info["unexpected_keys"])
        problems += [(k, "is not a tensor of the model built from config.json") for k in names]
    if problems:
        name, what = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{role} checkpoint {_file_of(model_dir, name)}: tensor {name} {what}{more}; "
                         "transformers would initialise it at random: use the checkpoint its config.json belongs to")
    model = model.to(device)
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        name = on_disk.get(bad[0], bad[0])
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"{role} checkpoint {_file_of(model_dir, name)}: tensor {name} holds NaN or infinite "
                         f"values{more}; the checkpoint is corrupt: write or copy it again")
    return model


def _file_of(model_dir: str, disk_name: str) -> str:
    """The weights file of ``model_dir`` that holds (or, for a missing tensor, should hold) ``disk_name``."""
    for index in (WEIGHT_FILES[1], WEIGHT_FILES[3]):
        path = os.path.join(model_dir, index)
        if os.path.isfile(path):
            weight_map = read_json(path).get("weight_map") or {}
            return os.path.join(model_dir, weight_map[disk_name]) if disk_name in weight_map else path
    return next((os.path.join(model_dir, n) for n in (WEIGHT_FILES[0], WEIGHT_FILES[2])
                 if os.path.isfile(os.path.join(model_dir, n))), model_dir)


def load_checkpoint_student(run_dir: str, step: int | None = None, device: str | torch.device = "cpu"):
    """The fake-quantized student of the latest checkpoint of a training run, finished or not.

    ``checkpoint/`` (torch.distributed.checkpoint shards from any number of ranks, and the trainer state)
    is read in this one process: the student is rebuilt from the student checkpoint the run names, its
    linears swapped as training swapped them (the run's scheme, group size, scale dtype), and the
    checkpoint's weights and log-scales loaded into it (float32).

    Args:
        step: the step the checkpoint must hold (a run keeps its latest checkpoint only); None: any.

    Returns:
        (model in eval mode on ``device``, processor, the checkpoint's trainer config as a dict, its step).

    Raises:
        ValueError: no checkpoint/; a checkpoint that is incomplete or holds another step (both named); a
            student checkpoint the run names that no longer exists.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grace.schemes import scheme_for_bits

    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"{run_dir!r} has no checkpoint/ (a run writes one every --save-every steps)")
    state = read_checkpoint(ckpt)
    if step is not None and state["step"] != step:
        raise ValueError(f"{ckpt} holds step {state['step']}, not step {step} (a run keeps its latest checkpoint "
                         "only)")
    cfg = state["config"]
    student = cfg.get("student")
    if not isinstance(student, str) or not os.path.isdir(student):
        raise ValueError(f"{ckpt}: the student checkpoint the run trained from, {student!r}, is not a directory; "
                         "its architecture and processor are needed to read the checkpoint")
    model = AutoModelForImageTextToText.from_config(_config_from_dir(student), dtype=torch.float32)
    scale_dtype = getattr(torch, cfg["scale_dtype"]) if cfg.get("scale_dtype") else None
    # the scales this initialises are overwritten by the checkpoint's
    scheme_for_bits(cfg.get("bits")).prepare(model, group_size=cfg["group_size"], scale_dtype=scale_dtype,
                                             verbose=False)
    weights = model.state_dict()
    with warnings.catch_warnings():   # DCP warns on every single-process load, this function's purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp_load({"student": weights}, storage_reader=FileSystemReader(ckpt), no_dist=True)
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), AutoProcessor.from_pretrained(student), cfg, state["step"]


def processor_or_none(path: str):
    from transformers import AutoProcessor

    names = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    return AutoProcessor.from_pretrained(path)


# --------------------------------------------------------------------------- quantized checkpoints

def _served_scale_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a served layer keeps a file's scales in (the kernels take float16 / bfloat16 scales).

    float32 scales (what a float32 ``grace export`` writes: the trained half-precision scales widened
    exactly) go back to a half dtype that holds every one of them exactly when there is one, the
    activation dtype first; otherwise to the activation dtype when it is a half dtype, else float16 when
    every scale lies in its normal range (3 more mantissa bits than bfloat16), else bfloat16."""
    if scale.dtype in SCALE_DTYPES:
        return scale.dtype
    order = [dtype] + [d for d in SCALE_DTYPES if d != dtype] if dtype in SCALE_DTYPES else list(SCALE_DTYPES)
    for cand in order:
        if torch.equal(scale.to(cand).to(scale.dtype), scale):
            return cand
    if dtype in SCALE_DTYPES:
        return dtype
    fp16 = torch.finfo(torch.float16)
    a = scale.float().abs()
    return torch.float16 if bool((a <= fp16.max).all() and (a >= fp16.smallest_normal).all()) else torch.bfloat16


def _check_zero_points(tensors: dict, ckpt: str, scale: torch.Tensor, bits: int, model_dir: str) -> torch.Tensor:
    """``<ckpt>.weight_zero_point``, checked to be compressed-tensors' layout for ``bits``-bit group-wise zero
    points: int32 [ceil(N * bits / 32), groups], 32 / bits zero points per word along the output dimension."""
    from grace_kernels.reference.w4a16 import zero_point_words

    zp = tensors[f"{ckpt}.weight_zero_point"]
    n, groups = scale.shape
    expected = (zero_point_words(n, bits=bits), groups)
    if zp.dtype != torch.int32 or tuple(zp.shape) != expected:
        raise ValueError(f"{model_dir}: {ckpt}.weight_zero_point is {zp.dtype} {tuple(zp.shape)}, expected int32 "
                         f"{expected} ({bits}-bit zero points packed along the output dimension)")
    return zp


def _symmetric_int8_codes(tensors: dict, ckpt: str, scale: torch.Tensor, group_size: int, model_dir: str) -> None:
    """Rewrite, in ``tensors``, the asymmetric 4-bit layer ``ckpt`` (codes q and zero points z in [-8, 7],
    W = scale * (q - z)) as the symmetric 8-bit layer with codes q - z in [-15, 15] and the same scales: the
    same weight, exactly, in the format :class:`W8A16Linear` serves.

    ``<ckpt>.weight_zero_point`` is compressed-tensors' layout: int32 [ceil(N / 8), groups], eight 4-bit zero
    points per word along the output dimension."""
    from grace_kernels import pack_int8
    from grace_kernels.reference.w4a16 import unpack_int4_ref, unpack_zero_points

    zp = _check_zero_points(tensors, ckpt, scale, 4, model_dir)
    packed = tensors[f"{ckpt}.weight_packed"]
    del tensors[f"{ckpt}.weight_zero_point"]
    zero = unpack_zero_points(zp, scale.shape[0], bits=4)   # [N, groups]
    codes = unpack_int4_ref(packed).to(torch.int16) - zero.to(torch.int16).repeat_interleave(group_size, dim=1)
    half = scale if scale.dtype in SCALE_DTYPES else scale.to(_served_scale_dtype(scale, torch.float32))
    tensors[f"{ckpt}.weight_packed"] = pack_int8(codes.to(torch.int8), half, group_size).packed


def _swap_in_served_linears(model: nn.Module, tensors: dict, names: dict[str, str], ignore: list[str],
                            scheme: Scheme, group_size: int, dtype: torch.dtype, model_dir: str,
                            symmetric: bool = True) -> None:
    """Step 1: replace every nn.Linear the config quantizes (not matched by ``ignore``, under its in-memory
    or its on-disk name) by an empty served layer of ``scheme`` of the same shape, after checking the
    file's scales for it (shape, dtype, finite and > 0: a NaN, Inf or zero scale would generate garbage)."""
    for name, ckpt in names.items():
        if matches_ignore(ckpt, ignore) or matches_ignore(name, ignore):
            continue
        lin = model.get_submodule(name)
        scale = tensors.get(f"{ckpt}.weight_scale")
        if scale is None or f"{ckpt}.weight_packed" not in tensors:
            raise ValueError(f"{model_dir}: {ckpt} is quantized by the config (not under 'ignore') but the "
                             f"checkpoint has no {ckpt}.weight_packed / {ckpt}.weight_scale")
        if f"{ckpt}.weight_g_idx" in tensors:
            raise ValueError(f"{model_dir}: {ckpt}.weight_g_idx holds an activation-order permutation (GPTQ "
                             "actorder 'group'), which this loader cannot apply")
        if symmetric and f"{ckpt}.weight_zero_point" in tensors:
            raise ValueError(f"{model_dir}: {ckpt}.weight_zero_point holds zero points but the config says the "
                             "weights are symmetric")
        if not symmetric and f"{ckpt}.weight_zero_point" not in tensors:
            raise ValueError(f"{model_dir}: the config says the weights are asymmetric but the checkpoint has no "
                             f"{ckpt}.weight_zero_point")
        if scale.dim() != 2 or lin.in_features != scale.shape[-1] * group_size:
            raise ValueError(f"{model_dir}: {ckpt}.weight_scale {tuple(scale.shape)} does not fit "
                             f"in_features {lin.in_features} with group_size {group_size}")
        if not scale.is_floating_point():
            raise ValueError(f"{model_dir}: {ckpt}.weight_scale is {scale.dtype}, not a float tensor")
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bool(bad.any()):
            raise ValueError(f"{model_dir}: {ckpt}.weight_scale holds {int(bad.sum())} scale(s) that are not finite "
                             f"and > 0 (such as {scale[bad].flatten()[0].item()}); the checkpoint is corrupt")
        served, zero_points = scheme, False
        if not symmetric and scheme.bits == ASYMMETRIC_AS_SYMMETRIC_8_BIT:
            _symmetric_int8_codes(tensors, ckpt, scale, group_size, model_dir)
            served = SCHEMES["int8"]
        elif not symmetric:   # 8-bit: the layer keeps the zero points (loaded by their on-disk name)
            _check_zero_points(tensors, ckpt, scale, scheme.bits, model_dir)
            zero_points = True
        replace_module(model, name, served.empty_layer(lin, group_size=group_size,
                                                       scale_dtype=_served_scale_dtype(scale, dtype),
                                                       bias_dtype=dtype, asymmetric=zero_points))


def _load_strict(model: nn.Module, tensors: dict, model_dir: str) -> None:
    """Step 2: load the file's tensors by their on-disk names; any missing or unexpected tensor, or a
    shape that does not fit, is an error (tied weights are saved once)."""
    state = model.state_dict(keep_vars=True)
    keys = list(state)
    to_disk = checkpoint_names(model, keys)
    from_disk = {v: k for k, v in to_disk.items()}
    unexpected = sorted(k for k in tensors if k not in from_disk)
    loaded = {from_disk[k]: t for k, t in tensors.items() if k in from_disk}
    present = {id(state[k]) for k in loaded}
    missing = sorted(to_disk[k] for k in keys if k not in loaded and id(state[k]) not in present)
    if unexpected or missing:
        raise ValueError(f"{model_dir}: checkpoint does not match the model built from its config; "
                         f"missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                         f"unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    bad = [f"{to_disk[k]} {tuple(t.shape)} != {tuple(state[k].shape)}" for k, t in loaded.items()
           if t.shape != state[k].shape]
    if bad:
        raise ValueError(f"{model_dir}: tensor shapes do not fit the model: {bad[:8]}")
    # load_state_dict copies into the existing tensors, converting dtypes (float32 scales included).
    model.load_state_dict(loaded, strict=False)
    for name, m in model.named_modules():
        shape = getattr(m, "weight_shape", None)
        if isinstance(shape, torch.Tensor) and shape.tolist() != [m.out_features, m.in_features]:
            raise ValueError(f"{model_dir}: {to_disk[name + '.weight_shape']} is {shape.tolist()}, "
                             f"the model expects {[m.out_features, m.in_features]}")


def _use_kernel_layout(model: nn.Module, dtype: torch.dtype) -> None:
    """Step 3: every INT4 layer the CUDA kernel takes holds only the kernel's layout."""
    convert_to_kernel_layout(model, dtype)


def load_quantized_model(model_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                         kernel_layout: bool | None = None):
    """Load a compressed-tensors pack-quantized checkpoint (INT4 or INT8) into this project's served layers.

    Reads what ``grace export`` writes and what other compressed-tensors producers (llm-compressor)
    write for a group-wise weight-only scheme of a registered width (:mod:`grace.schemes`), symmetric or
    asymmetric (``weight_zero_point`` tensors): symmetric 4 bits -> :class:`W4A16Linear`; asymmetric 4 bits ->
    a symmetric :class:`W8A16Linear` holding the codes q - z in [-15, 15] (the same weight, exactly); 8 bits
    -> :class:`W8A16Linear`, asymmetric ones with their zero points (``asymmetric=True``: W = s * (q - z),
    q - z in [-255, 255]); GPTQ's ``actorder`` "weight" / "static" included, as those files hold no
    g_idx. Tensors in any layout transformers loads (the
    llava-hf Hub layout ``vision_tower.vision_model.*`` included), an ``ignore`` list of exact names or
    ``re:`` patterns matched against either the on-disk or the in-memory module names, the format given
    per config group or at the top. Steps: build the model from config.json; swap every nn.Linear the
    config quantizes for an empty served layer (its scales checked: finite and > 0); load the
    safetensors strictly (a tensor the model does not hold, or a model tensor absent from the file, tied
    weights excepted, is an error); optionally convert the INT4 layers to the CUDA kernel's layout.

    Args:
        dtype: dtype of the full-precision tensors and of the activations (torch dtype or its name);
            None: the dtype config.json records (float32 when it records none). Scales keep their stored
            dtype when it is float16 or bfloat16. float32 scales (which the kernels do not take) go to a
            half dtype that holds them exactly when one does (a float32 ``grace export``'s always do),
            else are rounded to the activation dtype when that is float16 / bfloat16, else to float16
            (bfloat16 when a scale lies outside float16's normal range): relative error <= 2**-11
            (float16) or 2**-8 (bfloat16).
        kernel_layout: hold the INT4 weights only in the CUDA kernel's layout
            (``W4A16KernelLinear`` via ``grace_kernels.nn.convert_to_kernel_layout``: the packed weight held once),
            for every layer the CUDA kernel takes (float16/bfloat16 ``dtype``, N % 64 == 0, K % 128 == 0,
            group 128). None: when ``device`` is a GPU and the CUDA extension is built. INT8 layers (with or
            without zero points) have no CUDA kernel and always run on Triton (GPU) or the reference (CPU).

    Returns:
        (model in eval mode on ``device``, processor or None when the directory holds none).

    Raises:
        ValueError: no or a malformed config.json; no or an unsupported quantization_config (one line
            naming every unsupported field); a truncated or corrupt safetensors file (named); missing or
            unexpected tensors; a tensor whose shape does not fit the model; a scale that is NaN, Inf or
            <= 0 (the tensor named); a g_idx tensor; zero points in a symmetric checkpoint, none in an
            asymmetric one, or zero points not in compressed-tensors' packed layout.
    """
    from transformers import AutoModelForImageTextToText

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir} has no config.json")
    raw = read_json(config_path)
    if not raw.get("quantization_config"):
        raise ValueError(f"{config_path} has no quantization_config: not a quantized checkpoint")
    scheme, group_size, ignore, symmetric = read_checkpoint_config(raw["quantization_config"],
                                                        f"{config_path} quantization_config")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    dtype = dtype or DTYPES.get(raw.get("dtype") or raw.get("torch_dtype") or "float32", torch.float32)

    config = _config_from_dir(model_dir)
    # Our modules implement the quantization; left on the config, transformers would treat the model
    # as one its own compressed-tensors integration manages.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    tensors = read_safetensors(model_dir)
    adopt_checkpoint_layout(model, list(tensors))
    with torch.no_grad():
        _swap_in_served_linears(model, tensors, module_checkpoint_names(model, linear_names(model)), ignore,
                                scheme, group_size, dtype, model_dir, symmetric)
        _load_strict(model, tensors, model_dir)
    model = model.to(device).eval()
    if kernel_layout is None:
        # A GPU the extension has no kernel image for runs Triton on the canonical layout.
        kernel_layout = grace_kernels.cuda_ext_runs_on(device)
    if kernel_layout:
        _use_kernel_layout(model, dtype)
    return model, processor_or_none(model_dir)


# Kept for callers written before INT8 checkpoints existed (grace.demo); new code calls load_quantized_model.
load_int4_model = load_quantized_model


def load_model(model_dir: str, device: str | torch.device = "cpu"):
    """Load any model directory this project produces or consumes, for generation and evaluation.

    * a compressed-tensors checkpoint (config.json with a quantization_config): :func:`load_quantized_model`;
    * a plain Hugging Face checkpoint (config.json and weights): ``from_pretrained``;
    * a training run (with ``final/``) or its ``final/`` directory: the fake-quantized student
      (:func:`load_student`), so an export can be compared with what was trained;
    * an unfinished training run (``checkpoint/``, no ``final/``): the student of its latest checkpoint
      (:func:`load_checkpoint_student`).

    Returns:
        (model in eval mode on ``device``, processor or None).

    Raises:
        ValueError: the directory is none of these, or a file in it is malformed or truncated.
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir!r} is not a directory")
    if find_final(model_dir) is not None:
        return load_student(model_dir, device)
    if find_checkpoint(model_dir) is not None:
        return load_checkpoint_student(model_dir, device=device)[:2]
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir!r} is neither a model directory (config.json) nor a finished training run "
                         "(final/student_state.pt)")
    if read_json(config_path).get("quantization_config"):
        return load_quantized_model(model_dir, device)
    if not any(os.path.isfile(os.path.join(model_dir, w)) for w in WEIGHT_FILES):
        raise ValueError(f"{model_dir!r} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")
    return load_pretrained(model_dir, device=device).eval(), processor_or_none(model_dir)
