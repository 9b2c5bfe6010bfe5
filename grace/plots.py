"""The end-of-run plot: beta and the EMA of GDKD against tau (the paper's Figure 18), and the losses."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_controller(history: list[dict], path: str) -> str:
    """Write a two-panel PNG to ``path`` and return ``path``.

    history: one dict per optimizer step with "step", "beta", "ema_gdkd", "tau", "loss", "ce", "gdkd" and
    "rcka" (the rows of a run's metrics.jsonl). Left: beta (left axis) and the EMA of GDKD with its target
    tau (right axis); right: the loss terms. Legends sit below the axes so they never hide a curve.
    """
    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    ax1.plot(steps, [r["beta"] for r in history], label="beta (IB weight)", color="tab:blue")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("beta", color="tab:blue")
    ax1.ticklabel_format(axis="y", useOffset=False)   # "1.0005", not "+1" above the axis and "0.0005" on it
    ax1b = ax1.twinx()
    ax1b.plot(steps, [r["ema_gdkd"] for r in history], label="EMA of GDKD", color="tab:orange")
    if history:
        ax1b.axhline(history[0]["tau"], color="tab:red", linestyle="--", label="tau (GDKD target)")
    ax1b.set_ylabel("GDKD (EMA)", color="tab:orange")
    ax1.set_title("adaptive information-bottleneck controller")
    # One legend for both y axes, under the plot: beta's entry lives on ax1, the others on the twin.
    handles = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
    ax1.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.16),
               ncol=3, frameon=False)
    for key in ("loss", "ce", "gdkd", "rcka"):
        # rcka is None in a step without a usable image (text-only micro-batches): a gap, not a zero.
        ax2.plot(steps, [math.nan if r[key] is None else r[key] for r in history], label=key)
    ax2.set_xlabel("optimizer step")
    ax2.set_title("losses")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
