"""Export a trained GRACE student as an INT4 Hugging Face checkpoint, and load model directories back.

Export format: compressed-tensors "pack-quantized" (what llm-compressor writes and vLLM serves with
its own INT4 kernels). Every quantized nn.Linear ``<name>`` becomes

    <name>.weight_packed  int32 [N, K / 8]            u = q + 8, eight per word, low nibble first along K
    <name>.weight_scale   [N, K / group_size]         float16 or bfloat16 (the scale dtype of training)
    <name>.weight_shape   int64 [2]                   (N, K)
    <name>.bias           when the layer has one

with W = weight_scale * q, q in [-8, 7] (symmetric, no zero point). Every other tensor is stored as it
is; config.json gains the ``quantization_config`` block that compressed-tensors 0.20 writes for a
W4A16 group scheme, listing every nn.Linear left in full precision under "ignore". Tensor and module
names are the checkpoint names transformers' ``save_pretrained`` writes (for LLaVA in transformers 5:
``language_model.model.layers...``), so the file matches a checkpoint saved by transformers itself.

The codes and scales are exactly those the fake-quantized student trained with
(:meth:`QuantLinear.quantize`), so loading the export into :class:`W4A16Linear` modules reproduces
the student's logits up to matmul rounding.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from torch import nn

from grace.quantize import quantize_model, replace_module
from grace_kernels.nn import QuantLinear, W4A16Linear, convert_to_kernel_layout

FORMATS = ("pack-quantized",)
# The compressed-tensors release whose on-disk schema this module writes (and the tests check).
COMPRESSED_TENSORS_VERSION = "0.20.0"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- run directories

def _find_final(run_dir: str) -> str | None:
    """The ``final/`` directory of a training run (``run_dir`` may also be that directory itself)."""
    for cand in (os.path.join(run_dir, "final"), run_dir):
        if os.path.isfile(os.path.join(cand, "student_state.pt")) and os.path.isfile(
                os.path.join(cand, "quantization.json")):
            return cand
    return None


def _final_dir(run_dir: str) -> str:
    final = _find_final(run_dir)
    if final is not None:
        return final
    raise ValueError(f"{run_dir!r} is not a finished training run: no final/student_state.pt and "
                     f"final/quantization.json (a run writes them when training ends)")


def _read_quantization(final: str) -> dict:
    with open(os.path.join(final, "quantization.json")) as f:
        q = json.load(f)
    missing = [k for k in ("bits", "group_size", "scale_dtype", "modules") if k not in q]
    if missing:
        raise ValueError(f"{final}/quantization.json lacks {missing}")
    if q["scale_dtype"] not in (None, "bfloat16", "float16"):
        raise ValueError(f"{final}/quantization.json: scale_dtype must be bfloat16, float16 or null, "
                         f"got {q['scale_dtype']!r}")
    return q


def load_student(run_dir: str, device: str | torch.device = "cpu"):
    """The fake-quantized student of a finished run, as training left it.

    Rebuilds the model from ``final/config.json``, swaps the recorded Linear modules for
    :class:`QuantLinear` with the recorded bits / group size / scale dtype, and loads
    ``final/student_state.pt`` strictly (weights and log-scales).

    Returns:
        (model in eval mode on ``device``, float32; processor, or None when final/ holds none).

    Raises:
        ValueError: ``run_dir`` has no final/ student, or its state does not fit the rebuilt model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    final = _final_dir(run_dir)
    q = _read_quantization(final)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(final))
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
    state = torch.load(os.path.join(final, "student_state.pt"), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{final}/student_state.pt does not match the model its config builds: {e}") from e
    return model.to(device).eval(), _processor_or_none(final)


def _processor_or_none(path: str):
    from transformers import AutoProcessor

    names = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    return AutoProcessor.from_pretrained(path)


# --------------------------------------------------------------------------- names on disk

def _checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """In-memory state-dict key -> the key ``save_pretrained`` writes (transformers reverses its
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
                         "this exporter handles renaming-only model families")
    return {keys[int(t.item())]: new for new, t in out.items()}


def _module_checkpoint_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    # compressed-tensors maps ignore entries the same way: as the names of their ".weight" tensors.
    m = _checkpoint_names(model, [f"{n}.weight" for n in names])
    return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in m.items()}


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------- export

def pack_quantized_config(*, group_size: int, ignore: list[str]) -> dict:
    """The ``quantization_config`` block of config.json, as compressed-tensors 0.20 writes it for a
    symmetric INT weight-only group scheme (``QuantizationConfig.model_dump()`` plus the version,
    sparsity and transform entries of ``ModelCompressor.update_config``)."""
    return {
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group_size,
                        "strategy": "group", "dynamic": False},
            "input_activations": None,
            "output_activations": None,
            "format": None,
        }},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def export_run(run_dir: str, out_dir: str, *, format: str = "pack-quantized", dtype: str | None = None,
               overwrite: bool = False) -> str:
    """Write the trained student of ``run_dir`` as an INT4 Hugging Face checkpoint in ``out_dir``.

    Args:
        run_dir: a finished training run (with ``final/``), or its ``final/`` directory.
        out_dir: the model directory to create: model.safetensors, config.json with the
            compressed-tensors ``quantization_config``, generation config, processor/tokenizer files.
        format: "pack-quantized" (the only one so far).
        dtype: "bfloat16", "float16" or "float32" for the tensors kept in full precision (vision
            tower, projector, embeddings, norms, LM head, biases); None keeps the float32 master
            weights, so the export is exactly the trained student. The INT4 scales keep the scale
            dtype the run trained with (bfloat16 when it trained with float32 scales), whatever ``dtype``.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``. The directory appears complete or not at all: everything is written to a
        temporary sibling that is renamed into place at the end.

    Raises:
        ValueError: no finished run, a run without 4-bit quantization, an unknown format or dtype,
            a non-empty ``out_dir`` without ``overwrite``.
    """
    if format not in FORMATS:
        raise ValueError(f"unsupported export format {format!r}; supported: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
    final = _final_dir(run_dir)
    q = _read_quantization(final)
    if q["bits"] != 4:
        raise ValueError(f"the {format} export holds 4-bit weights; this run was trained with bits={q['bits']}")
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory")

    model, processor = load_student(final)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        for name in quantized:
            replace_module(model, name, W4A16Linear.from_quant_linear(model.get_submodule(name)))
        if dtype is not None:
            # Parameters only: the INT4 scales are buffers and keep their trained dtype.
            for p in model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(_DTYPES[dtype])
    ignore = _linear_names(model)   # the quantized ones are W4A16Linear now, no longer nn.Linear
    names = _module_checkpoint_names(model, ignore)
    qconfig = pack_quantized_config(group_size=q["group_size"], ignore=[names[n] for n in ignore])

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        # mkdtemp makes the directory private (0700); the model directory gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            config = json.load(f)
        config["quantization_config"] = qconfig
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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


# --------------------------------------------------------------------------- loading

def _read_config(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_pack_quantized(qc: dict, model_dir: str) -> tuple[int, list[str]]:
    """(group_size, ignore) of a quantization_config this loader supports; ValueError naming the rest."""
    where = f"{model_dir}/config.json quantization_config"
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{where}: quant_method {qc.get('quant_method')!r} is not 'compressed-tensors'")
    if qc.get("format") != "pack-quantized":
        raise ValueError(f"{where}: format {qc.get('format')!r} is not 'pack-quantized'")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"{where}: expected one config group, found {len(groups)}")
    g = groups[0]
    w = g.get("weights") or {}
    problems = []
    if g.get("targets") != ["Linear"]:
        problems.append(f"targets {g.get('targets')} (supported: ['Linear'])")
    if g.get("input_activations") or g.get("output_activations"):
        problems.append("activation quantization (only weight-only W4A16 is supported)")
    if (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) != (4, "int", True, "group"):
        problems.append(f"weights {w} (supported: num_bits 4, type int, symmetric, strategy group)")
    if w.get("actorder") or w.get("block_structure"):
        problems.append("activation ordering / block structure")
    if problems:
        raise ValueError(f"{where}: unsupported {'; '.join(problems)}")
    return int(w["group_size"]), list(qc.get("ignore") or [])


def _ignored(name: str, ignore: list[str]) -> bool:
    # compressed-tensors' rule: "re:<pattern>" is re.match, anything else an exact name
    return any(re.match(p[3:], name) if p.startswith("re:") else p == name for p in ignore)


def _read_safetensors(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{model_dir} has no model.safetensors (or model.safetensors.index.json)")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(model_dir, name)))
    return tensors


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return _DTYPES.get(name, torch.float32)


def load_int4_model(model_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    kernel_layout: bool | None = None):
    """Load a pack-quantized INT4 checkpoint into this project's modules.

    Builds the model from config.json, replaces every nn.Linear not listed under "ignore" by a
    :class:`W4A16Linear`, and loads the safetensors strictly: a tensor the model does not hold, or a
    model tensor absent from the file (tied weights excepted), is an error.

    Args:
        dtype: dtype of the full-precision tensors and of the activations (torch dtype or its name);
            None: the dtype config.json records (float32 when it records none). INT4 scales keep
            the dtype stored in the file.
        kernel_layout: hold the INT4 weights only in the CUDA kernel's layout
            (``W4A16KernelLinear``, via ``convert_to_kernel_layout``: the packed weight held once),
            for every layer the CUDA kernel takes (float16/bfloat16 ``dtype``, N % 64 == 0, K % 128 == 0,
            group 128). None: when ``device`` is a GPU and the CUDA extension is built.

    Returns:
        (model in eval mode on ``device``, processor or None when the directory holds none).

    Raises:
        ValueError: no config.json, no or an unsupported quantization_config, missing or unexpected
            tensors, a tensor whose shape does not fit the model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    raw = _read_config(model_dir)
    if raw is None:
        raise ValueError(f"{model_dir} has no config.json")
    if not raw.get("quantization_config"):
        raise ValueError(f"{model_dir}/config.json has no quantization_config: not a quantized checkpoint")
    group_size, ignore = _check_pack_quantized(raw["quantization_config"], model_dir)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    dtype = dtype or _config_dtype(raw)

    config = AutoConfig.from_pretrained(model_dir)
    # Our modules implement the quantization; left on the config, transformers would treat the model
    # as one its own compressed-tensors integration manages.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    tensors = _read_safetensors(model_dir)

    linears = _linear_names(model)
    on_disk = _module_checkpoint_names(model, linears)
    with torch.no_grad():
        for name in linears:
            ckpt = on_disk[name]
            if _ignored(ckpt, ignore):
                continue
            lin = model.get_submodule(name)
            scale = tensors.get(f"{ckpt}.weight_scale")
            if scale is None or f"{ckpt}.weight_packed" not in tensors:
                raise ValueError(f"{model_dir}: {ckpt} is quantized by the config (not under 'ignore') but the "
                                 f"checkpoint has no {ckpt}.weight_packed / {ckpt}.weight_scale")
            if lin.in_features != scale.shape[-1] * group_size:
                raise ValueError(f"{model_dir}: {ckpt}.weight_scale {tuple(scale.shape)} does not fit "
                                 f"in_features {lin.in_features} with group_size {group_size}")
            replace_module(model, name, W4A16Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                           group_size=group_size, scale_dtype=scale.dtype, bias_dtype=dtype))

    state = model.state_dict(keep_vars=True)
    keys = list(state)
    to_disk = _checkpoint_names(model, keys)
    from_disk = {v: k for k, v in to_disk.items()}
    unexpected = sorted(k for k in tensors if k not in from_disk)
    loaded = {from_disk[k]: t for k, t in tensors.items() if k in from_disk}
    # Tied weights are saved once: a key is satisfied when any key sharing its tensor was loaded.
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
    model.load_state_dict(loaded, strict=False)
    for name, m in model.named_modules():
        if isinstance(m, W4A16Linear) and m.weight_shape.tolist() != [m.out_features, m.in_features]:
            raise ValueError(f"{model_dir}: {on_disk[name]}.weight_shape is {m.weight_shape.tolist()}, "
                             f"the model expects {[m.out_features, m.in_features]}")
    model = model.to(device).eval()
    if kernel_layout is None:
        from grace_kernels._backend import cuda_ext_available

        kernel_layout = torch.device(device).type == "cuda" and cuda_ext_available()
    if kernel_layout:
        convert_to_kernel_layout(model, dtype)
    return model, _processor_or_none(model_dir)


def load_model(model_dir: str, device: str | torch.device = "cpu"):
    """Load any model directory this project produces or consumes, for generation and evaluation.

    * a compressed-tensors checkpoint (config.json with a quantization_config): :func:`load_int4_model`;
    * a plain Hugging Face checkpoint (config.json and weights): ``from_pretrained``;
    * a training run (with ``final/``) or its ``final/`` directory: the fake-quantized student
      (:func:`load_student`), so an export can be compared with what was trained.

    Returns:
        (model in eval mode on ``device``, processor or None).

    Raises:
        ValueError: the directory is none of these.
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir!r} is not a directory")
    if _find_final(model_dir) is not None:
        return load_student(model_dir, device)
    config = _read_config(model_dir)
    if config is None:
        raise ValueError(f"{model_dir!r} is neither a model directory (config.json) nor a finished training run "
                         "(final/student_state.pt)")
    if config.get("quantization_config"):
        return load_int4_model(model_dir, device)
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any(os.path.isfile(os.path.join(model_dir, w)) for w in weights):
        raise ValueError(f"{model_dir!r} has a config.json but no weights ({', '.join(weights)})")
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    return model.to(device).eval(), _processor_or_none(model_dir)
