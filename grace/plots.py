"""The end-of-run plot: beta and the EMA of GDKD against tau (the paper's Figure 18), and the losses."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

# How close the EMA of GDKD must come to tau, relative to tau, for the plot to call beta settled.
SETTLED_REL_TOL = 0.1


def settled_spans(history: list[dict], rel_tol: float = SETTLED_REL_TOL) -> list[tuple[int, int]]:
    """The step ranges (first, last; inclusive) where |EMA of GDKD - tau| <= rel_tol * tau.

    There the controller's update eta * (EMA - tau) is at most rel_tol * eta * tau a step: beta has settled
    (the dual variable of the constraint GDKD <= tau is at rest). Rows without an EMA (no KD) never count.
    history: the rows of a run's metrics.jsonl ("step", "ema_gdkd", "tau").

    Raises:
        ValueError: rel_tol is not > 0.
    """
    if not rel_tol > 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol!r}")
    spans: list[tuple[int, int]] = []
    for r in history:
        ema, tau = r.get("ema_gdkd"), r["tau"]
        if ema is None or abs(ema - tau) > rel_tol * max(tau, 1e-12):
            continue
        if spans and spans[-1][1] == r["step"] - 1:
            spans[-1] = (spans[-1][0], r["step"])
        else:
            spans.append((r["step"], r["step"]))
    return spans


def plot_controller(history: list[dict], path: str, convention: str | None = None) -> str:
    """Write a two-panel PNG to ``path`` and return ``path``.

    history: one dict per optimizer step with "step", "beta", "ema_gdkd", "tau", "loss", "ce", "gdkd" and
    "rcka" (the rows of a run's metrics.jsonl). Left: beta (left axis) and the EMA of GDKD with its target
    tau (right axis), the steps where beta has settled (:func:`settled_spans`) shaded; right: the loss terms.
    ``convention`` (TrainConfig.kd_convention(): which KD scale GDKD and tau are on) goes under the title.
    Legends sit below the axes so they never hide a curve.
    """
    steps = [r["step"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    ax1.plot(steps, [r["beta"] for r in history], label="beta (IB weight)", color="tab:blue")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("beta", color="tab:blue")
    ax1.ticklabel_format(axis="y", useOffset=False)   # "1.0005", not "+1" above the axis and "0.0005" on it
    for i, (lo, hi) in enumerate(settled_spans(history)):
        ax1.axvspan(lo - 0.5, hi + 0.5, color="tab:green", alpha=0.15, linewidth=0,
                    label=f"settled: |EMA - tau| <= {SETTLED_REL_TOL:g} tau" if i == 0 else None)
    ax1b = ax1.twinx()
    ax1b.plot(steps, [r["ema_gdkd"] for r in history], label="EMA of GDKD", color="tab:orange")
    if history:
        ax1b.axhline(history[0]["tau"], color="tab:red", linestyle="--", label="tau (GDKD target)")
    ax1b.set_ylabel("GDKD (EMA)", color="tab:orange")
    title = "adaptive information-bottleneck controller"
    ax1.set_title(title if convention is None else f"{title}\n{convention}", fontsize=10)
    # One legend for both y axes, under the plot: beta's entry lives on ax1, the others on the twin.
    handles = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
    ax1.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.16),
               ncol=2, frameon=False)
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
