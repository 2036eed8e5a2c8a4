"""dpo-lightning-sample-pairs and dpo-lightning-evaluate: conversational prompts through the chat
template, judges as scorers, and the saved samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY_CONFIG, TOKENIZER_DIR, write_jsonl
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.judges import FunctionJudge
from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer
from dpo_lightning.sampling import encode_prompt, main_evaluate, main_sample_pairs, sample, sample_pairs, sample_prompts

POLICY = str(ROOT / "data" / "tiny-llama")  # ships its tokenizer with a chat template
CHAT = [{"role": "system", "content": "You write reviews."}, {"role": "user", "content": "Review the lamp."}]
PROMPTS = [{"prompt": "Write a short review of the kettle."}, {"prompt": CHAT},
           {"prompt": [{"role": "user", "content": "What do you think of this desk?"}]}]


def with_prompt(prompt, completion) -> float:
    """A (prompt, completion) scorer: length, plus 100 after a conversation."""
    return float(len(completion)) + (100.0 if isinstance(prompt, list) else 0.0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def command(monkeypatch, main, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-command", *args])
    main()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("reference")
    tokenizer = load_tokenizer(ModelSpec(name_or_path=POLICY))
    model = load_causal_lm(ModelSpec(config=dict(TINY_CONFIG), tokenizer=TOKENIZER_DIR, seed=5), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_conversational_prompts_get_the_chat_template_with_the_generation_prompt() -> None:
    tokenizer = load_tokenizer(ModelSpec(name_or_path=POLICY))
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, CHAT) == expected and expected.count(tokenizer.bos_token_id) == 1
    assert encode_prompt(tokenizer, "Review the lamp.") == tokenizer("Review the lamp.")["input_ids"]
    model = load_causal_lm(ModelSpec(name_or_path=POLICY), tokenizer).eval()
    torch.manual_seed(0)
    samples = sample(model, tokenizer, CHAT, 3, 6)
    assert samples.prompt_ids == expected and len(samples.texts) == 3
    assert all(len(c) <= 6 for c in samples.completion_ids)


def test_sample_pairs_with_conversations_saves_its_scored_samples(tmp_path, monkeypatch) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out, saved = tmp_path / "pairs.jsonl", tmp_path / "samples.jsonl"
    command(monkeypatch, main_sample_pairs, "--policy", POLICY, "--prompts", prompts, "--output", str(out),
            "--scorer", "test_sampling_commands:with_prompt", "--samples_per_prompt", "4", "--max_new_tokens", "8",
            "--save_samples", str(saved))
    samples = read_jsonl(saved)
    assert len(samples) == 3 * 4 and [s["prompt"] for s in samples[::4]] == [p["prompt"] for p in PROMPTS]
    for s in samples:
        assert s["score"] == pytest.approx(with_prompt(s["prompt"], s["completion"]))
    pairs = read_jsonl(out)
    assert 1 <= len(pairs) <= 3
    for row in pairs:
        texts = [s for s in samples if s["prompt"] == row["prompt"]]
        best = max(texts, key=lambda s: s["score"])
        if isinstance(row["prompt"], list):  # after a conversation, one assistant message each
            assert row["chosen"] == [{"role": "assistant", "content": best["completion"]}]
            assert row["rejected"][0]["role"] == "assistant" and len(row["rejected"]) == 1
        else:
            assert row["chosen"] == best["completion"]
        assert row["score_chosen"] == pytest.approx(best["score"]) and row["score_chosen"] > row["score_rejected"]
    # the conversational pairs are a dataset the pair data module reads (all rows kept; a dataset
    # holds one kind of row, so they are read apart from the string ones)
    conversations = [r for r in pairs if isinstance(r["prompt"], list)]
    assert conversations
    dm = PreferenceDataModule(train_data=write_jsonl(tmp_path / "chat_pairs.jsonl", conversations), tokenizer=POLICY,
                              max_length=128, batch_size=2)
    dm.setup("fit")
    assert dm.reports["train"].rows_kept == len(conversations)


def test_evaluate_with_conversations_saves_log_ratios(tmp_path, monkeypatch, reference) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result, saved = tmp_path / "result.json", tmp_path / "samples.jsonl"
    command(monkeypatch, main_evaluate, "--policy", POLICY, "--reference", reference, "--prompts", prompts,
            "--judge", "dpo_lightning.judges.FunctionJudge", "--judge.path", "test_sampling_commands:with_prompt",
            "--samples_per_prompt", "3", "--max_new_tokens", "6", "--output", str(result), "--save_samples", str(saved))
    summary = json.loads(result.read_text())
    samples = read_jsonl(saved)
    assert summary["samples"] == len(samples) == 9
    assert set(samples[0]) == {"prompt", "completion", "score", "log_ratio", "logp_policy", "logp_reference"}
    for s in samples:
        assert s["score"] == pytest.approx(with_prompt(s["prompt"], s["completion"]))
        assert s["log_ratio"] == pytest.approx(s["logp_policy"] - s["logp_reference"], abs=1e-9)
    assert summary["kl"] == pytest.approx(sum(s["log_ratio"] for s in samples) / 9)
    assert summary["reward"] == pytest.approx(sum(s["score"] for s in samples) / 9)
    assert any(s["log_ratio"] != 0 for s in samples)
    # the per-sample log-probs are the models' on the prompt's chat-template tokens + the sampled ones
    from dpo_lightning.sampling import completion_logprobs

    tokenizer = load_tokenizer(ModelSpec(name_or_path=POLICY))
    policy = load_causal_lm(ModelSpec(name_or_path=POLICY), tokenizer).eval()
    torch.manual_seed(0)  # the command's seed and batch (256 // 3 prompts): the first prompt's samples again
    ((_, first), *_) = sample_prompts(policy, tokenizer, [p["prompt"] for p in PROMPTS], 3, 6, batch_size=256 // 3)
    logps = completion_logprobs(policy, tokenizer.pad_token_id, first.prompt_ids, first.completion_ids).tolist()
    assert [s["completion"] for s in samples[:3]] == first.texts
    assert [s["logp_policy"] for s in samples[:3]] == pytest.approx(logps, abs=1e-6)


def test_scorer_and_judge_choices(tmp_path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    with pytest.raises(ValueError, match="either --scorer or --judge"):
        sample_pairs(POLICY, prompts, str(tmp_path / "o.jsonl"), scorer="test_sampling_commands:with_prompt",
                     judge=FunctionJudge("test_sampling_commands:with_prompt"))
    with pytest.raises(ValueError, match="--scorer: cannot import"):
        sample_pairs(POLICY, prompts, str(tmp_path / "o.jsonl"), scorer="no_such_module_xyz:score")
    with pytest.raises(ValueError) as info:  # a builtin's signature cannot be read: the fix as this command's flags
        sample_pairs(POLICY, prompts, str(tmp_path / "o.jsonl"), scorer="builtins:max")
    assert str(info.value) == (
        "--scorer 'builtins:max' has an unreadable signature; a judge function takes (completion) or (prompt, "
        "completion). Give it as --judge dpo_lightning.judges.FunctionJudge --judge.path builtins:max "
        "--judge.arguments completion (or prompt_completion)")
    from dpo_lightning.judges import FunctionPairwiseJudge

    out = sample_pairs(POLICY, prompts, str(tmp_path / "pw.jsonl"), judge=FunctionPairwiseJudge("test_online:prefer_longer"),
                       samples_per_prompt=3, max_new_tokens=6, save_samples=str(tmp_path / "pw_samples.jsonl"))
    scores = [s["score"] for s in read_jsonl(tmp_path / "pw_samples.jsonl")]
    assert len(scores) == 3 and sum(scores) == pytest.approx(1.5) and out.exists()  # mean win rates over 3 pairs
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": {"text": "no"}}])
    with pytest.raises(ValueError, match="row 0 has no 'prompt' that is a string or a conversation"):
        sample_pairs(POLICY, bad, str(tmp_path / "o.jsonl"))


def test_sample_prompts_batches_prompts_of_any_length_into_each_prompts_own_samples() -> None:
    tokenizer = load_tokenizer(ModelSpec(name_or_path=POLICY))
    model = load_causal_lm(ModelSpec(name_or_path=POLICY), tokenizer).eval()
    prompts = ["Review the lamp.", CHAT, "Review the blue kettle, please, in a few words.", "Hi.", "Review it."]
    # one prompt a batch is `sample`, prompt by prompt, from the same stream
    torch.manual_seed(4)
    alone = [sample(model, tokenizer, p, 3, 6) for p in prompts]
    torch.manual_seed(4)
    one_by_one = list(sample_prompts(model, tokenizer, prompts, 3, 6, batch_size=1))
    assert [p for p, _ in one_by_one] == prompts
    assert [s.completion_ids for _, s in one_by_one] == [s.completion_ids for s in alone]
    # batches of 2 (prompts of other lengths left-padded together): each prompt its own 3 samples
    torch.manual_seed(4)
    batched = list(sample_prompts(model, tokenizer, prompts, 3, 6, batch_size=2))
    assert [p for p, _ in batched] == prompts
    stop = tokenizer.eos_token_id
    for (prompt, s), single in zip(batched, alone):
        assert s.prompt_ids == single.prompt_ids == encode_prompt(tokenizer, prompt)
        assert len(s.completion_ids) == len(s.texts) == 3
        for ids, text in zip(s.completion_ids, s.texts):
            assert 1 <= len(ids) <= 6 and stop not in ids[:-1]  # cut at the first EOS
            assert text == tokenizer.decode([t for t in ids if t != stop], skip_special_tokens=True)
    with pytest.raises(ValueError, match=r"--batch_size must be a positive integer"):
        next(sample_prompts(model, tokenizer, prompts, 3, 6, batch_size=0))


def failed_command(monkeypatch, capsys, main, *args: str) -> str:
    """Run a console tool expected to fail: its one stderr line (exit status 1, no traceback)."""
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-command", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err  # a progress bar may come before it
    lines = err.strip().splitlines()
    assert info.value.code == 1 and "Traceback" not in err and lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize(("main", "more"), [(main_sample_pairs, []), (main_evaluate, ["--reference", POLICY])])
def test_a_missing_policy_folder_is_one_line_naming_the_option(monkeypatch, capsys, tmp_path, main, more) -> None:
    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1]))
    missing = str(tmp_path / "polcy")
    line = failed_command(monkeypatch, capsys, main, "--policy", missing, *more, "--prompts", prompts,
                          "--output", str(tmp_path / "out.json"))
    assert line.startswith(f"error: --policy: no folder at {missing!r}") and line.endswith("[--debug shows the traceback]")


def test_a_missing_reference_folder_names_the_reference_option(monkeypatch, capsys, tmp_path) -> None:
    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1]))
    line = failed_command(monkeypatch, capsys, main_evaluate, "--policy", POLICY, "--reference", str(tmp_path / "ref"),
                          "--prompts", prompts)
    assert line.startswith(f"error: --reference: no folder at {str(tmp_path / 'ref')!r}")


def test_a_tool_refuses_an_abbreviated_option(monkeypatch, capsys, tmp_path) -> None:
    """``--polic`` is not read as ``--policy``."""
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-sample-pairs", "--polic", POLICY, "--prompts", "p.jsonl",
                                      "--output", str(tmp_path / "out.jsonl")])
    with pytest.raises(SystemExit) as info:
        main_sample_pairs()
    assert info.value.code == 2 and capsys.readouterr().err == (
        f"error: unrecognized arguments: --polic {POLICY}; did you mean --policy?  [--help lists the options]\n")


def test_a_bad_option_value_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["dpo-lightning-evaluate", "--policy", POLICY, "--prompts", "p.jsonl",
                                      "--samples_per_prompt", "abc"])
    with pytest.raises(SystemExit) as info:
        main_evaluate()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith('error: Parser key "samples_per_prompt": Expected a <class \'int\'>. Got value: abc')


def test_the_score_tool_names_its_reward_model_option(monkeypatch, capsys, tmp_path) -> None:
    from dpo_lightning.scoring import main as main_score

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    line = failed_command(monkeypatch, capsys, main_score, "--reward_model", str(tmp_path / "rm"), "--data", data,
                          "--output", str(tmp_path / "scored.jsonl"))
    assert line.startswith(f"error: --reward_model: no folder at {str(tmp_path / 'rm')!r}")


def not_a_number(completion: str) -> str:
    return "high"


@pytest.mark.parametrize(("judge_args", "named"), [
    (["--scorer", "test_sampling_commands:not_a_number"], "--scorer 'test_sampling_commands:not_a_number' returned 'high'"),
    (["--judge", "dpo_lightning.judges.FunctionJudge", "--judge.path", "test_sampling_commands:not_a_number"],
     "--judge.path 'test_sampling_commands:not_a_number' returned 'high'"),
])
def test_a_scorer_error_names_the_option_that_set_it(monkeypatch, capsys, tmp_path, judge_args, named) -> None:
    """The judge names its recipe key (model.init_args.judge.init_args.path); the tools name theirs."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1]))
    line = failed_command(monkeypatch, capsys, main_sample_pairs, "--policy", POLICY, "--prompts", prompts,
                          "--output", str(tmp_path / "pairs.jsonl"), "--max_new_tokens", "2", *judge_args)
    assert named in line and "init_args" not in line


def test_a_judge_set_in_a_config_file_is_named_as_the_judge(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = tmp_path / "tool.yaml"
    config.write_text("judge:\n  class_path: dpo_lightning.judges.FunctionJudge\n"
                      "  init_args:\n    path: test_sampling_commands:not_a_number\n")
    prompts = str(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1]))
    line = failed_command(monkeypatch, capsys, main_sample_pairs, "--config", str(config), "--policy", POLICY,
                          "--prompts", prompts, "--output", str(tmp_path / "pairs.jsonl"), "--max_new_tokens", "2")
    assert "--judge.path 'test_sampling_commands:not_a_number' returned 'high'" in line
