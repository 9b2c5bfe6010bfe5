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


def plot_ladder(rows: list[dict], comparisons: dict, path: str) -> str:
    """Write the ablation ladder (the paper's Table 3 in miniature) as a PNG to ``path`` and return ``path``.

    rows: one dict per rung, top to bottom, with "rung" (its label), "average" and "average_sd" (test accuracy,
    mean and standard deviation over seeds, as fractions), "val" and "val_sd" (the same on the validation split).
    comparisons: one entry per rung after the first, in order, each {"test": {...}, "val": {...}} with the
    paired bootstrap's "mean", "lo", "hi" and "verdict" of that rung minus the one above (grace.demo.stats).
    Left: the accuracies with their seed spread; right: each rung's difference with its 95% interval on both
    splits, "better" or "worse" written above the resolved ones.

    Raises:
        ValueError: a comparison count other than len(rows) - 1.
    """
    if len(comparisons) != len(rows) - 1:
        raise ValueError(f"need one comparison per rung after the first ({len(rows) - 1}), got {len(comparisons)}")
    labels = [r["rung"] for r in rows]
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for offset, key, name in ((-0.18, "average", "test"), (0.18, "val", "validation")):
        ax1.bar([i + offset for i in x], [100 * r[key] for r in rows], width=0.36, label=name,
                yerr=[100 * r[f"{key}_sd"] for r in rows], capsize=3)
    ax1.set_xticks(x, labels)
    ax1.set_ylabel("accuracy, % (mean ± sd over seeds)")
    lo = min(100 * min(r["average"], r["val"]) for r in rows)
    ax1.set_ylim(max(0.0, lo - 10), 100)
    ax1.set_title("the ladder of GRACE's parts", fontsize=10)
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    steps = list(comparisons.values())
    for offset, split, color, name in ((-0.12, "test", "tab:blue", "test"), (0.12, "val", "tab:orange", "validation")):
        for i, c in enumerate(steps, start=1):
            d = c[split]
            err = [[100 * (d["mean"] - d["lo"])], [100 * (d["hi"] - d["mean"])]]
            ax2.errorbar(i + offset, 100 * d["mean"], yerr=err, fmt="o", color=color, capsize=3,
                         label=name if i == 1 else None)
            if d["verdict"] != "no resolved difference":   # an interval across zero speaks for itself
                ax2.annotate(d["verdict"], (i + offset, 100 * d["hi"]), textcoords="offset points", xytext=(0, 4),
                             ha="center", fontsize=7, color=color)
    ax2.axhline(0, color="gray", linewidth=0.8)
    ax2.set_xticks(range(1, len(rows)), labels[1:])
    ax2.set_xlim(0.5, len(rows) - 0.5)
    ax2.set_ylabel("rung - rung above, points (95% interval)")
    ax2.set_title("what each part adds (paired bootstrap over questions and seeds)", fontsize=10)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
