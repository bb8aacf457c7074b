"""Per-iteration learning-rate (and momentum) schedules.

``cyclic`` is the released configs' mmcv cyclic policy with one cycle: the learning rate rises from
``base`` to ``base * target_ratio[0]`` along a half cosine over the first ``step_ratio_up`` of all
iterations, then falls to ``base * target_ratio[1]``; AdamW's beta1 moves the opposite way, from
``beta1`` to ``beta1 * momentum_ratio[0]`` and back to ``beta1 * momentum_ratio[1]``.
``cosine`` is linear warm-up then cosine decay to ``min_lr_ratio``; ``constant`` keeps the base rate.
Each param group is scaled from its own ``base_lr`` (its multiplier applied).
"""
from __future__ import annotations

import math

import torch

from aqrcmt.config import OptimConfig


def annealing_cos(start: float, end: float, fraction: float) -> float:
    """Half-cosine from `start` (fraction 0) to `end` (fraction 1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1.0)


class Schedule:
    """Sets ``lr`` (and beta1 for ``cyclic``) of every param group from the iteration count."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        self.step_count = 0
        self.beta1 = cfg.betas[0]
        self._apply()

    def factors(self, step: int) -> tuple[float, float]:
        """(learning-rate factor, beta1 factor) at iteration `step` (0-based)."""
        cfg, total = self.cfg, self.total_steps
        if cfg.schedule == "constant":
            return 1.0, 1.0
        if cfg.schedule == "cosine":
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps, 1.0
            span = max(total - cfg.warmup_steps, 1)
            return annealing_cos(1.0, cfg.min_lr_ratio, min((step - cfg.warmup_steps) / span, 1.0)), 1.0
        up = int(total * cfg.cyclic_step_ratio_up)
        peak, end = cfg.cyclic_target_ratio
        m_peak, m_end = cfg.cyclic_momentum_ratio
        if step < up:
            f = step / max(up, 1)
            return annealing_cos(1.0, peak, f), annealing_cos(1.0, m_peak, f)
        f = min((step - up) / max(total - up, 1), 1.0)
        return annealing_cos(peak, end, f), annealing_cos(m_peak, m_end, f)

    def _apply(self) -> None:
        lr_factor, beta_factor = self.factors(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
            group["betas"] = (self.beta1 * beta_factor, group["betas"][1])

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def lr_factor(self) -> float:
        """Current learning rate / base learning rate (the same for every param group)."""
        return self.factors(self.step_count)[0]

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`'s step count. The length stays this schedule's own: a resumed run whose length
        changed (``train.epochs``, ``train.max_steps``) continues on the schedule re-planned for its new length."""
        self.step_count = int(state["step_count"])
        self._apply()
