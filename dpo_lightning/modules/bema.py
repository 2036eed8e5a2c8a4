"""BEMA, the bias-corrected exponential moving average of the policy's weights (Block & Zhang
2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes", arXiv 2508.00180), as
TRL computes it for a reference model (``trl.experimental.bema_for_ref_model.BEMACallback``):
its settings (:class:`BEMAUpdate`) and the update math, as pure functions on lists of tensors.
The reference strategy that holds the state is :class:`~.reference.BEMAReference`.

With ``t`` the optimizer step (1 after the first step), ``tau = update_after``,
``phi = update_freq``, ``rho = lag``, ``gamma = multiplier``::

    at t = tau:                            theta_0 <- theta_t,  EMA <- theta_t
    at t = tau + k * phi (k >= 1):         beta_t  = max((rho + gamma t)^(-ema_power), min_ema_multiplier)
                                           alpha_t = (rho + gamma t)^(-bias_power)
                                           EMA     <- (1 - beta_t) EMA + beta_t theta_t
                                           BEMA    <- alpha_t (theta_t - theta_0) + EMA
    at t = ref_model_update_after + j * ref_model_update_freq (t >= 1):
                                           reference <- BEMA

Before the first BEMA update ``theta_0``, ``EMA`` and ``BEMA`` are the initial weights (TRL's
``on_train_begin``). ``t`` counts from the start of training (TRL's code; the authors' code,
github.com/abblock/bema ``src/core_online.py``, takes ``1 + gamma max(t - tau + rho, 1)`` as the
base of both powers, a shifted schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: where these settings live in a recipe
BEMA_KEY = "model.init_args.reference.bema"


@dataclass
class BEMAUpdate:
    """The ``reference.bema`` section of a recipe: the reference is the BEMA of the policy's
    weights. Names and defaults are TRL's (``BEMACallback``, ``update_ref_model=True``).

    Attributes:
        update_freq: ``phi``: the BEMA weights are recomputed every this many optimizer steps
            after ``update_after``. Default 400.
        ema_power: ``kappa``: the EMA's step size ``beta_t = (rho + gamma t)^(-kappa)``; 0 makes
            ``beta_t = 1`` (the EMA is the current weights). Default 0.5.
        bias_power: ``eta``: the bias correction's weight ``alpha_t = (rho + gamma t)^(-eta)``.
            Default 0.2. (0 gives ``alpha_t = 1``: the whole ``theta_t - theta_0`` is added.)
        lag: ``rho``: the schedules' starting age (``rho + gamma t``). Default 10.
        update_after: ``tau``: the burn-in: at this step ``theta_0`` and the EMA are set to the
            policy's weights; the updates start ``update_freq`` steps later. Default 0.
        multiplier: ``gamma``: how fast the age grows per step. Default 1.
        min_ema_multiplier: the floor of ``beta_t``, in [0, 1]. Default 0.
        ref_model_update_freq: the reference gets the BEMA weights every this many optimizer
            steps after ``ref_model_update_after``. Default 400.
        ref_model_update_after: the first of those steps (0: the first is
            ``ref_model_update_freq``). Default 0.
    """

    update_freq: int = 400
    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10
    update_after: int = 0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0
    ref_model_update_freq: int = 400
    ref_model_update_after: int = 0

    def validate(self) -> None:
        """Raise a ``ValueError`` naming ``model.init_args.reference.bema.<key>`` for a setting
        outside its range."""
        at_least = {"update_freq": 1, "ref_model_update_freq": 1, "update_after": 0, "ref_model_update_after": 0,
                    "ema_power": 0, "bias_power": 0, "lag": 0, "multiplier": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{BEMA_KEY}.{name} must be >= {low}, got {getattr(self, name)}")
        if self.lag + self.multiplier <= 0:
            raise ValueError(f"{BEMA_KEY}: lag + multiplier must be > 0 (the schedules' base lag + multiplier * t "
                             f"must be positive from step 1), got lag {self.lag}, multiplier {self.multiplier}")
        if not 0 <= self.min_ema_multiplier <= 1:
            raise ValueError(f"{BEMA_KEY}.min_ema_multiplier must be in [0, 1], got {self.min_ema_multiplier}")

    # -- the schedule (TRL's on_step_end) -------------------------------------------------------
    def ema_beta(self, step: int) -> float:
        """``beta_t = max((lag + multiplier * t)^(-ema_power), min_ema_multiplier)``."""
        return max((self.lag + self.multiplier * step) ** (-self.ema_power), self.min_ema_multiplier)

    def bias_alpha(self, step: int) -> float:
        """``alpha_t = (lag + multiplier * t)^(-bias_power)``."""
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    def is_snapshot_step(self, step: int) -> bool:
        """``theta_0`` and the EMA are set to the policy at ``t = update_after``."""
        return step == self.update_after

    def is_update_step(self, step: int) -> bool:
        """The EMA and the BEMA weights are updated at ``t = update_after + k * update_freq``, ``k >= 1``."""
        return step > self.update_after and (step - self.update_after) % self.update_freq == 0

    def is_reference_step(self, step: int) -> bool:
        """The reference gets the BEMA weights at ``t = ref_model_update_after + j * ref_model_update_freq``."""
        after = self.ref_model_update_after
        return step >= 1 and step >= after and (step - after) % self.ref_model_update_freq == 0

    def needs_running_copy(self) -> bool:
        """Whether the BEMA weights must be kept apart from the reference: some reference step is
        no BEMA update step (the schedules differ), so it copies the weights of an earlier update
        (or the initial ones). ``False`` for TRL's defaults (both every 400 steps), where each
        update writes straight into the reference and no fourth copy of the weights is held."""
        first = self.ref_model_update_after if self.ref_model_update_after >= 1 else self.ref_model_update_freq
        on_updates = self.is_update_step(first) and self.ref_model_update_freq % self.update_freq == 0
        return not on_updates


# -- the math, in place on lists of tensors (one per parameter) -------------------------------
@torch.no_grad()
def snapshot_(theta0: Sequence[Tensor], ema: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
    """``theta_0 <- theta_t`` and ``EMA <- theta_t`` (at ``t = update_after``)."""
    for start, average, current in zip(theta0, ema, weights, strict=True):
        start.copy_(current)
        average.copy_(current)


@torch.no_grad()
def ema_update_(ema: Sequence[Tensor], weights: Sequence[Tensor], beta: float) -> None:
    """``EMA <- (1 - beta) EMA + beta theta_t``, in the EMA's dtype, by TRL's operations
    (``mul_(1 - beta).add_(theta_t, alpha=beta)``)."""
    for average, current in zip(ema, weights, strict=True):
        average.mul_(1 - beta).add_(current.to(average.dtype), alpha=beta)


@torch.no_grad()
def bema_weights_(
    out: Sequence[Tensor], ema: Sequence[Tensor], weights: Sequence[Tensor], theta0: Sequence[Tensor], alpha: float
) -> None:
    """``out <- alpha (theta_t - theta_0) + EMA`` (``out`` may be the reference's parameters)."""
    for target, average, current, start in zip(out, ema, weights, theta0, strict=True):
        target.copy_(average + alpha * (current.to(average.dtype) - start))


@torch.no_grad()
def copy_(out: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """``out <- values``, tensor by tensor (in ``out``'s dtype)."""
    for target, value in zip(out, values, strict=True):
        target.copy_(value)


__all__ = ["BEMA_KEY", "BEMAUpdate", "bema_weights_", "copy_", "ema_update_", "snapshot_"]
