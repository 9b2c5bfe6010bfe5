"""The adaptive information-bottleneck controller that sets GRACE's distillation weight beta."""

from __future__ import annotations


class AdaptiveIBController:
    """Projected dual ascent on the EMA of the gated DKD loss.

    After each optimizer step, with v the step's GDKD (averaged over micro-batches and ranks):
        ema  = v                                  on the first update
        ema  = d * ema + (1 - d) * v              afterwards
        beta = clip(beta + eta * (ema - tau), beta_min, beta_max)
    so beta grows while the student's distillation loss sits above the budget tau and shrinks below
    it. ``adaptive=False`` keeps beta fixed at beta_init (the paper's "fixed beta" ablation) while
    still tracking the EMA for the logs. Defaults are the paper's (Table 6).
    """

    def __init__(self, tau: float = 0.35, eta: float = 0.0015, beta_init: float = 1.0, beta_min: float = 0.1,
                 beta_max: float = 5.0, ema_decay: float = 0.99, adaptive: bool = True):
        if not beta_min <= beta_init <= beta_max:
            raise ValueError(f"beta_init {beta_init} must lie in [beta_min {beta_min}, beta_max {beta_max}]")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.tau, self.eta, self.beta_min, self.beta_max = tau, eta, beta_min, beta_max
        self.ema_decay, self.adaptive = ema_decay, adaptive
        self.beta = float(beta_init)
        self.ema: float | None = None
        self.steps = 0

    def update(self, gdkd_value: float) -> float:
        v = float(gdkd_value)
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"GDKD value {v} is not finite: refusing to update beta")
        self.ema = v if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * v
        if self.adaptive:
            self.beta = min(max(self.beta + self.eta * (self.ema - self.tau), self.beta_min), self.beta_max)
        self.steps += 1
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.ema, self.steps = float(state["beta"]), state["ema"], int(state["steps"])
