"""The sampling loop of dpo_lightning.decoding (prefill once, cache expanded to k samples,
finished rows dropped, a seeded per-row stream) and its use by sample_completions: the tokens do
not depend on the row dropping, the same seed gives the same samples, the caller's RNG is
untouched, the logits of every step are those of a full forward over prompt + sampled tokens
(left padding included), the frequencies match the model's exact (warped) probabilities, rows
stop at their first stop id, peft models sample through their adapters, and engine=generate is
the old generate path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from dpo_lightning.decoding import NonFiniteLogitsError, can_decode, decode, inverse_cdf
from dpo_lightning import generation
from dpo_lightning.generation import SamplingSpec, sample_completions, sample_with_generate
from dpo_lightning.lora import LoraSpec, add_adapters

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]  # three lengths: two rows left-padded


def tiny_lm(vocab: int = 512, seed: int = 0, scale: float = 0.02) -> LlamaForCausalLM:
    """A 2-layer Llama in eval mode; ``scale`` (the init range) sets how peaked its distributions are."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=scale, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def run(model, k: int = 4, seed: int = 0, n: int = 8, stops=(1,), prompts=PROMPTS, **kwargs):
    ids, mask = padded(prompts)
    return decode(model, ids, mask, k, max_new_tokens=n, stop_ids=list(stops),
                  generator=torch.Generator().manual_seed(seed), **kwargs)


# -- the stream --------------------------------------------------------------------------------------
def test_dropping_finished_rows_gives_the_same_tokens_with_less_work() -> None:
    model = tiny_lm()
    stops = range(2, 60)  # ~11% of the vocabulary: rows stop at many different steps, some never
    dropped = run(model, k=5, n=10, stops=stops)
    kept = run(model, k=5, n=10, stops=stops, drop_finished=False)
    assert dropped.tokens == kept.tokens and dropped.has_eos == kept.has_eos
    lengths = sorted(len(t) for t in dropped.tokens)
    assert lengths[0] < lengths[-1] and 0 < sum(dropped.has_eos) < len(dropped.tokens)  # the check has teeth
    # the work: the rows still running at each step after the first, against every row every step
    assert dropped.row_steps == sum(sum(1 for t in dropped.tokens if len(t) > s) for s in range(1, dropped.steps))
    assert kept.row_steps == 15 * (kept.steps - 1) > dropped.row_steps


def test_same_seed_same_samples_other_seed_other_samples_global_rng_untouched() -> None:
    model = tiny_lm()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again, other = run(model, seed=7), run(model, seed=7), run(model, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


def test_sample_completions_seeds_its_own_stream_or_draws_a_seed_from_the_callers(tokenizer) -> None:
    model = tiny_lm()
    ids, mask = padded(PROMPTS)
    batch = {"input_ids": ids, "attention_mask": mask, "prompt": ["a", "b", "c"]}
    kwargs = dict(max_new_tokens=6, stop_ids=[tokenizer.eos_token_id])
    state = torch.get_rng_state()
    a = sample_completions(model, tokenizer, batch, 3, seed=11, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.completion_ids == sample_completions(model, tokenizer, batch, 3, seed=11, **kwargs).completion_ids
    assert a.completion_ids != sample_completions(model, tokenizer, batch, 3, seed=12, **kwargs).completion_ids
    # seed None: the commands' way, a function of the caller's (seeded) stream
    torch.manual_seed(5)
    b = sample_completions(model, tokenizer, batch, 3, seed=None, **kwargs)
    assert not torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(5)
    assert b.completion_ids == sample_completions(model, tokenizer, batch, 3, seed=None, **kwargs).completion_ids


# -- the cache: expanded, selected, positioned ----------------------------------------------------------
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_every_steps_logits_are_a_full_forward_over_prompt_and_sampled_tokens(shared_prefix: bool) -> None:
    """Hooks record the logits of each forward of the loop (prefill: one row per prompt; then
    the rows still running, in row order) and compare them with one unpadded forward per sample:
    wrong positions under left padding, a cache expanded in the wrong order or rows selected
    wrongly after a drop all change them. Both layouts of the cache: repeated for the samples,
    and shared by them (dpo_lightning/shared_prefix.py)."""
    model = tiny_lm(scale=0.2)
    seen: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.logits[:, -1].clone()))
    try:
        k, stops = 3, range(2, 120)
        result = run(model, k=k, n=8, stops=stops, seed=3, shared_prefix=shared_prefix)
    finally:
        hook.remove()
    tokens = result.tokens
    assert min(map(len, tokens)) < max(map(len, tokens))  # rows were dropped along the way
    assert len(seen) == result.steps
    worst = 0.0
    for r, row in enumerate(tokens):
        prompt = PROMPTS[r // k]
        full = model(torch.tensor([prompt + row])).logits[0, len(prompt) - 1 :]  # (len(row) + 1, V)
        for step in range(len(row)):
            if step == 0:
                got = seen[0][r // k]
            else:
                running = [q for q, t in enumerate(tokens) if len(t) > step]
                got = seen[step][running.index(r)]
            worst = max(worst, (got - full[step]).abs().max().item())
    assert worst < 1e-5


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_nan_logits_raise_naming_the_rows_instead_of_drawing_a_token_past_the_vocabulary(shared_prefix: bool, n: int) -> None:
    """A NaN total sends searchsorted past the vocabulary (token id V): the loop raises, naming the
    rows and the step, where it once returned id V (n = 1) or failed in the next embedding lookup."""
    model = tiny_lm()
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")  # tied: the embedding of token 7 too, which no prompt holds
    with pytest.raises(NonFiniteLogitsError, match=r"NaN or infinite \(rows \[0, 1, 2, 3, 4, 5, 6, 7\] \.\.\. of the sampling batch, decode step 0\)") as error:
        run(model, k=4, n=n, shared_prefix=shared_prefix)
    assert error.value.rows == list(range(12)) and error.value.step == 0


def test_a_row_whose_logits_turn_nan_mid_sampling_is_named() -> None:
    model = tiny_lm()
    calls = []

    def poison(module, args, output):  # the first decode step's forward: batch row 1 gets NaN logits
        calls.append(output.shape[0])
        if len(calls) == 2:
            output = output.clone()
            output[1] = float("nan")
            return output
        return output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(NonFiniteLogitsError) as error:
        run(model, k=2, n=4, stops=())
    assert calls == [3, 6] and error.value.rows == [1] and error.value.step == 1


def test_inverse_cdf_never_takes_a_token_of_probability_zero() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    u = torch.tensor([0.0, 0.0]), torch.tensor([0.4999, 0.3]), torch.tensor([0.5, 0.999999]), torch.tensor([1 - 1e-16] * 2)
    got = [inverse_cdf(probs, x).tolist() for x in u]
    assert got == [[1, 4], [1, 4], [3, 4], [3, 4]]


# -- the distribution ----------------------------------------------------------------------------------
SETTINGS = [
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"temperature": 0.6, "top_k": 0, "top_p": 1.0},
    {"temperature": 1.0, "top_k": 3, "top_p": 1.0},
    {"temperature": 1.0, "top_k": 0, "top_p": 0.7},
    {"temperature": 1.4, "top_k": 5, "top_p": 0.9},
]


def generate_probs(model, prompts: list[list[int]], settings: dict) -> torch.Tensor:
    """``(n, V)`` float64: the next-token distribution ``generate`` samples from after each
    (equal-length) prompt: its processed scores (``output_scores``) through softmax."""
    ids = torch.tensor(prompts)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=1,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0, **settings)
    return torch.softmax(out.scores[0].double(), dim=-1)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_frequencies_match_the_exact_warped_probabilities(settings) -> None:
    """4000 samples of 2 tokens (2000 of each of two prompts of different lengths) over an
    8-token vocabulary, token 0 a stop id: every first token and every (first, second) pair
    within 5 standard errors of its exact probability (what ``generate`` samples from: its
    processed scores for the prompt, and for the prompt and each first token), and no
    sample of a pair whose exact probability is 0 (a token top-k / top-p removes)."""
    vocab, k = 8, 2000
    model = tiny_lm(vocab=vocab, seed=1, scale=0.3)
    prompts = [[3, 4, 5], [6, 7]]
    result = run(model, k=k, n=2, stops=(0,), prompts=prompts, seed=2024, **settings)
    worst_z, checked_zero = 0.0, 0
    for i, prompt in enumerate(prompts):
        first = generate_probs(model, [prompt], settings)[0]
        second = generate_probs(model, [prompt + [a] for a in range(vocab)], settings)
        exact = {(a,): first[a].item() for a in range(vocab)}
        pair = {(a, b): first[a].item() * second[a, b].item() for a in range(1, vocab) for b in range(vocab)}
        samples = [tuple(t) for t in result.tokens[i * k : (i + 1) * k]]
        assert all(len(t) == (1 if t[0] == 0 else 2) for t in samples)
        for table, cut in ((exact, 1), (pair, 2)):
            counts: dict[tuple[int, ...], int] = {}
            for t in samples:
                if len(t) >= cut:
                    counts[t[:cut]] = counts.get(t[:cut], 0) + 1
            assert set(counts) <= {key for key, p in table.items() if p > 0}
            for key, p in table.items():
                if p == 0:
                    checked_zero += 1
                    continue
                z = abs(counts.get(key, 0) / k - p) / math.sqrt(max(p * (1 - p), 1e-12) / k)  # p = 1: exact
                worst_z = max(worst_z, z)
    assert worst_z < 5
    if settings["top_k"] or settings["top_p"] < 1:
        assert checked_zero > 0  # the truncation removed tokens, and none was sampled


# -- stopping, and sample_completions on top -----------------------------------------------------------
def test_completions_end_at_their_first_stop_id_or_run_to_max_new_tokens(tokenizer) -> None:
    model = tiny_lm()
    stops = [tokenizer.eos_token_id, *range(20, 120)]
    ids, mask = padded(PROMPTS)
    batch = {"input_ids": ids, "attention_mask": mask, "prompt": ["a", "b", "c"], "row_id": torch.tensor([4, 5, 6])}
    out = sample_completions(model, tokenizer, batch, 4, seed=1, max_new_tokens=7, stop_ids=stops)
    assert len(out.completion_ids) == 12 and out.row_ids == [4, 5, 6] and out.prompt_ids == PROMPTS
    for tokens, eos in zip(out.completion_ids, out.has_eos):
        inside = [t for t in tokens[:-1] if t in stops]
        assert inside == []
        assert eos == (tokens[-1] in stops)
        assert eos or len(tokens) == 7
    assert 0 < sum(out.has_eos) < 12
    assert out.texts == tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)


def test_modes_are_restored_and_dropout_is_off_while_sampling(tokenizer) -> None:
    model = tiny_lm()
    model.config.attention_dropout = 0.0
    model.train()
    model.model.layers[0].eval()  # a frozen part in eval mode stays so
    ids, mask = padded(PROMPTS)
    batch = {"input_ids": ids, "attention_mask": mask, "prompt": ["a", "b", "c"]}
    sampled = sample_completions(model, tokenizer, batch, 2, seed=3, max_new_tokens=4, stop_ids=[1])
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    model.eval()
    assert sampled.completion_ids == sample_completions(model, tokenizer, batch, 2, seed=3, max_new_tokens=4,
                                                        stop_ids=[1]).completion_ids


def test_a_peft_model_samples_through_its_adapters() -> None:
    base = tiny_lm(scale=0.2)
    plain = run(copy.deepcopy(base), seed=4)
    wrapped = add_adapters(base, LoraSpec(r=4))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    wrapped.eval()
    assert can_decode(wrapped)
    adapted = run(wrapped, seed=4)
    merged = run(copy.deepcopy(wrapped).merge_and_unload(), seed=4)
    assert adapted.tokens == merged.tokens != plain.tokens


# -- the engine ------------------------------------------------------------------------------------------
def test_engine_generate_is_the_generate_path_and_a_model_the_loop_cannot_serve_falls_back(tokenizer, monkeypatch) -> None:
    model = tiny_lm()
    ids, mask = padded(PROMPTS)
    batch = {"input_ids": ids, "attention_mask": mask, "prompt": ["a", "b", "c"]}
    kwargs = dict(max_new_tokens=5, stop_ids=[tokenizer.eos_token_id])
    old = sample_completions(model, tokenizer, batch, 2, seed=9, engine="generate", **kwargs)
    torch.manual_seed(9)
    direct = model.generate(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                            do_sample=True, max_new_tokens=5, pad_token_id=0, eos_token_id=[tokenizer.eos_token_id],
                            top_k=0)
    assert old.completion_ids == [row[ids.shape[1] :].tolist() for row in direct]
    assert torch.equal(sample_with_generate(model, tokenizer, ids, mask, 2, seed=9, temperature=1.0, top_p=1.0,
                                            top_k=0, **kwargs), direct)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    assert can_decode(model) and not can_decode(t5)
    # auto, on a model the loop cannot serve: the generate path, draws included
    monkeypatch.setattr(generation, "can_decode", lambda policy: False)
    assert sample_completions(model, tokenizer, batch, 2, seed=9, **kwargs).completion_ids == old.completion_ids


def test_an_unknown_engine_is_refused_naming_the_key(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"model.init_args.sampling.engine must be auto .* or generate .*got 'fast'"):
        SamplingSpec(engine="fast").validate("model.init_args.sampling")
    assert SamplingSpec().engine == "auto" and SamplingSpec(engine="generate").validate("x").engine == "generate"
    ids, mask = padded(PROMPTS)
    with pytest.raises(ValueError, match="engine must be auto"):
        sample_completions(tiny_lm(), tokenizer, {"input_ids": ids, "attention_mask": mask, "prompt": ["a"] * 3}, 2,
                           seed=0, max_new_tokens=2, stop_ids=[1], engine="vllm")
