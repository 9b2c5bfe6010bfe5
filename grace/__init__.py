"""grace: the GRACE trainer on top of grace_kernels (model surgery, losses, controller, data,
export, CLI). It uses grace_kernels' public API only."""

# --- public API: one import line per module (keep sorted) ---
from grace.config import TrainConfig  # noqa: F401
from grace.controller import AdaptiveIBController  # noqa: F401
from grace.export import export_run  # noqa: F401
from grace.load import load_int4_model, load_model  # noqa: F401
from grace.quantize import quantize_model, rtn_int4_model  # noqa: F401
from grace.train import train  # noqa: F401

# --- end public API ---
