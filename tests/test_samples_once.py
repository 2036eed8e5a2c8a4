"""Online training's samples layout (``samples_once``): each sampled sequence runs once however
many pairs it is in (and, where pairs share their prompt, each prompt once for all its samples),
and each pair takes its samples' log-probs. The loss and the gradients must be the pair layout's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, tiny_decoder, tiny_spec
from dpo_lightning.generation import Samples, SamplingSpec, build_pair_batch, judge_and_pair, sample_pair_batch
from dpo_lightning.judges import FunctionJudge
from dpo_lightning.losses import DPOLoss, LengthDesensitized, ODPOLoss, SimPOLoss
from dpo_lightning.modules.logprobs import chunked_model_logprobs, pack_shared_prompt, shared_prompt_model_logprobs
from dpo_lightning.modules.online import OnlinePreferenceModule, padded_layout_cost
from test_online import PROMPTS, SENTIMENT, prompt_data, trainer

PAD = 0


def hand_samples() -> Samples:
    """2 prompts x 3 samples of known tokens."""
    prompts = [[5, 6], [7, 8, 9]]
    completions = [[10], [11, 12], [13, 2], [14, 15, 16], [17], [18, 2]]
    return Samples(prompts, completions, [False, False, True, False, False, True], ["a"] * 6, ["p", "q"], 3)


def test_sample_pair_batch_holds_each_used_sample_once_and_indexes_the_pairs() -> None:
    samples = hand_samples()
    pairs = [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 2, 0)]
    scores = torch.arange(6.0)
    batch = sample_pair_batch(samples, pairs, scores, [40, 41], PAD)
    # sample rows in first use, chosen sides first: 0, 1, 5 (prompt 1's sample 2), then 2, 3
    used = [0, 1, 5, 2, 3]
    assert batch["input_ids"].shape[0] == 5
    for row, flat in enumerate(used):
        tokens = samples.prompt_ids[flat // 3] + samples.completion_ids[flat]
        assert batch["input_ids"][row, : len(tokens)].tolist() == tokens
        assert batch["attention_mask"][row].sum().item() == len(tokens)
        assert batch["completion_mask"][row].nonzero().flatten().tolist() == list(
            range(len(samples.prompt_ids[flat // 3]), len(tokens)))
    chosen, rejected = [0, 0, 1, 5], [1, 2, 2, 3]
    assert batch["pair_sample"].tolist() == [used.index(f) for f in chosen + rejected]
    assert batch["row_id"].tolist() == [40, 40, 40, 41]
    assert batch["score_chosen"].tolist() == [0.0, 0.0, 1.0, 5.0]
    assert batch["score_rejected"].tolist() == [1.0, 2.0, 2.0, 3.0]
    assert batch["prompt_group"].tolist() == [0, 0, 1, 0, 1]


def test_a_prompts_samples_pack_into_one_row_behind_one_prompt() -> None:
    """The used samples of ``hand_samples``' prompt 0 (batch rows 0, 1, 3) and prompt 1 (rows 2,
    4) as two rows ``[prompt; sample; sample; ...]``, each sample restarting its positions after
    the prompt; each sample's log-prob equals its own row's in float64."""
    samples = hand_samples()
    batch = sample_pair_batch(samples, [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 2, 0)], torch.arange(6.0), [40, 41], PAD)
    packed = pack_shared_prompt(batch)
    assert packed["ids"].tolist() == [[5, 6, 10, 11, 12, 13, 2, PAD], [7, 8, 9, 18, 2, 14, 15, 16]]
    assert packed["segment"].tolist() == [[0, 0, 1, 2, 2, 3, 3, -1], [0, 0, 0, 1, 1, 2, 2, 2]]
    assert packed["positions"].tolist() == [[0, 1, 2, 2, 3, 2, 3, 0], [0, 1, 2, 3, 4, 3, 4, 5]]
    assert packed["predictor"].tolist() == [[-1, 0, 1, 1, 3, 1, 5, 6], [-1, 0, 1, 2, 3, 2, 5, 6]]
    assert packed["side"][packed["segment"] > 0].tolist() == [0, 1, 1, 3, 3, 2, 2, 4, 4, 4]
    model = tiny_decoder().double()
    with torch.no_grad():
        shared = shared_prompt_model_logprobs(model, batch)
        plain = chunked_model_logprobs(model, batch)
    assert shared.counts.tolist() == plain.counts.tolist() == [1, 2, 2, 2, 3]
    torch.testing.assert_close(shared.sums, plain.sums, rtol=0, atol=1e-10)
    batch["prompt_group"] = torch.tensor([0, 0, 0, 0, 1])  # row 2 answers prompt 1, not prompt 0
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3\] share a prompt group but not their prompt tokens"):
        pack_shared_prompt(batch)


def float64_module(loss, **kwargs) -> OnlinePreferenceModule:
    module = OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), loss=loss,
                                    sampling=SamplingSpec(num_samples=4, pairs="all", max_new_tokens=6), **kwargs)
    return module.double()


@pytest.mark.parametrize("loss", [DPOLoss(beta=0.5), ODPOLoss(beta=0.5), SimPOLoss()], ids=["dpo", "odpo", "simpo"])
def test_samples_layout_gives_the_pair_layouts_loss_and_gradients(loss) -> None:
    torch.manual_seed(0)  # the perturbation below, whatever ran before
    module = float64_module(loss)
    with torch.no_grad():  # a policy unlike its reference, so the DPO margins are not all 0
        for p in module.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dm = prompt_data(module, PROMPTS, batch_size=4)
    dm.setup("fit")
    prompts = next(iter(dm.ordered_loader("train")))
    samples = module.sample(prompts, 4, seed=3)
    judged = judge_and_pair(module.judge, samples, module.sampling, 3)
    assert len(judged.pairs) > len(samples.prompts)  # pairs share samples
    results = []

    def separate_samples(*args):  # the samples layout with each sample in its own row
        batch = sample_pair_batch(*args)
        del batch["prompt_group"]
        return batch

    for layout in (build_pair_batch, sample_pair_batch, separate_samples):
        batch = layout(samples, judged.pairs, judged.scores, prompts["row_id"].tolist(), module.tokenizer.pad_token_id)
        module.zero_grad()
        loss_value, values = module.step(batch, module.train_metrics)
        loss_value.backward()
        grads = [p.grad.clone() for p in module.policy.parameters() if p.grad is not None]
        results.append((loss_value.detach(), values, grads, batch["input_ids"].shape[0]))
    (pair_loss, pair_values, pair_grads, pair_rows) = results[0]
    assert module.logprob_selector.shares_prompt(module.policy, batch | {"prompt_group": torch.zeros(1)})
    for sample_loss, sample_values, sample_grads, sample_rows in results[1:]:  # grouped, then separate rows
        assert sample_rows < pair_rows  # fewer sequences run
        assert sample_loss.item() == pytest.approx(pair_loss.item(), abs=1e-10)
        assert sample_values.keys() == pair_values.keys()
        for name in pair_values:
            assert torch.allclose(sample_values[name].double(), pair_values[name].double(), atol=1e-10), name
        assert len(pair_grads) == len(sample_grads) > 0
        # Llama's RMSNorm computes in float32 even in a float64 model: the per-row gradients, summed in
        # another grouping (a sample's pairs added before the layers, not after), agree to float32's
        # precision, not float64's (the forward values above are equal to 1e-10)
        for a, b in zip(pair_grads, sample_grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item()), (a - b).abs().max().item()


def test_auto_takes_the_layout_of_fewer_tokens() -> None:
    module = OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT))
    samples = hand_samples()
    # every pair of 3 samples: 6 pair sides from 3 samples of a prompt -> fewer tokens once each
    assert module.runs_samples_once(samples, [(0, 0, 1), (0, 0, 2), (0, 1, 2)])
    # one pair per prompt: the same sequences either way -> the pair layout
    assert not module.runs_samples_once(samples, [(0, 0, 1), (1, 2, 0)])
    # with the prompt shared by each pair (share_prompt on), 3 pairs of prompt 1 cost 3 x 3 + 2 x (2 + 3 + 2) ...
    shared = OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), share_prompt=True)
    # ... against 3 x (3 + 3) + ... once each: a pair per prompt then favours the shared pair layout
    assert not shared.runs_samples_once(samples, [(1, 0, 1)])
    # two pairs of prompt 1 (samples of 3, 1 and 2 tokens): 2 x 3 + (3 + 1) + (3 + 2) = 15 tokens as
    # shared pairs, 3 + 3 + 1 + 2 = 9 with the prompt once for its three samples (15 if it ran per sample)
    assert shared.runs_samples_once(samples, [(1, 0, 1), (1, 0, 2)])
    assert OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), samples_once=True).runs_samples_once(
        samples, [(0, 0, 1)])
    assert not OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), samples_once=False
                                      ).runs_samples_once(samples, [(0, 0, 1), (0, 0, 2), (0, 1, 2)])
    # a loss that reads per-token log-probs always trains in the pair layout
    ld = OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), loss=LengthDesensitized(DPOLoss(), 0.5))
    assert not ld.runs_samples_once(samples, [(0, 0, 1), (0, 0, 2), (0, 1, 2)])


def test_a_sliding_window_limits_grouping_by_the_plain_rows_width() -> None:
    """Each sample sees the prompt and itself, as in its plain row: a window of 16 allows rows of
    10 tokens however many share a prompt, and refuses rows of 20."""
    from transformers import MistralConfig

    from dpo_lightning.modules.logprobs import LogProbSelector

    model = tiny_decoder(MistralConfig, sliding_window=16)
    selector = LogProbSelector("auto", "auto", share_prompt="auto")
    for width, shared in ((10, True), (20, False)):
        batch = {"input_ids": torch.ones(4, width, dtype=torch.long), "attention_mask": torch.ones(4, width),
                 "prompt_group": torch.zeros(4, dtype=torch.long)}
        assert selector.shares_prompt(model, batch) is shared


def test_the_layout_cost_counts_padded_positions_and_every_attention_score() -> None:
    config = SimpleNamespace(hidden_size=4, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8)
    per_token = 2 * (4 * (4 + 2 * 2) + 4 * 4 + 3 * 4 * 8)  # q / k / v, o, the MLP's three matrices
    per_score = 4 * 4 + 64 * 2  # two products over the query width, 64 elementwise operations a head
    assert padded_layout_cost(config, [3, 5]) == 2 * 5 * per_token + 2 * 5 * 5 * per_score == 10080
    assert padded_layout_cost(config, []) == 0.0


def test_the_estimate_picks_the_layout_measured_faster_at_both_benchmark_settings() -> None:
    """8 samples of every prompt of a step (benchmarks/README.md): at ``small`` (4 layers, hidden
    256; 8 prompts of up to 97 tokens, samples of 64) one row per prompt ran 1.28x faster; at
    ``sentiment`` (the shipped tiny Llama, hidden 64; 16 prompts of up to 23 tokens, samples of
    up to 32) it ran at 0.93x, its rows of ~280 positions paying for their squared attention."""
    small = SimpleNamespace(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=704)
    assert padded_layout_cost(small, [97 + 8 * 64] * 8) < padded_layout_cost(small, [97 + 64] * 64)
    tiny = SimpleNamespace(**json.loads((ROOT / "data" / "tiny-llama" / "config.json").read_text()))
    assert padded_layout_cost(tiny, [23 + 8 * 32] * 16) > padded_layout_cost(tiny, [23 + 32] * 128)


def test_training_groups_a_prompts_samples_only_where_it_is_estimated_cheaper() -> None:
    shared = OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), share_prompt=True)
    samples = hand_samples()
    assert shared.groups_samples(samples, [(0, 0, 1), (0, 0, 2), (0, 1, 2)])  # short rows: 1 of 7 against 3 of 3-4
    long = Samples([[5, 6]], [[7] * 60 for _ in range(8)], [False] * 8, ["a"] * 8, ["p"], 8)
    every_pair = [(0, a, b) for a in range(8) for b in range(a + 1, 8)]
    assert not shared.groups_samples(long, every_pair)  # one row of 482 positions against 8 of 62
    assert shared.runs_samples_once(long, every_pair)  # still each sample once, in rows of their own
    separate = OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), share_prompt=False)
    assert not separate.groups_samples(samples, [(0, 0, 1), (0, 0, 2), (0, 1, 2)])  # pairs do not share: nor do samples


def test_bad_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"model.init_args.samples_once must be true, false or auto, got 'yes'"):
        OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), samples_once="yes")
    with pytest.raises(ValueError, match=r"model.init_args.samples_once: LengthDesensitized reads per-token"):
        OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge(SENTIMENT), loss=LengthDesensitized(DPOLoss(), 0.5),
                               samples_once=True)


def test_a_training_step_in_either_layout_ends_at_the_same_weights(monkeypatch) -> None:
    """Pairs, samples grouped behind their prompt (what the estimate picks here), and samples in
    rows of their own (grouping declined: training_step drops ``prompt_group``)."""
    weights = []
    grouped = []
    for samples_once, group in ((False, None), (True, None), (True, False)):
        if group is not None:
            monkeypatch.setattr(OnlinePreferenceModule, "groups_samples", lambda self, samples, pairs: group)
        original = OnlinePreferenceModule.pair_logprobs

        def pair_logprobs(self, batch, original=original):
            grouped.append("prompt_group" in batch)
            return original(self, batch)

        monkeypatch.setattr(OnlinePreferenceModule, "pair_logprobs", pair_logprobs)
        module = OnlinePreferenceModule(
            model=tiny_spec(), judge=FunctionJudge(SENTIMENT), samples_once=samples_once,
            sampling=SamplingSpec(num_samples=4, pairs="all", max_new_tokens=6, seed=5),
            optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        )
        trainer(1).fit(module, datamodule=prompt_data(module))
        weights.append([p.detach().clone() for p in module.policy.parameters()])
        monkeypatch.undo()
    assert grouped == [False, True, False]  # one training step each: pairs, grouped samples, separate samples
    moved = max((a - b).abs().max().item() for a, b in zip(weights[0], module.reference.network.parameters()))
    assert moved > 1e-4  # the step did something
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            assert torch.allclose(a, b, atol=1e-6)


def test_a_training_step_estimates_the_grouping_once(monkeypatch) -> None:
    """``training_step`` asks :meth:`groups_samples` once and hands the answer to
    ``runs_samples_once`` (it was evaluated twice per step)."""
    calls = []
    original = OnlinePreferenceModule.groups_samples
    monkeypatch.setattr(OnlinePreferenceModule, "groups_samples",
                        lambda self, samples, pairs: calls.append(len(pairs)) or original(self, samples, pairs))
    module = OnlinePreferenceModule(
        model=tiny_spec(), judge=FunctionJudge(SENTIMENT),
        sampling=SamplingSpec(num_samples=4, pairs="all", max_new_tokens=6, seed=5),
    )
    trainer(2).fit(module, datamodule=prompt_data(module))
    assert len(calls) == 2 and min(calls) > 0  # one estimate per step, of that step's pairs
