"""The generation pipeline (dpo_lightning/generation.py): the sampling spec, the one judge
dispatch and its refusals (non-finite scores, errors inside a judge), and what a run does when
no step had a pair."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning as L

import pytest
import torch

from conftest import ROOT, tiny_spec
from dpo_lightning.cli import main
from dpo_lightning.generation import (
    SamplingSpec, Samples, form_pairs, judge_and_pair, judge_samples, pair_row, text_pair_rows,
)
from dpo_lightning.judges import FunctionJudge, FunctionPairwiseJudge, Judge, JudgeError, PairwiseJudge
from dpo_lightning.data import PromptDataModule
from dpo_lightning.modules import OnlinePreferenceModule

PROMPTS = ["Review the lamp.", "Review the desk.", "Review the tent."]


def samples(k: int = 2, row_ids: list[int] | None = None) -> Samples:
    """``k`` made-up completions for each of the three prompts; the last one without an EOS."""
    texts = [f" text {i} {'x' * i}" for i in range(3 * k)]
    has_eos = [True] * (3 * k - 1) + [False]
    return Samples([[1]] * 3, [[5]] * (3 * k), has_eos, texts, list(PROMPTS), k, row_ids)


class NanOnDesk(Judge):
    """A judge that returns NaN for every completion of the desk prompt."""

    def score(self, prompts, completions):
        return torch.tensor([float("nan") if "desk" in p else float(len(c)) for p, c in zip(prompts, completions)])

    def __repr__(self) -> str:
        return "NanOnDesk()"


class Broken(Judge):
    def score(self, prompts, completions):
        raise KeyError("reward head")

    def __repr__(self) -> str:
        return "Broken()"


class TiesFirst(Judge):
    """Every sample the same score in its first call, then the completion's length."""

    calls = 0

    def score(self, prompts, completions):
        self.calls += 1
        return torch.tensor([1.0 if self.calls == 1 else float(len(c)) for c in completions])


class InfPairwise(PairwiseJudge):
    def prefer(self, prompts, first, second):
        return torch.tensor([float("inf") if "tent" in p else 0.5 for p in prompts])

    def __repr__(self) -> str:
        return "InfPairwise()"


def raises_on_tent(prompt, completion):  # importable as test_generation:raises_on_tent
    if "tent" in str(prompt):
        raise ZeroDivisionError("division by zero")
    return float(len(completion))


def raises_always(prompt, completion):
    return 1.0 / 0.0


def nan_score(completion):
    return float("nan")


def always_same(completion):
    return 1.0


# -- the spec -------------------------------------------------------------------------------------------
def test_sampling_spec_errors_name_the_recipe_key() -> None:
    with pytest.raises(ValueError, match=r"^data.init_args.sampling.top_p must be in \(0, 1\], got 1.5"):
        SamplingSpec(top_p=1.5).validate("data.init_args.sampling")
    with pytest.raises(ValueError, match=r"^model.init_args.sampling.missing_eos_penalty must be a finite number"):
        SamplingSpec(missing_eos_penalty=float("inf")).validate("model.init_args.sampling")
    assert SamplingSpec(num_samples=4, pairs="all").pairs_per_prompt() == 6
    assert SamplingSpec(num_samples=4).pairs_per_prompt() == 1


def test_sampling_settings_given_on_their_own_point_to_the_sampling_block() -> None:
    with pytest.raises(TypeError, match=r"model.init_args.max_new_tokens is a sampling setting: give it as "
                                        r"model.init_args.sampling.max_new_tokens"):
        OnlinePreferenceModule(model=tiny_spec(), judge=FunctionJudge("test_generation:always_same"), max_new_tokens=4)


def test_the_seed_is_the_lightning_seed_unless_given(monkeypatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "17")
    assert SamplingSpec().base_seed() == 17 and SamplingSpec(seed=3).base_seed() == 3
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert SamplingSpec().base_seed() == 0


# -- the dispatch ----------------------------------------------------------------------------------------
def test_dispatch_subtracts_the_missing_eos_penalty_from_pointwise_scores() -> None:
    two = Samples([[1]], [[5], [5]], [True, False], [" ab", " abcd"], ["Review the lamp."], 2)
    got = judge_samples(FunctionJudge("test_generation:raises_on_tent"), two, missing_eos_penalty=0.5)
    assert got.tolist() == [3.0, 4.5]


def test_pairwise_scores_are_mean_win_rates_through_the_dispatch() -> None:
    judge = FunctionPairwiseJudge("test_online:prefer_longer")
    one = Samples([[1]], [[5]] * 3, [True] * 3, ["a", "bbb", "cc"], ["p"], 3)
    assert judge_samples(judge, one).tolist() == [0.0, 1.0, 0.5]


def test_non_finite_score_names_the_judge_the_prompt_and_the_value() -> None:
    with pytest.raises(JudgeError) as err:
        judge_samples(NanOnDesk(), samples(k=2, row_ids=[10, 11, 12]))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("judge NanOnDesk() gave the non-finite value nan on prompt 1 (data row 11) 'Review the desk.'")
    assert "(2 of 6 values non-finite)" in message


def test_non_finite_pairwise_probability_is_refused_the_same_way() -> None:
    with pytest.raises(JudgeError, match=r"^judge InfPairwise\(\) gave the non-finite value inf on prompt 2 'Review the tent.'"):
        judge_samples(InfPairwise(), samples(k=2))


def test_an_exception_inside_a_judge_is_one_line_naming_judge_and_batch() -> None:
    with pytest.raises(JudgeError) as err:
        judge_samples(Broken(), samples(k=2, row_ids=[4, 5, 6]))
    assert str(err.value) == "judge Broken() failed on prompts 0-2 of this batch (data rows [4, 5, 6]): KeyError: 'reward head'"
    assert isinstance(err.value.__cause__, KeyError)


def test_an_exception_inside_a_function_judge_names_the_prompt_it_failed_on() -> None:
    judge = FunctionJudge("test_generation:raises_on_tent")
    with pytest.raises(JudgeError) as err:
        judge_samples(judge, samples(k=2))
    message = str(err.value)
    assert message.startswith("judge FunctionJudge('test_generation:raises_on_tent', arguments='prompt_completion') "
                              "failed on prompt 2 'Review the tent.': ")
    assert "raised ZeroDivisionError: division by zero for completion ' text 4 xxxx'" in message


# -- pairs -------------------------------------------------------------------------------------------------
def test_judge_and_pair_counts_ties_and_writes_text_rows() -> None:
    judged = judge_and_pair(FunctionJudge("test_generation:always_same"), samples(k=2), SamplingSpec())
    assert judged.pairs == [] and judged.ties == 3
    lengths = judge_and_pair(FunctionJudge("test_online:with_prompt"), samples(k=2), SamplingSpec(pairs="all"))
    assert lengths.pairs == form_pairs(lengths.scores.view(3, 2), "all")[0] == [(0, 1, 0), (1, 1, 0), (2, 1, 0)]
    rows = text_pair_rows(lengths)
    assert rows[0] == pair_row("Review the lamp.", " text 1 x", " text 0 ", 109.0, 108.0)
    assert [r["score_chosen"] - r["score_rejected"] for r in rows] == [1.0, 1.0, 1.0]


# -- runs --------------------------------------------------------------------------------------------------
def online_cli(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "dpo-lightning", "fit", "--config", str(ROOT / "recipes" / "base.yaml"),
        "--config", str(ROOT / "recipes" / "online_dpo.yaml"),
        "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(tmp_path / "model"),
        "--data.init_args.batch_size", "4", "--data.init_args.max_rows", "4",
        "--model.init_args.sampling.max_new_tokens", "4", *extra,
    ]


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("test_generation:nan_score", r"error: judge FunctionJudge\('test_generation:nan_score'.* failed on prompt 0 "
                                      r"\(data row \d+\) .*returned nan for completion .*scores must be finite"),
        ("test_generation:raises_always", r"error: judge FunctionJudge\('test_generation:raises_always'.* failed on "
                                          r"prompt 0 \(data row \d+\) .*raised ZeroDivisionError: float division by zero"),
    ],
)
def test_a_failing_judge_ends_an_online_run_in_one_line(tmp_path, monkeypatch, capsys, function, expected) -> None:
    monkeypatch.setattr(sys, "argv", online_cli(tmp_path, "--model.init_args.judge.init_args.path", function))
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert re.search(expected, err[-1]), err[-1]
    assert not (tmp_path / "model").exists()


def test_an_online_run_whose_every_step_was_skipped_fails_without_exporting(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", online_cli(tmp_path, "--model.init_args.judge.init_args.path",
                                                "test_generation:always_same"))
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert "error: every optimizer step (1 of 1) was skipped" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_a_step_skipped_for_ties_is_counted_and_the_run_goes_on() -> None:
    module = OnlinePreferenceModule(model=tiny_spec(), judge=TiesFirst(), sampling=SamplingSpec(max_new_tokens=4),
                                    optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    data = PromptDataModule(train_data=[{"prompt": p} for p in PROMPTS * 2], max_length=64, batch_size=3)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and module.skipped_steps == 1
    assert trainer.callback_metrics["train/online/skipped_steps"].item() == 1.0


def test_an_iterative_round_refuses_a_non_finite_judge(tmp_path) -> None:
    from dpo_lightning.iterative import IterativePairsDataModule
    from dpo_lightning.modules import IterativePreferenceModule

    module = IterativePreferenceModule(model=tiny_spec())
    data = IterativePairsDataModule(train_data=[{"prompt": p} for p in PROMPTS], judge=NanOnDesk(), max_length=64,
                                    sampling=SamplingSpec(num_samples=2, max_new_tokens=4), group_by_length=False)
    data.connect(module.tokenizer, module.data_requirements)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(JudgeError, match=r"^judge NanOnDesk\(\) gave the non-finite value nan on prompt 1 \(data row 1\) "
                                         r"'Review the desk.'"):
        trainer.fit(module, data)
