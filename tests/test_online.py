"""Online preference optimisation: judges, the prompt data module, sampling, pair formation, the
PAIRS batch built from samples, determinism, and training through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import ROOT, tiny_spec
from dpo_lightning.cli import run
from dpo_lightning.contract import BatchLayout, DataRequirements
from dpo_lightning.data import PreferenceDataModule, PromptDataModule
from dpo_lightning.data.tokenization import PairEncoder, TokenizationSettings
from dpo_lightning.experiments.sentiment import score as sentiment
from dpo_lightning.generation import SamplingSpec
from dpo_lightning.judges import FunctionJudge, FunctionPairwiseJudge, Judge, PairwiseJudge, RewardModelJudge
from dpo_lightning.losses import DPOLoss, KTOLoss, LossOutput, ODPOLoss
from dpo_lightning.models import load_reward_model, load_tokenizer
from dpo_lightning.modules.online import (
    OnlinePreferenceModule, OnlineSamples, build_pair_batch, cut_at_eos, form_pairs, pairwise_win_rates,
)
from dpo_lightning.scoring import score_pairs

SENTIMENT = "dpo_lightning.experiments.sentiment:score"
KEY = "model.init_args.judge.init_args"
PROMPTS = [
    {"prompt": "Write a short review of the lamp."},
    {"prompt": "What do you think of this kettle you bought last month?"},
    {"prompt": "Review the desk."},
    {"prompt": "Describe your experience with the tent."},
]


# functions the judges import by path (this module is importable as test_online)
def with_prompt(prompt, completion):
    return float(len(completion)) + (100.0 if isinstance(prompt, str) and "lamp" in prompt else 0.0)


def three_args(a, b, c):
    return 0.0


def not_finite(text):
    return float("nan")


def prefer_longer(prompt, first, second):
    return 1.0 if len(first) > len(second) else 0.0 if len(first) < len(second) else 0.5


def out_of_range(prompt, first, second):
    return 2.0


class Constant(PairwiseJudge):
    """Every pair a tie."""

    def prefer(self, prompts, first, second):
        return torch.full((len(first),), 0.5)


class RecordingODPO(ODPOLoss):
    """ODPO that keeps the last batch it saw."""

    def forward(self, policy, reference, batch) -> LossOutput:
        self.seen = {k: v.detach().clone() for k, v in batch.items()}
        return super().forward(policy, reference, batch)


def online_module(judge=None, **kwargs) -> OnlinePreferenceModule:
    """The module on the tiny model; ``SamplingSpec`` fields among ``kwargs`` go to ``sampling``."""
    sampling = {name: kwargs.pop(name) for name in list(kwargs) if name in SamplingSpec.__dataclass_fields__}
    sampling.setdefault("max_new_tokens", 8)
    kwargs.setdefault("optimizer", lambda params: torch.optim.AdamW(params, lr=0.01))
    return OnlinePreferenceModule(model=tiny_spec(), judge=judge or FunctionJudge(SENTIMENT),
                                  sampling=SamplingSpec(**sampling), **kwargs)


def prompt_data(module, rows=PROMPTS, **kwargs) -> PromptDataModule:
    kwargs.setdefault("batch_size", 4)
    dm = PromptDataModule(train_data=list(rows), val_data=list(rows), max_length=64, group_by_length=False, **kwargs)
    dm.connect(module.tokenizer, module.data_requirements)
    return dm


def trainer(steps: int = 1, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    return L.Trainer(**{**options, **kwargs})


# -- judges -------------------------------------------------------------------------------------------
def test_function_judge_takes_completion_or_prompt_and_completion() -> None:
    texts = [" The lamp is great. I love it.", " It is awful.", " nothing here"]
    one = FunctionJudge(SENTIMENT)
    assert one.arguments == "completion" and isinstance(one, Judge)
    assert one.score(["p"] * 3, texts).tolist() == pytest.approx([sentiment(t) for t in texts])
    two = FunctionJudge("test_online:with_prompt")
    assert two.arguments == "prompt_completion"
    got = two.score(["lamp?", "kettle?", [{"role": "user", "content": "lamp"}]], texts)
    assert got.dtype == torch.float32 and got.tolist() == [len(texts[0]) + 100.0, len(texts[1]), len(texts[2])]
    assert FunctionJudge("test_online:with_prompt", arguments="completion").arguments == "completion"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:score", "cannot import"),
        ("dpo_lightning.experiments.sentiment:nothing", "no function 'nothing'"),
        ("score", "module:function"),
        ("test_online:three_args", "arguments to completion or prompt_completion"),
    ],
)
def test_function_judge_errors_name_the_recipe_key(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        FunctionJudge(path)
    assert KEY in str(err.value)


def test_judges_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="finite"):
        FunctionJudge("test_online:not_finite").score(["p"], ["c"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        FunctionPairwiseJudge("test_online:out_of_range").prefer(["p"], ["a"], ["b"])
    with pytest.raises(ValueError, match="as many prompts as completions"):
        FunctionJudge(SENTIMENT).score(["p"], ["a", "b"])
    with pytest.raises(ValueError, match="prompt, first, second"):
        FunctionPairwiseJudge(SENTIMENT)


def test_pairwise_judge_scores_are_mean_win_rates() -> None:
    judge = FunctionPairwiseJudge("test_online:prefer_longer")
    assert judge.prefer(["p", "p"], ["aa", "a"], ["b", "b"]).tolist() == [1.0, 0.5]
    samples = OnlineSamples([[1], [1]], [[5]] * 6, [True] * 6, ["a", "bbb", "cc", "x", "y", "z"], ["p", "q"], 3)
    rates = pairwise_win_rates(judge, samples)
    assert rates.tolist() == [0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert form_pairs(rates.view(2, 3)) == ([(0, 1, 0)], 1)


def test_reward_model_judge_scores_as_the_reward_model_was_trained(tmp_path: Path) -> None:
    spec = tiny_spec(seed=3)
    tokenizer = load_tokenizer(spec)
    model = load_reward_model(spec, tokenizer).eval()
    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    judge = RewardModelJudge(str(folder), batch_size=2).to("cpu")
    prompts = ["Write a short review of the lamp.", "Review the desk.", "What do you think of this kettle?"]
    completions = [" The lamp is great.", " Awful desk, I regret it and want to return it.", " Fine."]
    got = judge.score(prompts, completions)
    with torch.no_grad():  # one sequence at a time, no padding: BOS + prompt, completion + EOS
        expected = [
            model(input_ids=torch.tensor([tokenizer(p)["input_ids"] + tokenizer(c, add_special_tokens=False)["input_ids"]
                                          + [tokenizer.eos_token_id]])).logits[0, 0].item()
            for p, c in zip(prompts, completions)
        ]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    # the same numbers as dpo-lightning-score, for plain and conversational prompts
    for name, prompt in (("plain", prompts[0]), ("chat", [{"role": "user", "content": prompts[0]}])):
        source = tmp_path / f"{name}.jsonl"
        source.write_text(json.dumps({"prompt": prompt, "chosen": completions[0], "rejected": completions[1]}) + "\n")
        scored = json.loads(score_pairs(str(folder), str(source), str(tmp_path / f"{name}_out.jsonl")).read_text())
        pair = judge.score([prompt, prompt], completions[:2]).tolist()
        assert pair == pytest.approx([scored["score_chosen"], scored["score_rejected"]], abs=1e-5)
    with pytest.raises(FileNotFoundError, match=f"{KEY}.name_or_path"):
        RewardModelJudge(str(tmp_path / "missing"))


# -- the prompt data module -----------------------------------------------------------------------------
def test_prompt_data_module_left_pads_prompts_and_carries_them(tokenizer) -> None:
    rows = [{"prompt": "Review the desk."}, {"prompt": "What do you think of this kettle you bought?"},
            {"prompt": None}, {"prompt": "word " * 80}]
    dm = PromptDataModule(train_data=rows, max_length=32, batch_size=4, group_by_length=False)
    dm.connect(tokenizer, DataRequirements(BatchLayout.PROMPTS))
    dm.setup("fit")
    assert dict(dm.reports["train"].dropped) == {"missing_field": 1, "too_long": 1}
    batch = next(iter(dm.ordered_loader("train")))
    encoder = PairEncoder(tokenizer, TokenizationSettings(32))
    expected = [encoder.encode_prompt(r["prompt"]) for r in rows[:2]]
    width = max(map(len, expected))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    for i, ids in enumerate(expected):
        assert batch["input_ids"][i, width - len(ids):].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
    assert batch["row_id"].tolist() == [0, 1] and batch["prompt"] == [r["prompt"] for r in rows[:2]]
    # conversations get the chat template with the generation prompt
    chat = [{"prompt": [{"role": "user", "content": "Review the desk."}]}]
    dm = PromptDataModule(train_data=chat, max_length=64, batch_size=1)
    dm.connect(tokenizer, dm.requirements)
    dm.setup("fit")
    batch = next(iter(dm.ordered_loader("train")))
    rendered = tokenizer.apply_chat_template(chat[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert batch["input_ids"][0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert batch["prompt"] == [chat[0]["prompt"]]
    # a pair data module given the online module's requirements points to this one
    with pytest.raises(ValueError, match="dpo_lightning.data.PromptDataModule"):
        PreferenceDataModule(train_data="x.jsonl").connect(tokenizer, dm.requirements)


# -- pairs ----------------------------------------------------------------------------------------------
def test_form_pairs_best_vs_worst_and_all_skip_ties() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [0.2, 0.8, 0.8]])
    assert form_pairs(scores, "best_vs_worst") == ([(0, 1, 0), (2, 1, 0)], 1)
    assert form_pairs(scores, "all") == ([(0, 1, 0), (0, 2, 0), (0, 1, 2), (2, 1, 0), (2, 2, 0)], 4)
    with pytest.raises(ValueError, match="k >= 2"):
        form_pairs(torch.zeros(3, 1))


def test_cut_at_eos_keeps_the_first_eos_and_appends_none() -> None:
    assert cut_at_eos([[5, 2, 7, 2], [5, 6, 7], [9, 3]], [2, 3]) == ([[5, 2], [5, 6, 7], [9, 3]], [True, False, True])


def test_pair_batch_from_samples_is_what_pair_collator_builds(tokenizer) -> None:
    row = {"prompt": "Write a short review of the lamp.", "chosen": " The lamp is great. I love it.",
           "rejected": " The lamp is awful.", "score_chosen": 0.75, "score_rejected": 0.25}
    offline = PreferenceDataModule(train_data=[row], max_length=64, batch_size=1)
    offline.connect(tokenizer, ODPOLoss().data_requirements)
    offline.setup("fit")
    expected = next(iter(offline.ordered_loader("train")))
    prompt_ids, (chosen, rejected) = PairEncoder(tokenizer, TokenizationSettings(64)).encode(
        row["prompt"], [row["chosen"], row["rejected"]]
    )
    eos = tokenizer.eos_token_id
    generated = [rejected + [eos, 7, 7], chosen + [eos]]  # what generate returns: tokens after the EOS are cut
    completions, has_eos = cut_at_eos(generated, [eos])
    samples = OnlineSamples([prompt_ids], completions, has_eos, ["r", "c"], [row["prompt"]], 2)
    scores = torch.tensor([0.25, 0.75])
    pairs, _ = form_pairs(scores.view(1, 2))
    built = build_pair_batch(samples, pairs, scores, [0], tokenizer.pad_token_id)
    assert built.keys() == expected.keys()
    for name in expected:
        assert torch.equal(built[name], expected[name]), name


def test_sampled_pair_batch_log_probs_are_the_policys(tokenizer) -> None:
    """Left-padded prompts in, PAIRS batch out: each row's log-prob equals a forward pass on the
    unpadded prompt + completion alone."""
    module = online_module()
    dm = prompt_data(module, PROMPTS[:2], batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.ordered_loader("train")))
    assert batch["attention_mask"].sum(-1).tolist()[0] < batch["input_ids"].shape[1]  # really left-padded
    samples = module.sample(batch, 2, seed=0)
    encoder = PairEncoder(tokenizer, TokenizationSettings(64))
    assert samples.prompt_ids == [encoder.encode_prompt(r["prompt"]) for r in PROMPTS[:2]]
    assert samples.texts == tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
    pairs = [(0, 0, 1), (1, 1, 0)]
    built = build_pair_batch(samples, pairs, torch.arange(4.0), [10, 11], tokenizer.pad_token_id)
    assert built["score_chosen"].tolist() == [0.0, 3.0] and built["score_rejected"].tolist() == [1.0, 2.0]
    with torch.no_grad():
        got = module.logprobs(module.policy, built).sums
        order = [(i, c) for i, c, _ in pairs] + [(i, r) for i, _, r in pairs]
        for row, (i, j) in enumerate(order):
            prompt, completion = samples.prompt_ids[i], samples.completion_ids[i * 2 + j]
            logits = module.policy(input_ids=torch.tensor([prompt + completion])).logits[0].double()
            steps = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
            expected = steps.gather(-1, torch.tensor(completion)[:, None]).sum()
            assert got[row].item() == pytest.approx(expected.item(), abs=1e-4)


# -- sampling --------------------------------------------------------------------------------------------
def test_generation_runs_in_eval_mode_without_grad_and_restores_everything() -> None:
    module = online_module()
    dm = prompt_data(module)
    dm.setup("fit")
    batch = next(iter(dm.ordered_loader("train")))
    seen = []
    hook = module.policy.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    module.policy.train()
    rng = torch.get_rng_state()
    samples = module.sample(batch, 3, seed=1)
    hook.remove()
    assert seen and all(state == (False, False) for state in seen)  # eval mode, no grad during generation
    assert module.policy.training and all(m.training for m in module.policy.modules())
    assert torch.is_grad_enabled() and all(p.grad is None for p in module.parameters())
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream is untouched
    assert len(samples.completion_ids) == 12 and all(1 <= len(c) <= 8 for c in samples.completion_ids)
    assert all(c[-1] == module.tokenizer.eos_token_id for c, e in zip(samples.completion_ids, samples.has_eos) if e)
    again = module.sample(batch, 3, seed=1)
    assert again.completion_ids == samples.completion_ids
    assert module.sample(batch, 3, seed=2).completion_ids != samples.completion_ids
    # missing_eos_penalty lowers the score of completions cut at max_new_tokens
    module.sampling.missing_eos_penalty = 0.5
    base = FunctionJudge(SENTIMENT).score(samples.prompts_per_sample(), samples.texts)
    penalty = torch.tensor([0.0 if e else 0.5 for e in samples.has_eos])
    assert torch.allclose(module.judge_samples(samples), base - penalty)


def test_same_seed_same_first_step(tmp_path: Path) -> None:
    class Recording(OnlinePreferenceModule):
        def sample(self, batch, num_samples, seed, exact=False):
            out = super().sample(batch, num_samples, seed, exact)
            self.samples = out.completion_ids
            return out

    def first_step(generation_seed=None):
        L.seed_everything(0)
        module = Recording(model=tiny_spec(), judge=FunctionJudge("test_online:with_prompt"),
                           sampling=SamplingSpec(max_new_tokens=8, seed=generation_seed),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
        fit = trainer(1)
        fit.fit(module, prompt_data(module))
        weights = [p.detach().clone() for p in module.policy.parameters()]
        return module.samples, fit.callback_metrics["train/loss"].item(), weights

    first, second, other = first_step(), first_step(), first_step(generation_seed=123)
    assert first[0] == second[0] and first[1] == second[1]
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))
    assert other[0] != first[0]


# -- training ---------------------------------------------------------------------------------------------
def test_settings_are_checked_before_loading_the_model() -> None:
    judge = FunctionJudge(SENTIMENT)
    with pytest.raises(ValueError, match="unpaired rows.*pairwise loss"):
        OnlinePreferenceModule(model=tiny_spec(), judge=judge, loss=KTOLoss())

    class NeedsMargin(DPOLoss):
        score_columns = ("margin",)

    with pytest.raises(ValueError, match=r"reads \['margin'\]"):
        OnlinePreferenceModule(model=tiny_spec(), judge=judge, loss=NeedsMargin())
    with pytest.raises(ValueError, match="num_samples must be an int >= 2"):
        OnlinePreferenceModule(model=tiny_spec(), judge=judge, sampling=SamplingSpec(num_samples=1))
    with pytest.raises(ValueError, match="pairs must be"):
        OnlinePreferenceModule(model=tiny_spec(), judge=judge, sampling=SamplingSpec(pairs="random"))
    with pytest.raises(TypeError, match="judge must be"):
        OnlinePreferenceModule(model=tiny_spec(), judge=sentiment)
    with pytest.raises(ValueError, match="max_new_tokens=200 exceeds"):
        module = online_module(max_new_tokens=200)
        dm = prompt_data(module)
        dm.setup("fit")
        module.sample(next(iter(dm.ordered_loader("train"))), 2, seed=0)


@pytest.mark.parametrize("samples_once", [False, True], ids=["pair-layout", "samples-layout"])
def test_online_odpo_reads_the_judges_scores(samples_once: bool) -> None:
    loss = RecordingODPO(beta=0.1, alpha=1.0, offset_fn="identity")
    module = online_module(FunctionJudge("test_online:with_prompt"), loss=loss, num_samples=3, pairs="all",
                           samples_once=samples_once)
    fit = trainer(1)
    fit.fit(module, prompt_data(module))
    seen = loss.seen
    n = seen["row_id"].numel()
    assert n >= 1 and (seen["pair_sample"].numel() if samples_once else seen["input_ids"].shape[0]) == 2 * n
    # the pair layout: chosen rows [0, n), rejected [n, 2n); the samples layout: each side's sample row
    side_rows = seen["pair_sample"].tolist() if samples_once else list(range(2 * n))
    if samples_once:
        assert seen["input_ids"].shape[0] < 2 * n  # 3 samples in up to 3 pairs: fewer sequences than pair sides
    assert (seen["score_chosen"] > seen["score_rejected"]).all()
    tokenizer = module.tokenizer
    for side, rows in (("score_chosen", side_rows[:n]), ("score_rejected", side_rows[n:])):
        texts = [tokenizer.decode(seen["input_ids"][r][seen["completion_mask"][r].bool()], skip_special_tokens=True)
                 for r in rows]
        prompts = [PROMPTS[i]["prompt"] for i in seen["row_id"].tolist()]
        assert seen[side].tolist() == pytest.approx(FunctionJudge("test_online:with_prompt").score(prompts, texts).tolist())
    metrics = fit.callback_metrics
    assert metrics["train/online/pairs"].item() == n
    assert metrics["train/online/score_chosen"].item() == pytest.approx(seen["score_chosen"].mean().item(), rel=1e-5)
    assert metrics["train/offset"].item() == pytest.approx((seen["score_chosen"] - seen["score_rejected"]).mean().item(), rel=1e-5)
    for name in ("score_mean", "score_rejected", "completion_length", "eos_fraction", "tied_pairs"):
        assert f"train/online/{name}" in metrics


def test_all_tied_batches_skip_the_step() -> None:
    module = online_module(Constant())
    before = [p.detach().clone() for p in module.policy.parameters()]
    fit = trainer(1)
    with pytest.raises(RuntimeError, match=r"every optimizer step \(1 of 1\) was skipped"):  # nothing trained
        fit.fit(module, prompt_data(module))
    assert fit.global_step == 1 and module.skipped_steps == 1
    assert fit.callback_metrics["train/online/skipped_steps"].item() == 1
    assert fit.callback_metrics["train/online/tied_pairs"].item() == len(PROMPTS)
    assert fit.callback_metrics["train/online/pairs"].item() == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))


def test_validation_logs_score_and_kl() -> None:
    from dpo_lightning.sampling import completion_logprobs

    module = online_module()
    dm = prompt_data(module)
    fit = trainer(2, limit_val_batches=1)
    first = fit.validate(module, dm, verbose=False)[0]
    assert first["val/kl"] == 0.0  # the policy is its reference before training
    fit.fit(module, dm)
    after = fit.validate(module, dm, verbose=False)[0]
    # the same samples again (seeded by step and batch), scored and compared by hand
    batch = next(iter(dm.ordered_loader("val")))
    samples = module.sample(batch, 1, module.seed_for(1, 0), exact=True)
    assert after["val/score"] == pytest.approx(sum(map(sentiment, samples.texts)) / len(samples.texts), abs=1e-6)
    pad = module.tokenizer.pad_token_id
    kl = [
        (completion_logprobs(module.policy, pad, p, [c]) - completion_logprobs(module.reference.network, pad, p, [c])).item()
        for p, c in zip(samples.prompt_ids, samples.completion_ids)
    ]
    assert after["val/kl"] == pytest.approx(sum(kl) / len(kl), abs=1e-4) and after["val/kl"] != 0.0
    assert after["val/completion_length"] == pytest.approx(sum(map(len, samples.completion_ids)) / len(kl))


@pytest.mark.parametrize("variant", ["lora", "simpo"])
def test_lora_and_reference_free_losses_train_online(variant: str) -> None:
    from dpo_lightning.lora import LoraSpec
    from dpo_lightning.losses import SimPOLoss

    kwargs = {"lora": LoraSpec(r=4, alpha=8)} if variant == "lora" else {"loss": SimPOLoss()}
    module = online_module(FunctionJudge("test_online:with_prompt"), **kwargs)
    dm = prompt_data(module)
    fit = trainer(1, limit_val_batches=1)
    before = fit.validate(module, dm, verbose=False)[0]
    fit.fit(module, dm)
    assert fit.global_step == 1 and fit.callback_metrics["train/online/pairs"].item() >= 1
    after = fit.validate(module, dm, verbose=False)[0]
    assert "val/score" in after
    if variant == "lora":  # the reference is the policy without its adapters: zero KL until they train
        assert before["val/kl"] == 0.0 and after["val/kl"] != 0.0
    else:
        assert "val/kl" not in after


def test_online_dpo_trains_two_steps_through_the_cli(tmp_path: Path) -> None:
    cli = run([
        "fit", "--config", str(ROOT / "recipes" / "base.yaml"), "--config", str(ROOT / "recipes" / "online_dpo.yaml"),
        "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(tmp_path / "model"),
        "--data.init_args.batch_size", "4", "--model.init_args.sampling.max_new_tokens", "8",
    ])
    assert isinstance(cli.model, OnlinePreferenceModule) and isinstance(cli.model.loss, DPOLoss)
    assert isinstance(cli.model.judge, FunctionJudge) and cli.model.judge.path == SENTIMENT
    assert cli.trainer.global_step == 2 and (tmp_path / "model" / "model.safetensors").exists()
    assert "judge" not in cli.model.hparams or not isinstance(cli.model.hparams["judge"], Judge)


@pytest.mark.slow
def test_resumed_run_samples_and_trains_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """The sampling seed is a function of (seed, step, batch, rank): stopping after 2 steps and
    resuming to 4 gives the weights of 4 steps in one go."""
    def fit(name: str, steps: int, *extra: str):
        return run([
            "fit", "--config", str(ROOT / "recipes" / "base.yaml"), "--config", str(ROOT / "recipes" / "online_dpo.yaml"),
            "--trainer.max_steps", str(steps), "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_last", "true",
            "--trainer.default_root_dir", str(tmp_path / name), "--model.init_args.export_dir", str(tmp_path / name / "model"),
            "--model.init_args.scheduler.init_args.warmup", "0", "--model.init_args.scheduler.init_args.decay", "constant",
            "--data.init_args.batch_size", "4", "--data.init_args.max_rows", "16", "--model.init_args.sampling.max_new_tokens", "8",
            *extra,
        ])

    straight = fit("straight", 4)
    fit("resumed", 2)
    resumed = fit("resumed", 4, "--ckpt_path", "last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    for a, b in zip(straight.model.policy.parameters(), resumed.model.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # another judge would train the rest of the run on other preferences: refused, naming it
    with pytest.raises(ValueError, match=r"judge: checkpoint -> now: .*path '.*sentiment:score' -> 'test_online:with_prompt' "
                                         r"\(resume with the same model.init_args.judge\)"):
        fit("resumed", 6, "--ckpt_path", "last", "--model.init_args.judge.init_args.path", "test_online:with_prompt")
