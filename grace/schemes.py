"""Quantization schemes, registered by name: how a student's linears are trained, served and written.

A :class:`Scheme` has the two steps of torchao's QAT flow and the checkpoint format between them:

* :meth:`Scheme.prepare`: swap the family's quantized linears for LSQ :class:`~grace_kernels.nn.QuantLinear`
  layers (training sees exactly the weights the checkpoint will hold);
* :meth:`Scheme.convert`: a trained QuantLinear -> the served layer (``W4A16Linear``, ``W8A16Linear``);
* :meth:`Scheme.checkpoint_config` / :func:`read_checkpoint_config`: the compressed-tensors
  ``quantization_config`` block written into, and read from, config.json.

:data:`SCHEMES` holds ``int4`` (the paper's W4A16), ``int8`` (W8A16, the paper's Table 2 INT8 rows) and
``full`` (full-precision distillation, Table 1: no quantized layer, a plain Hugging Face checkpoint).
Adding a scheme is one entry there (plus its served layer in grace_kernels.nn).

Both quantized schemes write compressed-tensors "pack-quantized": symmetric, group-wise, static,
weight-only integer codes packed into int32 (what llm-compressor writes for W4A16 / W8A16 and vLLM serves
with ``CompressedTensorsWNA16``).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from grace_kernels.nn import QuantLinear, W4A16Linear, W8A16Linear

# The compressed-tensors release whose on-disk schema this module writes (and the tests check).
COMPRESSED_TENSORS_VERSION = "0.20.0"
# GPTQ's activation orderings that only change how the codes were calibrated, not the file's layout
# (compressed-tensors' ActivationOrdering "weight" and its alias "static"): such files hold no g_idx.
LAYOUT_FREE_ACTORDER = (None, "weight", "static")
# Asymmetric checkpoints of this width are read as symmetric 8-bit ones: q - zero_point of two 4-bit codes lies
# in [-15, 15], so the layer becomes an exact symmetric W8A16Linear (same scales and groups). 8-bit codes minus
# 8-bit zero points span [-255, 255]: those layers keep their zero points (W8A16Linear(asymmetric=True)).
ASYMMETRIC_AS_SYMMETRIC_8_BIT = 4


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One way of quantizing a student's linears.

    Attributes:
        name: the registry key (``int4``, ``int8``, ``full``).
        bits: code width (None: full precision, nothing quantized).
        served: the inference layer a trained QuantLinear becomes (None for full precision), with the
            constructor ``served(in_features, out_features, bias, *, group_size, scale_dtype, bias_dtype)``
            and ``served.from_quant_linear(quant_linear, scale_dtype)``.
    """

    name: str
    bits: int | None
    served: type[nn.Module] | None

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def prepare(self, model: nn.Module, **kwargs) -> nn.Module:
        """Swap the linears this scheme quantizes for QuantLinear, in place (``kwargs``: those of
        :func:`grace.quantize.quantize_model` but ``bits``); full precision leaves the model as it is."""
        from grace.quantize import quantize_model

        if not self.quantized:
            model.grace_quantized_modules = []
            return model
        return quantize_model(model, bits=self.bits, **kwargs)

    def convert(self, layer: QuantLinear, scale_dtype=None) -> nn.Module:
        """The served layer holding exactly the codes and scales ``layer`` trained with.

        Raises:
            ValueError: a full-precision scheme (nothing to convert), or ``layer`` trained another width.
        """
        if not self.quantized:
            raise ValueError("the full-precision scheme has no quantized layers to convert")
        if layer.bits != self.bits:
            raise ValueError(f"scheme {self.name} converts {self.bits}-bit layers; this one has bits={layer.bits}")
        return self.served.from_quant_linear(layer, scale_dtype)

    def empty_layer(self, linear: nn.Linear, *, group_size: int, scale_dtype, bias_dtype,
                    asymmetric: bool = False) -> nn.Module:
        """An untrained served layer of ``linear``'s shape, for loading a checkpoint into; ``asymmetric``: with
        zero points (only the 8-bit layer holds them; ValueError for another scheme)."""
        kwargs = {}
        if asymmetric:
            if self.bits != 8:
                raise ValueError(f"scheme {self.name} has no layer with zero points (only int8 has)")
            kwargs["asymmetric"] = True
        return self.served(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           group_size=group_size, scale_dtype=scale_dtype, bias_dtype=bias_dtype, **kwargs)

    def checkpoint_config(self, *, group_size: int, ignore: list[str]) -> dict | None:
        """The ``quantization_config`` block of config.json, as compressed-tensors 0.20 writes it for a
        symmetric INT weight-only group scheme (``QuantizationConfig.model_dump()`` plus the version,
        sparsity and transform entries of ``ModelCompressor.update_config``); None for full precision."""
        if not self.quantized:
            return None
        return {
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": self.bits, "type": "int", "symmetric": True, "group_size": group_size,
                            "strategy": "group", "dynamic": False},
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
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


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("int4", 4, W4A16Linear),
    Scheme("int8", 8, W8A16Linear),
    Scheme("full", None, None),
)}


def scheme_for_bits(bits: int | None) -> Scheme:
    """The registered scheme of a run trained with ``bits`` (None: full precision).

    Raises:
        ValueError: no scheme serves that width (the message lists the ones that exist).
    """
    for scheme in SCHEMES.values():
        if scheme.bits == bits:
            return scheme
    raise ValueError(f"no quantization scheme serves bits={bits!r}; registered: "
                     f"{', '.join(f'{s.name} (bits={s.bits})' for s in SCHEMES.values())}")


def read_checkpoint_config(qc: dict, where: str) -> tuple[Scheme, int, list[str], bool]:
    """(scheme, group_size, ignore, symmetric) of a compressed-tensors ``quantization_config`` this project
    serves.

    Accepted: one config group targeting ``Linear``, format "pack-quantized" (per group or at the top),
    group-wise static int weights of a registered width, symmetric or asymmetric (zero points: llm-compressor's
    W4A16_ASYM, what compressed-tensors' AWQ converter writes, and W8A16 with ``symmetric: false``), no
    activation quantization;
    GPTQ's ``actorder`` "weight"/"static" (the file holds no g_idx). Anything else is a ValueError that
    starts with ``where`` and names every unsupported field in one line.
    """
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{where}: quant_method {qc.get('quant_method')!r} is not 'compressed-tensors'")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"{where}: expected one config group, found {len(groups or {})} "
                         "(checkpoints mixing schemes are not supported)")
    g = next(iter(groups.values()))
    fmt = g.get("format") or qc.get("format")
    if fmt != "pack-quantized":
        raise ValueError(f"{where}: format {fmt!r} is not 'pack-quantized'")
    w = g.get("weights") or {}
    problems = []
    if g.get("targets") != ["Linear"]:
        problems.append(f"targets {g.get('targets')} (supported: ['Linear'])")
    if g.get("input_activations") or g.get("output_activations"):
        problems.append("activation quantization (only weight-only W4A16 / W8A16 is supported)")
    widths = {s.bits: s for s in SCHEMES.values() if s.quantized}
    scheme = widths.get(w.get("num_bits"))
    if scheme is None:
        problems.append(f"num_bits {w.get('num_bits')!r} (supported: {sorted(widths)})")
    if w.get("type") != "int":
        problems.append(f"type {w.get('type')!r} (supported: int)")
    symmetric = w.get("symmetric") is not False
    if w.get("strategy") != "group":
        problems.append(f"strategy {w.get('strategy')!r} (supported: group)")
    if w.get("dynamic"):
        problems.append("dynamic weight quantization")
    if w.get("actorder") not in LAYOUT_FREE_ACTORDER:
        problems.append(f"actorder {w.get('actorder')!r} (a g_idx permutation; supported: null, weight, static)")
    if w.get("block_structure"):
        problems.append("block structure")
    if not isinstance(w.get("group_size"), int) or w["group_size"] < 1:
        problems.append(f"group_size {w.get('group_size')!r}")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        problems.append(f"ignore {ignore!r} (a list of names or 're:' patterns)")
    if problems:
        raise ValueError(f"{where}: unsupported {'; '.join(problems)}")
    return scheme, w["group_size"], ignore, symmetric


def serving_routes(device=None) -> dict:
    """What each checkpoint format :func:`grace.load.load_quantized_model` reads becomes on this machine: the
    served layer and the backend its GEMM runs on for tensors on ``device`` (default: ``cuda`` when a GPU is
    visible, else ``cpu``), as grace_kernels' one backend chooser picks it (``GRACE_KERNELS_BACKEND`` and
    TRITON_INTERPRET included). Printed by ``grace info``.

    Returns {"device": str, <format>: {"layer": str, "backend": str}} for the formats ``int4`` (symmetric W4A16),
    ``int4-asymmetric`` (zero points; read as symmetric 8-bit codes), ``int8`` (symmetric W8A16) and
    ``int8-asymmetric`` (zero points kept). A backend that a forced ``GRACE_KERNELS_BACKEND`` makes impossible
    reads ``"none: <why>"``.
    """
    import torch

    from grace_kernels.ops.w4a16 import canonical_backend, w4a16_backend

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    def chosen(pick) -> str:
        try:
            return pick()
        except RuntimeError as e:
            return f"none: {e}"

    int4 = chosen(lambda: w4a16_backend(device))
    if int4 == "cuda":
        others = chosen(lambda: w4a16_backend(device, cuda_unsupported="a shape the CUDA kernel does not take"))
        int4 = (f"cuda (the CUDA kernel, for layers with N % 64 == 0, K % 128 == 0, group_size 128 and float16/"
                f"bfloat16 activations; other layers: {others})")
    no_kernel = "no CUDA kernel for 8-bit codes or zero points"
    int8 = chosen(lambda: canonical_backend("w8a16_matmul", device))
    int8 = int8 if int8.startswith("none") else f"{int8} ({no_kernel})"
    w4, w8 = SCHEMES["int4"].served.__name__, SCHEMES["int8"].served.__name__
    return {
        "device": str(device),
        "int4": {"layer": w4, "backend": int4},
        "int4-asymmetric": {"layer": f"{w8} (read as symmetric 8-bit codes q - z in [-15, 15]: the same weight, "
                                     "exactly)", "backend": int8},
        "int8": {"layer": w8, "backend": int8},
        "int8-asymmetric": {"layer": f"{w8}(asymmetric=True) (zero points kept: W = s * (q - z))", "backend": int8},
    }
