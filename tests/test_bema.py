"""BEMA reference (``reference: {bema: {...}}``): the weights against a float64 formula written from
the paper, against TRL's own update code (ported below), after real training steps, across a
save and resume, and through the CLI; the settings it refuses."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

from conftest import pair_files, quick, tiny_recipe, tiny_spec, write_recipe  # noqa: F401 - pair_files: fixture
from dpo_lightning.cli import run
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.losses import SimPOLoss
from dpo_lightning.lora import LoraSpec
from dpo_lightning.models import load_causal_lm, load_tokenizer
from dpo_lightning.modules import IterativePreferenceModule, PreferenceModule, ReferenceSpec, ReferenceUpdate
from dpo_lightning.modules.bema import BEMAUpdate
from dpo_lightning.modules.reference import BEMAReference

#: schedules: TRL's defaults scaled down, a burn-in, a floor on beta, reference steps off the BEMA steps
SCHEDULES = {
    "defaults-every-2": BEMAUpdate(update_freq=2, ref_model_update_freq=2),
    "burn-in": BEMAUpdate(update_freq=2, update_after=3, ref_model_update_freq=4, ref_model_update_after=5, lag=1,
                          multiplier=0.5),
    "floor": BEMAUpdate(update_freq=1, ema_power=1.5, bias_power=0.7, lag=2, min_ema_multiplier=0.3,
                        ref_model_update_freq=1),
    "off-schedule": BEMAUpdate(update_freq=3, update_after=2, ref_model_update_freq=2, ref_model_update_after=1),
}


# -- the paper's formula, float64 ------------------------------------------------------------------
def paper_reference(history: list[torch.Tensor], s: BEMAUpdate) -> torch.Tensor:
    """The reference after step ``T = len(history) - 1`` (``history[t]`` = the policy's weights after
    step ``t``, ``history[0]`` the initial ones), written from the paper's definitions (arXiv
    2508.00180; TRL's docstring states the same): ``theta_BEMA_t = alpha_t (theta_t - theta_0) +
    EMA_t``, ``EMA_t = (1 - beta_t) EMA_{t-1} + beta_t theta_t``, ``beta_t = max((rho + gamma
    t)^-kappa, floor)``, ``alpha_t = (rho + gamma t)^-eta``, updated at ``t = tau + k phi``, with
    ``theta_0`` the weights at ``tau``; the reference takes the last BEMA weights at its own steps.

    The EMA is summed in closed form, not run as a recursion:
    ``EMA_t = prod_u (1 - beta_u) theta_tau + sum_s beta_s prod_{u > s} (1 - beta_u) theta_s`` over
    the update steps ``u, s <= t``."""
    last = len(history) - 1
    tau, phi = s.update_after, s.update_freq
    updates = list(range(tau + phi, last + 1, phi))
    anchor = history[tau] if tau <= last else history[0]
    age = lambda t: s.lag + s.multiplier * t  # noqa: E731
    beta = {u: max(age(u) ** -s.ema_power, s.min_ema_multiplier) for u in updates}

    def bema(t: int) -> torch.Tensor:
        steps = [u for u in updates if u <= t]
        ema = math.prod(1 - beta[u] for u in steps) * anchor
        for i, step in enumerate(steps):
            ema = ema + beta[step] * math.prod(1 - beta[u] for u in steps[i + 1:]) * history[step]
        return age(t) ** -s.bias_power * (history[t] - anchor) + ema

    refs = [t for t in range(1, last + 1)
            if t >= s.ref_model_update_after and (t - s.ref_model_update_after) % s.ref_model_update_freq == 0]
    if not refs:
        return history[0]
    done = [u for u in updates if u <= refs[-1]]
    return bema(done[-1]) if done else history[0]  # before any update the BEMA weights are the initial ones


class Vector(nn.Module):
    """A policy of one parameter vector."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(values.clone())


@pytest.mark.parametrize("name", SCHEDULES)
def test_bema_reference_is_the_papers_formula_in_float64(name: str) -> None:
    settings = SCHEDULES[name]
    generator = torch.Generator().manual_seed(0)
    policy = Vector(torch.randn(5, dtype=torch.float64, generator=generator))
    strategy = BEMAReference(copy.deepcopy(policy), policy, settings)
    # off-schedule: the reference steps 1, 3, 5, ... are not all update steps (5, 8, 11, ...)
    assert (strategy.running is not None) == (name == "off-schedule")
    history = [policy.weight.detach().clone()]
    moved = 0
    for _ in range(13):
        with torch.no_grad():
            policy.weight.add_(torch.randn(5, dtype=torch.float64, generator=generator))
        history.append(policy.weight.detach().clone())
        strategy.after_optimizer_step(policy)
        want = paper_reference(history, settings)
        torch.testing.assert_close(strategy.network.weight, want, rtol=0, atol=1e-12)
        moved += not torch.equal(want, history[0])
    assert moved >= 5 and int(strategy.steps) == 13  # the reference really moved, step after step


# -- TRL's definition --------------------------------------------------------------------------------
class TRLBEMACallback:
    """TRL's ``BEMACallback`` (trl/trainer/callbacks.py) with the reference-model update of its
    experimental subclass (trl/experimental/bema_for_ref_model/callback.py), ported verbatim
    where it computes; left out: the transformers plumbing (``TrainerCallback``, ``args``,
    ``state``, ``control``: ``state.global_step`` is ``step``), the device move (everything is on
    the CPU here) and the PEFT branch. TRL builds the running model with
    ``type(model)(model.config)`` and ``load_state_dict(model.state_dict())``; a ``deepcopy`` here
    (a copy of the initial model either way). The lines, from TRL::

        def _ema_beta(self, step: int) -> float:
            beta = (self.lag + self.multiplier * step) ** (-self.ema_power)
            return max(beta, self.min_ema_multiplier)

        def _bema_alpha(self, step: int) -> float:
            return (self.lag + self.multiplier * step) ** (-self.bias_power)

        def _update_bema_weights(self, step: int):
            beta = self._ema_beta(step)
            alpha = self._bema_alpha(step)
            for thetat, theta0, ema, run_param in zip(
                self.thetat_params, self.theta0_params, self.ema_params, self.running_model.parameters(), strict=True
            ):
                thetat = thetat.detach().to(self.device)
                ema.mul_(1 - beta).add_(thetat, alpha=beta)
                run_param.copy_(ema + alpha * (thetat - theta0))

        def on_step_end(self, args, state, control, model, **kwargs):
            step = state.global_step
            if step < self.update_after:
                return
            if step == self.update_after:
                for thetat_param, theta0_param, ema_param in zip(
                    self.thetat_params, self.theta0_params, self.ema_params, strict=True
                ):
                    theta0_param.copy_(thetat_param)
                    ema_param.copy_(thetat_param)
            elif (step - self.update_after) % self.update_freq == 0:
                self._update_bema_weights(step)

        # bema_for_ref_model.BEMACallback.on_step_end, after super().on_step_end(...):
            step = state.global_step
            if (
                self.update_ref_model
                and step >= self.ref_model_update_after
                and (step - self.ref_model_update_after) % self.ref_model_update_freq == 0
            ):
                ref_model = kwargs["ref_model"]
                bema_state_dict = self.running_model.state_dict()
                ...
                model.load_state_dict(bema_state_dict, strict=False)   # the regular (non-PEFT) model
    """

    def __init__(self, update_freq=400, ema_power=0.5, bias_power=0.2, lag=10, update_after=0, multiplier=1.0,
                 min_ema_multiplier=0.0, update_ref_model=True, ref_model_update_freq=400, ref_model_update_after=0):
        self.update_freq = update_freq
        self.ema_power = ema_power
        self.bias_power = bias_power
        self.lag = lag
        self.update_after = update_after
        self.multiplier = multiplier
        self.min_ema_multiplier = min_ema_multiplier
        self.device = "cpu"
        self.param_names = []
        self.thetat_params = []
        self.theta0_params = []
        self.ema_params = []
        self.running_model = None
        self.update_ref_model = update_ref_model
        self.ref_model_update_freq = ref_model_update_freq
        self.ref_model_update_after = ref_model_update_after

    @torch.no_grad()
    def on_train_begin(self, model):
        self.running_model = copy.deepcopy(model)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self.param_names.append(name)
            self.thetat_params.append(param)
            theta0 = param.detach().clone().to(self.device)
            self.theta0_params.append(theta0)
            self.ema_params.append(theta0.clone())

    def _ema_beta(self, step: int) -> float:
        beta = (self.lag + self.multiplier * step) ** (-self.ema_power)
        return max(beta, self.min_ema_multiplier)

    def _bema_alpha(self, step: int) -> float:
        return (self.lag + self.multiplier * step) ** (-self.bias_power)

    def _update_bema_weights(self, step: int):
        beta = self._ema_beta(step)
        alpha = self._bema_alpha(step)
        for thetat, theta0, ema, run_param in zip(
            self.thetat_params, self.theta0_params, self.ema_params, self.running_model.parameters(), strict=True
        ):
            thetat = thetat.detach().to(self.device)
            ema.mul_(1 - beta).add_(thetat, alpha=beta)
            run_param.copy_(ema + alpha * (thetat - theta0))

    @torch.no_grad()
    def on_step_end(self, step, model, ref_model):
        self._base_on_step_end(step)
        if (
            self.update_ref_model
            and step >= self.ref_model_update_after
            and (step - self.ref_model_update_after) % self.ref_model_update_freq == 0
        ):
            bema_state_dict = self.running_model.state_dict()
            ref_model.load_state_dict(bema_state_dict, strict=False)

    def _base_on_step_end(self, step):
        if step < self.update_after:
            return
        if step == self.update_after:
            for thetat_param, theta0_param, ema_param in zip(
                self.thetat_params, self.theta0_params, self.ema_params, strict=True
            ):
                theta0_param.copy_(thetat_param)
                ema_param.copy_(thetat_param)
        elif (step - self.update_after) % self.update_freq == 0:
            self._update_bema_weights(step)


@pytest.mark.parametrize("name", SCHEDULES)
def test_bema_reference_is_trls_definition_bit_for_bit(name: str) -> None:
    """A tiny Llama (float32) moved by random steps: after every step the BEMA reference holds
    exactly (``torch.equal``) the weights TRL's callback writes into its reference model."""
    settings = SCHEDULES[name]
    tokenizer = load_tokenizer(tiny_spec())
    policy = load_causal_lm(tiny_spec(seed=1), tokenizer)
    strategy = BEMAReference(copy.deepcopy(policy), policy, settings)
    trl = TRLBEMACallback(**vars(settings))
    trl_reference = copy.deepcopy(policy)
    trl.on_train_begin(policy)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 13):
        with torch.no_grad():
            for param in policy.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        strategy.after_optimizer_step(policy)
        trl.on_step_end(step, policy, trl_reference)
        ours, theirs = dict(strategy.network.named_parameters()), dict(trl_reference.named_parameters())
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), (name, step)
    assert not torch.equal(strategy.network.model.embed_tokens.weight, load_causal_lm(tiny_spec(seed=1), tokenizer)
                           .model.embed_tokens.weight)


# -- real training ----------------------------------------------------------------------------------
class PolicyHistory(L.Callback):
    """The policy's weights (float64) at the start and after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def record(self, module) -> None:
        self.steps.append({k: v.detach().double().clone() for k, v in module.policy.named_parameters()})

    def on_train_start(self, trainer, module) -> None:
        self.record(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.record(module)


def test_the_reference_after_real_training_steps_is_the_formula_of_the_policys_history(tmp_path, pair_files) -> None:
    settings = BEMAUpdate(update_freq=1, update_after=1, ref_model_update_freq=2, lag=2, bias_power=0.5)
    L.seed_everything(0)
    module = PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=settings),
                              optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))
    assert isinstance(module.reference, BEMAReference) and module.reference.running is None
    data = PreferenceDataModule(train_data=pair_files[0], max_length=64, batch_size=4)
    data.connect(module.tokenizer, module.data_requirements)
    history = PolicyHistory()
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[history])
    trainer.fit(module, data)
    assert len(history.steps) == 6 and int(module.reference.steps) == 5
    reference = dict(module.reference.network.named_parameters())
    for name, now in reference.items():
        want = paper_reference([step[name] for step in history.steps], settings)  # last reference step: 4
        torch.testing.assert_close(now.double(), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(want, history.steps[0][name]) and not torch.allclose(want, history.steps[-1][name])


def test_a_resumed_run_ends_with_the_uninterrupted_runs_reference(tmp_path, pair_files) -> None:
    """BEMA every 2 steps after a burn-in of 1, the reference every 3 (a running copy kept apart):
    6 steps straight, and 3 + 3 resumed from the step-3 checkpoint, end with the same reference,
    theta_0, EMA, running weights and step count."""
    bema = {"update_freq": 2, "update_after": 1, "ref_model_update_freq": 3, "lag": 2}

    def fit(name: str, *extra: str):
        recipe = tiny_recipe(tmp_path / name, *pair_files, reference={"bema": bema})
        recipe["trainer"].update(max_steps=6, enable_checkpointing=True, callbacks=[{
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "dirpath": str(tmp_path / name / "ckpt")}}])
        return run(["fit", "--config", write_recipe(tmp_path / f"{name}.yaml", recipe), *extra])

    straight = fit("straight")
    resumed = fit("resumed", "--ckpt_path", str(tmp_path / "straight" / "ckpt" / "epoch=0-step=3.ckpt"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    kept = [k for k in a if k.startswith("reference.")]
    assert {k.split(".")[1] for k in kept} == {"network", "theta0", "ema", "running", "steps"}
    assert int(a["reference.steps"]) == 6
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    saved = torch.load(tmp_path / "straight" / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)["state_dict"]
    key = "reference.ema.model__embed_tokens__weight"
    assert int(saved["reference.steps"]) == 3 and not torch.equal(saved[key], a[key])  # it moved after the resume


def test_a_checkpoint_without_the_bema_state_is_refused() -> None:
    module = PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=BEMAUpdate()))
    with pytest.raises(ValueError, match=r"holds no BEMA reference \(it was trained without "
                                         r"model\.init_args\.reference\.bema\)"):
        module.reference.on_load_checkpoint({}, "reference.")


def test_the_bema_recipe_moves_the_reference_through_the_cli(tmp_path) -> None:
    """recipes/bema.yaml (TRL's defaults: nothing moves in 2 steps) with both schedules set to
    every step on the command line: after 2 steps the reference is neither the initial policy nor
    the trained one."""
    cli = run(quick("bema", tmp_path, "--model.init_args.reference.bema.update_freq", "1",
                    "--model.init_args.reference.bema.ref_model_update_freq", "1"))
    strategy = cli.model.reference
    assert isinstance(strategy, BEMAReference) and int(strategy.steps) == 2 and strategy.update.lag == 10
    initial = load_causal_lm(cli.model.model_spec, cli.model.tokenizer).state_dict()
    ours = strategy.network.state_dict()
    policy = cli.model.policy.state_dict()
    key = "model.embed_tokens.weight"
    assert not torch.equal(ours[key], initial[key]) and not torch.equal(ours[key], policy[key])


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "message"), [
    (BEMAUpdate(update_freq=0), r"model\.init_args\.reference\.bema\.update_freq must be >= 1, got 0"),
    (BEMAUpdate(ref_model_update_freq=0), r"reference\.bema\.ref_model_update_freq must be >= 1"),
    (BEMAUpdate(ema_power=-0.5), r"reference\.bema\.ema_power must be >= 0"),
    (BEMAUpdate(lag=0, multiplier=0), r"reference\.bema: lag \+ multiplier must be > 0"),
    (BEMAUpdate(min_ema_multiplier=1.5), r"reference\.bema\.min_ema_multiplier must be in \[0, 1\]"),
])
def test_bema_settings_out_of_range_name_their_key(settings: BEMAUpdate, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=settings))


def test_bema_refuses_what_it_cannot_go_with() -> None:
    bema = BEMAUpdate()
    with pytest.raises(ValueError, match=r"reference: bema and precompute are two ways"):
        PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=bema, precompute=True))
    with pytest.raises(ValueError, match=r"reference: bema and update are two ways"):
        PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=bema, update=ReferenceUpdate()))
    with pytest.raises(ValueError, match=r"reference\.bema needs full fine-tuning.*TRL's PEFT path"):
        PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=bema), lora=LoraSpec(r=4))
    with pytest.raises(ValueError, match=r"reference\.bema is set but the loss uses no reference model"):
        PreferenceModule(model=tiny_spec(), loss=SimPOLoss(), reference=ReferenceSpec(bema=bema))
    with pytest.raises(ValueError, match=r"per_round .* which reference\.bema does not allow"):
        IterativePreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=bema))
    module = IterativePreferenceModule(model=tiny_spec(), reference=ReferenceSpec(bema=bema, reset="never"))
    assert isinstance(module.reference, BEMAReference)
    assert module.reference_spec() is None  # no fixed reference for reference.json


def test_the_schedules_decide_whether_a_running_copy_is_kept() -> None:
    assert not BEMAUpdate().needs_running_copy()  # TRL's defaults: both every 400 steps
    assert not BEMAUpdate(update_freq=2, ref_model_update_freq=4).needs_running_copy()
    assert not BEMAUpdate(update_freq=2, update_after=1, ref_model_update_freq=4,
                          ref_model_update_after=3).needs_running_copy()
    assert BEMAUpdate(update_freq=4, ref_model_update_freq=2).needs_running_copy()  # step 2: no update
    assert BEMAUpdate(update_freq=2, update_after=2, ref_model_update_freq=2).needs_running_copy()  # 2: the snapshot
    assert BEMAUpdate(update_freq=2, ref_model_update_freq=2, ref_model_update_after=1).needs_running_copy()
