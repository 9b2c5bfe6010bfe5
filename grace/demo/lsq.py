"""``grace lsq-demo`` (its options: :mod:`grace.cli.lsq`): a short, CPU-friendly demonstration of group-wise LSQ
on an LLM-shaped layer.

It quantizes one linear layer (a weight with LLM-like outliers, activations with a few large
channels) to INT4, group 128, three ways, and measures the output SQNR of each against the
full-precision layer on held-out activations:

1. round-to-nearest with absmax / 7 scales (the usual post-training baseline);
2. LSQ scales from the paper's initialisation (99th percentile of |W| per group), untrained;
3. LSQ after a few hundred steps of training weights and log-scales through the fake quantizer
   to match the full-precision outputs (straight-through estimator).
"""

from __future__ import annotations

import json
import os
import time

import torch
from tqdm.auto import tqdm

import grace_kernels as gk
from grace_kernels.nn import QuantLinear
from grace_kernels.testing import make_weight, sqnr


def _activations(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, k, generator=gen)
    x[:, :8] *= 20.0  # a few outlier channels, as in real LLM activations
    return x


def run_lsq_demo(*, out_features: int = 512, in_features: int = 1024, steps: int = 300, seed: int = 0,
                 out_dir: str | None = None, progress: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w = make_weight(out_features, in_features, seed=seed)
    x_train, x_test = _activations(4096, in_features, gen), _activations(1024, in_features, gen)
    y_test = x_test @ w.t()

    rtn_log = torch.log(w.abs().view(out_features, -1, 128).amax(-1).clamp_min(1e-8) / 7)
    results = {"rtn_absmax": sqnr(x_test @ gk.lsq_fake_quant(w, rtn_log).t(), y_test)}

    layer = QuantLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=False), bits=4)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.log_scale.copy_(gk.lsq_init_log_scale(w))
    results["lsq_init_p99"] = sqnr(layer(x_test).detach(), y_test)

    opt = torch.optim.Adam([{"params": [layer.weight], "lr": 1e-4}, {"params": [layer.log_scale], "lr": 1e-2}])
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="LSQ training", disable=not progress)
    for step in bar:
        idx = torch.randint(0, x_train.shape[0], (256,), generator=gen)
        xb = x_train[idx]
        loss = (layer(xb) - xb @ w.t()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(mse=f"{loss.item():.3e}")
    results["lsq_trained"] = sqnr(layer(x_test).detach(), y_test)
    summary = {"layer": [out_features, in_features], "bits": 4, "group_size": 128, "steps": steps,
               "train_seconds": round(time.perf_counter() - t0, 2), "output_sqnr_db": results,
               "backends": gk.describe()}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "lsq_demo.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return summary
