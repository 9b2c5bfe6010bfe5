"""Training configuration: the paper's defaults, the authors' released settings as a preset, and
the ablation switches of the paper's Tables 3 and 4."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import sys

import torch

from grace.io import read_json, write_json
from grace.reporting import parse_report_to
from grace.schemes import SCHEMES
from grace_kernels import KD_TYPES
from grace_kernels.int4 import GROUP_SIZES
from grace_kernels.int4 import SCALE_DTYPES as _INT4_SCALE_DTYPES

# The LSQ scale initialisations grace_kernels.lsq_init_log_scale offers.
INIT_METHODS = ("percentile", "mse")

MIXED_PRECISION = ("auto", "bf16", "none")

# The scale dtypes an INT4 checkpoint may hold, by name (the dtypes themselves: grace_kernels.int4).
SCALE_DTYPES = tuple(str(d).removeprefix("torch.") for d in _INT4_SCALE_DTYPES)

# Each preset is one convention, the loss's scale and the controller's budget tau together (tau only means
# something on the scale GDKD is measured in):
# * "paper": the paper's Eqs. 1-3 (DKD = tckd_weight TCKD + nckd_weight NCKD, no T^2 factor) and its Table 6
#   (tau 0.35, eta 0.0015, beta in [0.1, 5], 99th-percentile LSQ init); these are TrainConfig's defaults.
# * "released": the authors' released code (ForeverBlue816/GRACE: qwen-vl-finetune/scripts/
#   finetune_qwen3vl_2b_grace.slurm, Qwen3-VL 8B -> 2B, and qwenvl/train/grace_modules.py, whose
#   decoupled_kd_per_token multiplies by T * T). It departs from Table 6 in: the T^2 factor, the IB controller
#   (IB_TAU, IB_ETA, IB_BETA_*), RCKA_WEIGHT, DKD_WARMUP_STEPS=0 and RCKA_WARMUP_STEPS=400, QAT_SCALE_LR,
#   LEARNING_RATE 1e-5 and one epoch, a per-device batch of 2 with 16 accumulation steps, MODEL_MAX_LENGTH 8192,
#   gradient checkpointing, MSE scale init.
PRESETS = {
    "paper": {"kd_t2": False, "tau": 0.35, "eta": 0.0015, "init_method": "percentile"},
    "released": {"kd_t2": True, "tau": 3.0, "eta": 0.003, "beta_init": 0.5, "beta_min": 0.1, "beta_max": 1.0,
                 "omega": 3.0,
                 "gdkd_warmup_steps": 0, "rcka_warmup_steps": 400, "scale_lr": 2e-4, "scale_weight_decay": 0.0,
                 "init_method": "mse", "lr": 1e-5, "epochs": 1, "batch_size": 2, "grad_accum": 16,
                 "max_length": 8192, "gradient_checkpointing": True},
}


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a ``grace train`` run; each field is also a command-line flag (``--max-steps``).

    The string under each field is its documentation: ``grace train --help`` shows it (:func:`field_docs`).
    Defaults are the paper's (Table 6); ``from_preset("released")`` starts from the authors' release.
    """

    # models and data
    teacher: str = ""
    """The frozen teacher: a local Hugging Face checkpoint directory (required unless --no-kd and --no-rcka)."""
    student: str = ""
    """The student to quantize and train: a local Hugging Face checkpoint directory of the teacher's family."""
    data: str = ""
    """LLaVA-format conversation JSON: a list of records with "conversations" and an optional "image"."""
    image_folder: str = ""
    """Root of the records' relative image paths ("": the current directory)."""
    output_dir: str = "runs/grace"
    """The run directory: config.json, metrics.jsonl, checkpoint/, final/, controller.png."""
    # quantization
    bits: int | None = 4
    """Weight bits of the student's language-model linears: 4, 8, or none (plain distillation, no
    quantization)."""
    group_size: int = 128
    """Weights per learned scale, consecutive along the input dimension."""
    init_method: str = "percentile"
    """LSQ scale initialisation: "percentile" (the paper's 99th percentile / Qp) or "mse" (the release's
    clipping search)."""
    scale_dtype: str | None = "bfloat16"
    """The dtype the scales are rounded to while training, the one an INT4 checkpoint holds (none: float32)."""
    # optimization (paper, Table 6)
    epochs: int = 3
    """Passes over the data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (none: the epochs decide)."""
    batch_size: int = 4
    """Samples per micro-batch on each process."""
    grad_accum: int = 4
    """Micro-batches per optimizer step (effective batch: batch_size x grad_accum x processes)."""
    lr: float = 2e-5
    """Peak learning rate of the weights (linear warm-up, then cosine decay to 0)."""
    scale_lr: float | None = None
    """Learning rate of the LSQ log-scales (none: the same as --lr)."""
    weight_decay: float = 1e-3
    """AdamW weight decay of the weights."""
    scale_weight_decay: float | None = None
    """AdamW weight decay of the log-scales (none: the same as --weight-decay)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up, in [0, 1)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_length: int = 2048
    """Longest tokenized sample; longer samples are skipped and counted."""
    # Linux forks the workers cheaply; elsewhere spawning them costs more than it saves.
    num_workers: int = min(4, os.cpu_count() or 1) if sys.platform.startswith("linux") else 0
    """DataLoader worker processes encoding samples (0: in the training process). The samples and their order
    do not depend on it."""
    group_by_length: bool = False
    """Micro-batches of one modality and similar length (less padding)."""
    cache_samples: bool = False
    """Keep encoded samples in memory (small data, many epochs: the demo)."""
    bf16: bool = True
    """On CUDA: bf16 teacher and vision-tower weights, and bf16 autocast when --mixed-precision is auto."""
    mixed_precision: str = "auto"
    """Autocast of the forward passes: bf16, none, or auto (bf16 on CUDA with --bf16, float32 elsewhere)."""
    gradient_checkpointing: bool = False
    """Recompute the student's activations in the backward pass: less memory, more time."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (the paper's setup); --no-freeze-vision trains it too (pretraining)."""
    # objective
    temperature: float = 2.0
    """Distillation temperature T of the DKD softmaxes."""
    # The KD term's convention: gradients of the softened logits keep their size as T grows with the T^2
    # factor. The GDKD the controller compares with tau is measured on the same scale, so tau must belong to
    # the same convention (PRESETS).
    kd_t2: bool = False
    """Multiply the per-token KD term by T^2 (the release's, Hinton's and DKD's convention); off: the paper's
    Eqs. 1-3."""
    tckd_weight: float = 1.0
    """Weight of the target-class KD term (TCKD) in DKD."""
    nckd_weight: float = 4.0
    """Weight of the non-target-class KD term (NCKD) in DKD."""
    gate_temperature: float = 1.0
    """Temperature of the teacher softmax whose entropy sets the confidence gate g = exp(-H / log V)."""
    omega: float = 1.0
    """Weight of the relational CKA term (RCKA)."""
    gdkd_warmup_steps: int = 0
    """Ramp the GDKD term as min(1, step / N) (0: no ramp)."""
    rcka_warmup_steps: int = 0
    """Ramp the RCKA term as min(1, step / N) (0: no ramp)."""
    # controller
    tau: float = 0.35
    """The controller's target for the EMA of GDKD: beta rises while the EMA is above it."""
    eta: float = 0.0015
    """Step size of the controller's dual ascent on beta."""
    beta_init: float = 1.0
    """Initial weight beta of the GDKD term."""
    beta_min: float = 0.1
    """Lower bound of beta."""
    beta_max: float = 5.0
    """Upper bound of beta."""
    ema_decay: float = 0.99
    """Decay of the exponential moving average of GDKD the controller reads, in [0, 1)."""
    # ablations (paper Tables 3 and 4)
    kd: bool = True
    """Distill from the teacher (--no-kd: QAT only, the CE term alone)."""
    kd_type: str = "dkd"
    """The KD term: dkd (decoupled KD, TCKD + NCKD) or kl (naive KD)."""
    gate: bool = True
    """Weight each token's KD by the teacher's confidence (--no-gate: every token weight 1)."""
    rcka: bool = True
    """Add the relational CKA term on the penultimate layer's visual tokens."""
    adaptive_beta: bool = True
    """Let the controller set beta (--no-adaptive-beta: beta stays at --beta-init)."""
    # bookkeeping
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: only at the end)."""
    save_every_minutes: float = 30.0
    """Also write a checkpoint once this many minutes of wall time have passed since the last one (0: off)."""
    report_to: str | None = None
    """Loggers beside metrics.jsonl, comma-separated: tensorboard (needs the tensorboard package; none: only
    metrics.jsonl)."""
    resume: bool = False
    """Continue the run in --output-dir from its checkpoint/ (the settings must match, except those that may
    change on resume)."""
    accept_data_change: bool = False
    """With --resume: continue although the data file changed since the checkpoint (from the next epoch of the
    new file, with a fresh skip list)."""
    overwrite: bool = False
    """Replace the run in --output-dir (without it or --resume, an existing run is refused)."""
    seed: int = 0
    """Seed of torch's generator and of the data order."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when visible, else the CPU)."""
    preset: str = "paper"
    """Where the defaults come from: paper (Table 6) or released (the authors' release, ForeverBlue816/GRACE)."""

    @classmethod
    def from_preset(cls, preset: str = "paper", **overrides) -> TrainConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides, "preset": preset})

    def kd_convention(self) -> str:
        """The KD term's convention in words, for plots and reports (``kd_t2``, see PRESETS)."""
        return ("release convention: KD x T^2" if self.kd_t2 else "paper convention: KD without T^2 (Eqs. 1-3)") \
            + f", T {self.temperature:g}, tau {self.tau:g}"

    def compute_dtype(self, device_type: str) -> torch.dtype:
        """The autocast dtype of the forward passes on ``device_type``: bfloat16 for ``mixed_precision`` "bf16";
        float32 (no autocast) for "none"; for "auto", bfloat16 on CUDA when ``bf16`` is set (the paper trains
        in bf16) and float32 elsewhere (CPU bf16 matmuls are slower than float32 ones). Master weights,
        gradients, their reduction across ranks and the optimizer states stay float32 in every case."""
        if self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and self.bf16 and device_type == "cuda"):
            return torch.bfloat16
        return torch.float32

    def validate(self, *, check_paths: bool = True) -> None:
        """Check every option before anything is loaded.

        Ranges: lr, scale_lr, max_grad_norm, temperature, gate_temperature finite and > 0; weight decays,
        loss weights (tckd_weight, nckd_weight, omega), tau, eta, save_every_minutes finite and >= 0;
        0 <= beta_min <= beta_init <= beta_max, finite; ema_decay and warmup_ratio in [0, 1); batch_size, grad_accum,
        epochs, max_length, max_steps integers >= 1; save_every, gdkd_warmup_steps, rcka_warmup_steps, seed,
        num_workers integers >= 0; mixed_precision one of "auto", "bf16", "none".
        With ``check_paths``: the teacher's (when used) and student's config.json exist and parse, the data
        file exists, and output_dir is not under a regular file.

        Raises:
            ValueError: one message listing every problem, each naming its option.
            GraceError: a model's config.json is not valid JSON (the file is named).
        """
        problems = []
        if self.bits not in FIELD_CHOICES["bits"]:
            problems.append(f"bits must be one of {', '.join(map(str, FIELD_CHOICES['bits']))}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            problems.append(f"group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.kd_type not in KD_TYPES:
            problems.append(f"kd_type must be one of {', '.join(KD_TYPES)}, got {self.kd_type!r}")
        if self.scale_dtype not in FIELD_CHOICES["scale_dtype"]:
            problems.append(f"scale_dtype must be {', '.join(SCALE_DTYPES)} or None, got {self.scale_dtype!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                            f"got {self.mixed_precision!r}")
        if self.init_method not in INIT_METHODS:
            problems.append(f"init_method must be one of {', '.join(INIT_METHODS)}, got {self.init_method!r}")
        if not isinstance(self.kd_t2, bool):
            problems.append(f"kd_t2 must be True or False, got {self.kd_t2!r}")
        if self.preset not in PRESETS:
            problems.append(f"preset must be one of {', '.join(sorted(PRESETS))}, got {self.preset!r}")
        try:
            parse_report_to(self.report_to, check=check_paths)
        except ValueError as e:
            problems.append(str(e))
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other: continue the run or replace it")
        for name, low in (("batch_size", 1), ("grad_accum", 1), ("epochs", 1), ("max_length", 1),
                          ("max_steps", 1), ("save_every", 0), ("gdkd_warmup_steps", 0), ("rcka_warmup_steps", 0),
                          ("seed", 0), ("num_workers", 0)):
            value = getattr(self, name)
            if name == "max_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "scale_lr", "max_grad_norm", "temperature", "gate_temperature"):
            value = getattr(self, name)
            if name == "scale_lr" and value is None:
                continue
            if not _finite(value) or value <= 0:
                problems.append(f"{name} must be finite and > 0, got {value!r}")
        for name in ("save_every_minutes", "weight_decay", "scale_weight_decay", "tckd_weight", "nckd_weight",
                     "omega", "tau", "eta", "beta_min"):
            value = getattr(self, name)
            if name == "scale_weight_decay" and value is None:
                continue
            if not _finite(value) or value < 0:
                problems.append(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("ema_decay", "warmup_ratio"):
            value = getattr(self, name)
            if not _finite(value) or not 0 <= value < 1:
                problems.append(f"{name} must lie in [0, 1), got {value!r}")
        if not (_finite(self.beta_init) and _finite(self.beta_max)):
            problems.append(f"beta_init and beta_max must be finite, got {self.beta_init!r}, {self.beta_max!r}")
        elif _finite(self.beta_min) and not (self.beta_min <= self.beta_init <= self.beta_max):
            problems.append(f"beta_init {self.beta_init} must lie in [beta_min {self.beta_min}, "
                            f"beta_max {self.beta_max}]")
        if check_paths:
            for name in ("teacher", "student"):
                path = getattr(self, name)
                if name == "teacher" and not (self.kd or self.rcka):
                    continue
                config = os.path.join(path, "config.json") if path else ""
                if not path or not os.path.isfile(config):
                    problems.append(f"{name} checkpoint not found: {path!r} has no config.json")
                else:
                    read_json(config, what=f"the {name}'s model config", hint="fix or replace the file")
            if not self.data or not os.path.isfile(self.data):
                problems.append(f"data file not found: {self.data!r}")
            blocker = _file_above(self.output_dir)
            if blocker is not None:
                problems.append(f"output_dir {self.output_dir!r} cannot be a directory: {blocker!r} is a file")
        if problems:
            raise ValueError("bad configuration: " + "; ".join(problems))

    def to_json(self, path: str) -> None:
        """Write the configuration atomically (temp file + rename): a reader never sees half a file."""
        write_json(dataclasses.asdict(self), path)


def saved_settings(saved: dict) -> dict:
    """A run's saved settings (its config.json, or the ``config`` of a checkpoint's trainer state) as a dict of
    TrainConfig fields, completed with what a field added later meant before it existed.

    ``kd_t2``: before it existed the KD term always carried T^2, so a run saved with KD on reads True; a run
    without KD (``kd`` false) has no KD term to scale, either value gives the same run, and it reads as the
    default. The input is not modified.
    """
    out = dict(saved)
    if "kd_t2" not in out:
        out["kd_t2"] = True if out.get("kd", True) else TrainConfig.kd_t2
    return out



@functools.cache
def field_docs() -> dict[str, str]:
    """Each TrainConfig field's documentation: the string literal written right under it (an attribute
    docstring), whitespace collapsed to one line. Read from the source, so the text lives in one place."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# The fields whose values come from a fixed set (the CLI offers them as choices; validate() checks them).
FIELD_CHOICES = {"bits": tuple(scheme.bits for scheme in SCHEMES.values()), "group_size": GROUP_SIZES,
                 "init_method": INIT_METHODS, "scale_dtype": (*SCALE_DTYPES, None),
                 "mixed_precision": MIXED_PRECISION, "kd_type": KD_TYPES, "preset": tuple(PRESETS)}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _file_above(path: str) -> str | None:
    """The first existing non-directory on the way from ``path`` up to the root, or None."""
    path = os.path.abspath(path)
    while True:
        if os.path.exists(path):
            return None if os.path.isdir(path) else path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
