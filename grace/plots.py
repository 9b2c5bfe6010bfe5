"""The end-of-run plot: beta and the EMA of GDKD against tau (the paper's Figure 18), and the losses."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_controller(history: list[dict], path: str) -> str:
    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r["beta"] for r in history], label="beta", color="tab:blue")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("beta", color="tab:blue")
    ax1b = ax1.twinx()
    ax1b.plot(steps, [r["ema_gdkd"] for r in history], label="EMA of GDKD", color="tab:orange")
    if history:
        ax1b.axhline(history[0]["tau"], color="tab:red", linestyle="--", label="tau")
    ax1b.set_ylabel("GDKD (EMA)", color="tab:orange")
    ax1.set_title("adaptive IB controller")
    ax1b.legend(loc="upper right")
    for key in ("loss", "ce", "gdkd", "rcka"):
        ax2.plot(steps, [r[key] for r in history], label=key)
    ax2.set_xlabel("optimizer step")
    ax2.set_title("losses")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
