"""Weighted sums of preference losses (MPO; TRL's ``loss_type=[...]`` with ``loss_weights``)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .base import LOSS_KEY, ComposedLoss, LossNeeds, LossOutput, PreferenceLoss, SequenceLogProbs

_KEY = f"{LOSS_KEY}.losses"


def component_name(loss: PreferenceLoss) -> str:
    """The default name of a component: its class name without a ``Loss`` suffix, CamelCase to
    snake_case (``DPOLoss`` -> ``dpo``, ``BCOPairLoss`` -> ``bco_pair``, ``ChosenNLLLoss`` ->
    ``chosen_nll``, ``SimPOLoss`` -> ``sim_po``, ``WithChosenNLL`` -> ``with_chosen_nll``)."""
    name = type(loss).__name__
    if name.endswith("Loss") and len(name) > 4:
        name = name[:-4]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered from the second on: ``[dpo, dpo, dpo]`` -> ``[dpo, dpo_2, dpo_3]``."""
    seen: Counter[str] = Counter()
    taken = set(names)
    out = []
    for name in names:
        seen[name] += 1
        if seen[name] == 1:
            out.append(name)
            continue
        n = seen[name]
        while f"{name}_{n}" in taken:
            n += 1
        seen[name] = n
        taken.add(f"{name}_{n}")
        out.append(f"{name}_{n}")
    return out


class MixtureLoss(ComposedLoss):
    r"""A weighted sum of preference losses (MPO, Wang et al. 2024, arXiv 2411.10442: DPO +
    BCO-pair + SFT; TRL's ``loss_type=[...]`` with ``loss_weights``)::

        L = sum_i w_i * L_i

    Every component sees the same policy (and reference) log-probs and the same batch.

    Logged metrics: each component's value as ``loss_<name>`` (a detached scalar), and every
    metric a component reports under its own key, prefixed ``<name>/`` only where two
    components report the same key. The rewards and log-probs logged are those of the first
    component that needs a reference (the first component when none does).

    What the mixture needs is the union of what its components need: a reference if any
    needs one, per-token log-probs if any asks, every score column. All components must share
    one batch layout (pairs, or KTO's unpaired rows). The parts of the components that are means
    over tokens (``LossOutput.token_part``, weighted) make the mixture's ``token_part``, over the
    first such component's token count (all count the same chosen tokens: ``ChosenNLLLoss``). ``needs_square_mass`` is not passed on:
    ``WPOWeighted(aligned=True)`` goes around the mixture, not inside it. ``per_pair`` is ``sum_i w_i *
    per_pair_i`` when every component gives one, else ``None``.

    In YAML::

        loss:
          class_path: dpo_lightning.losses.MixtureLoss
          init_args:
            weights: [0.8, 0.2, 1.0]
            losses:
              - {class_path: dpo_lightning.losses.DPOLoss, init_args: {beta: 0.1}}
              - {class_path: dpo_lightning.losses.BCOPairLoss, init_args: {beta: 0.1}}
              - {class_path: dpo_lightning.losses.ChosenNLLLoss}

    Args:
        losses: the components, at least one.
        weights: one weight >= 0 (finite) per component, at least one > 0; default 1.0 each (as TRL).
        names: one name per component, used in the metric names; default from the class name
            (see :func:`component_name`), repeats numbered ``_2``, ``_3``, ...
    """

    def __init__(
        self,
        losses: list[PreferenceLoss],
        weights: list[float] | None = None,
        names: list[str] | None = None,
    ) -> None:
        super().__init__()
        losses = list(losses)
        if not losses:
            raise ValueError(f"{_KEY} must hold at least one loss")
        for i, loss in enumerate(losses):
            if not isinstance(loss, PreferenceLoss):
                raise TypeError(f"{_KEY}[{i}] must be a PreferenceLoss, got {type(loss).__name__}")
        layout = losses[0].batch_layout
        for i, loss in enumerate(losses[1:], start=1):
            if loss.batch_layout != layout:
                raise ValueError(
                    f"{_KEY}[{i}] ({type(loss).__name__}) trains on batch layout {loss.batch_layout.value!r} but "
                    f"{_KEY}[0] ({type(losses[0]).__name__}) on {layout.value!r}; all components of a mixture "
                    "must share one batch layout"
                )
        weights = [1.0] * len(losses) if weights is None else list(weights)
        if len(weights) != len(losses):
            raise ValueError(
                f"{LOSS_KEY}.weights has {len(weights)} values for {len(losses)} losses; give one weight per loss"
            )
        for i, weight in enumerate(weights):
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"{LOSS_KEY}.weights[{i}] must be >= 0 and finite, got {weight}")
        if not any(weight > 0 for weight in weights):
            raise ValueError(
                f"{LOSS_KEY}.weights are all 0 ({list(weights)}): the mixture's loss and gradient would be 0, so "
                "training would change nothing and export the base model; give at least one loss a weight > 0"
            )
        if names is None:
            names = unique_names([component_name(loss) for loss in losses])
        else:
            names = list(names)
            if len(names) != len(losses):
                raise ValueError(
                    f"{LOSS_KEY}.names has {len(names)} values for {len(losses)} losses; give one name per loss"
                )
            for i, name in enumerate(names):
                if not isinstance(name, str) or not name or "/" in name:
                    raise ValueError(f"{LOSS_KEY}.names[{i}] must be a non-empty string without '/', got {name!r}")
            repeated = sorted(n for n, c in Counter(names).items() if c > 1)
            if repeated:
                raise ValueError(f"{LOSS_KEY}.names must be unique; repeated: {', '.join(repeated)}")
        self.losses = nn.ModuleList(losses)
        self.weights = tuple(float(w) for w in weights)
        self.names = tuple(names)
        self.set_needs(LossNeeds.union([loss.needs for loss in losses]))
        #: the component whose rewards and log-probs are reported
        self.reporter = next((i for i, loss in enumerate(losses) if loss.needs_reference), 0)

    def combine_metrics(self, outputs: Sequence[LossOutput]) -> dict[str, Tensor]:
        """The metrics of the mixture, from its components' outputs (see the class docstring).
        Subclasses may override this to log differently."""
        values = {f"loss_{name}": out.loss.detach() for name, out in zip(self.names, outputs)}
        reported = Counter(key for out in outputs for key in out.metrics)
        metrics: dict[str, Tensor] = {}
        for name, out in zip(self.names, outputs):
            for key, value in out.metrics.items():
                metrics[f"{name}/{key}" if reported[key] > 1 or key in values else key] = value
        return {**metrics, **values}

    def forward(
        self, policy: SequenceLogProbs, reference: SequenceLogProbs | None, batch: Mapping[str, Any]
    ) -> LossOutput:
        outputs = [loss(policy, reference, batch) for loss in self.losses]
        total = self.weights[0] * outputs[0].loss
        for weight, out in zip(self.weights[1:], outputs[1:]):
            total = total + weight * out.loss
        per_pair = None
        if all(out.per_pair is not None for out in outputs):
            per_pair = self.weights[0] * outputs[0].per_pair
            for weight, out in zip(self.weights[1:], outputs[1:]):
                per_pair = per_pair + weight * out.per_pair
        main = outputs[self.reporter]
        token_part, tokens = None, None
        for weight, out in zip(self.weights, outputs):  # the components' means over tokens, weighted
            if out.token_part is not None:
                token_part = weight * out.token_part if token_part is None else token_part + weight * out.token_part
                tokens = out.tokens if tokens is None else tokens
        return LossOutput(
            total, main.chosen_rewards, main.rejected_rewards, self.combine_metrics(outputs),
            chosen_logps=main.chosen_logps, rejected_logps=main.rejected_logps, per_pair=per_pair,
            token_part=token_part, tokens=tokens,
        )


__all__ = ["MixtureLoss", "component_name", "unique_names"]
