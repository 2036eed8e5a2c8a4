"""The bad-input suite: malformed datasets and configs, each with the error it must give.

Every message names the row or the config key and says how to fix it; none is a raw
traceback from inside torch or datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR, quickstart_rows, tiny_recipe, tiny_spec, write_jsonl, write_recipe
from dpo_lightning.cli import run
from dpo_lightning.contract import DataRequirements
from dpo_lightning.data import PreferenceDataModule, UnpairedDataModule
from dpo_lightning.losses import (
    BradleyTerryLoss, DPOLoss, IPOLoss, KTOLoss, ODPOLoss, SimPOLoss, WithChosenNLL,
)
from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer
from dpo_lightning.modules import PreferenceModule, ReferenceSpec
from dpo_lightning.optim import WarmupDecayLR

GOOD = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in quickstart_rows(6)]
SCORED = [{**r, "score_chosen": 2.0, "score_rejected": 1.0} for r in GOOD]
CONFIG = tiny_spec().config


def data_setup(tmp_path: Path, rows: list, module=PreferenceDataModule, scores=(), **kwargs):
    """Set up a data module on ``rows`` written as jsonl; returns it."""
    def go():
        dm = module(train_data=write_jsonl(tmp_path / "d.jsonl", rows), tokenizer=TOKENIZER_DIR, **kwargs)
        dm.connect(load_tokenizer(tiny_spec()), DataRequirements(dm.layout, tuple(scores)))
        dm.setup("fit")
        return dm
    return go


def strict_row(tmp_path, bad: dict, **kwargs):
    return data_setup(tmp_path, GOOD[:2] + [bad] + GOOD[2:], strict=True, **kwargs)


def non_utf8(tmp_path: Path):
    def go():
        path = tmp_path / "latin1.jsonl"
        path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n')
        PreferenceDataModule(train_data=str(path), tokenizer=TOKENIZER_DIR).setup("fit")
    return go


def conversations_without_template(tmp_path: Path):
    def go():
        rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]}]
        dm = PreferenceDataModule(train_data=write_jsonl(tmp_path / "c.jsonl", rows))
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        tokenizer.chat_template = None
        dm.connect(tokenizer)
        dm.setup("fit")
    return go


def tokenizer_without(tmp_path: Path, *tokens: str):
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for name in tokens:
        setattr(tok, name, None)
    tok.save_pretrained(tmp_path / "tok")
    return lambda: load_tokenizer(ModelSpec(config=CONFIG, tokenizer=str(tmp_path / "tok")))


def cli_with(tmp_path: Path, pair_files, *extra: str, **model_args):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, *pair_files, **model_args))
    return lambda: run(["fit", "--config", recipe, *extra])


def corrupt_checkpoint(tmp_path: Path, pair_files):
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    return cli_with(tmp_path, pair_files, "--ckpt_path", str(tmp_path / "bad.ckpt"))


def reference_with_other_vocab(tmp_path: Path):
    def go():
        other = load_causal_lm(ModelSpec(config={**CONFIG, "vocab_size": 600}, tokenizer=TOKENIZER_DIR))
        other.save_pretrained(tmp_path / "ref")
        PreferenceModule(model=tiny_spec(), reference=ReferenceSpec(model=ModelSpec(name_or_path=str(tmp_path / "ref"))))
    return go


def export_exists(tmp_path, pair_files):
    (tmp_path / "export").mkdir()
    return cli_with(tmp_path, pair_files)


CASES = {
    # --- datasets -------------------------------------------------------------------------
    "missing column": (lambda t, p: data_setup(t, [{"prompt": "p", "answer": " a", "rejected": " b"}]),
                       ValueError, r"data.init_args.train_data: column\(s\) \['chosen'\] missing.*rename"),
    "wrong type": (lambda t, p: strict_row(t, {"prompt": "p", "chosen": 5, "rejected": " b"}),
                   ValueError, r"row 2 is unusable \(wrong_type\).*strict: false"),
    "empty string": (lambda t, p: strict_row(t, {"prompt": "p", "chosen": "", "rejected": " b"}),
                     ValueError, r"row 2 is unusable \(empty_completion\)"),
    "null field": (lambda t, p: strict_row(t, {"prompt": None, "chosen": " a", "rejected": " b"}),
                   ValueError, r"row 2 is unusable \(missing_field\)"),
    "chosen identical to rejected": (lambda t, p: strict_row(t, {"prompt": "p", "chosen": " x", "rejected": " x"}),
                                     ValueError, r"row 2 is unusable \(identical_pair\)"),
    "prompt longer than max_length": (lambda t, p: strict_row(t, {"prompt": "word " * 300, "chosen": " a", "rejected": " b"},
                                                              max_length=64), ValueError, r"row 2 is unusable \(too_long\)"),
    "non-UTF-8 bytes": (lambda t, p: non_utf8(t), ValueError, r"line 2 is not valid UTF-8 \(byte 0xe9.*iconv"),
    "every row unusable": (lambda t, p: data_setup(t, [{"prompt": "p", "chosen": " x", "rejected": " x"}] * 3),
                           ValueError, r"data.init_args.train_data: no usable rows left"),
    "missing data file": (lambda t, p: (lambda: PreferenceDataModule(train_data=str(t / "nope.jsonl"), tokenizer=TOKENIZER_DIR).setup("fit")),
                          FileNotFoundError, r"data.init_args.train_data: no file matches"),
    "unknown file kind": (lambda t, p: (lambda: (t / "d.txt").write_text("x") and
                                        PreferenceDataModule(train_data=str(t / "d.txt"), tokenizer=TOKENIZER_DIR).setup("fit")),
                          ValueError, r"data.init_args.train_data: files must all be .json/.jsonl, .parquet or .csv"),
    "score that is not a number": (lambda t, p: data_setup(t, SCORED[:2] + [{**GOOD[2], "score_chosen": "high", "score_rejected": 1.0}],
                                                           strict=True, scores=("score_chosen", "score_rejected")),
                                   ValueError, r"row 2 is unusable \(wrong_type\)"),
    "null score": (lambda t, p: data_setup(t, SCORED[:3] + [{**GOOD[3], "score_chosen": None, "score_rejected": 1.0}],
                                           strict=True, scores=("score_chosen", "score_rejected")),
                   ValueError, r"row 3 is unusable \(missing_field\)"),
    "ODPO without scores": (lambda t, p: data_setup(t, GOOD, scores=("score_chosen", "score_rejected")),
                            ValueError, r"\['score_chosen', 'score_rejected'\] missing.*add the scores"),
    "KTO with one class": (lambda t, p: data_setup(t, [{"prompt": "p", "completion": f" c{i}", "label": True} for i in range(4)],
                                                   module=UnpairedDataModule, batch_size=2),
                           ValueError, r"only desirable; KTO needs both labels"),
    "KTO batch of one": (lambda t, p: (lambda: UnpairedDataModule(train_data="x.jsonl", batch_size=1)),
                         ValueError, r"data.init_args.batch_size and data.init_args.eval_batch_size must be >= 2"),
    "conversations without chat template": (lambda t, p: conversations_without_template(t),
                                            ValueError, r"chat template; set model.tokenizer"),
    "val_fraction out of range": (lambda t, p: (lambda: PreferenceDataModule(train_data="x", val_fraction=1.5)),
                                  ValueError, r"data.init_args.val_fraction must be in \(0, 1\)"),
    "val_data and val_fraction": (lambda t, p: (lambda: PreferenceDataModule(train_data="x", val_data="y", val_fraction=0.1)),
                                  ValueError, r"either val_data or val_fraction"),
    "max_length too small": (lambda t, p: (lambda: PreferenceDataModule(train_data="x", max_length=1)),
                             ValueError, r"data.init_args.max_length must be >= 2"),
    "max_prompt_length not below max_length": (lambda t, p: (lambda: PreferenceDataModule(train_data="x", max_length=8, max_prompt_length=8)),
                                               ValueError, r"data.init_args.max_prompt_length must be in \[1, max_length=8\)"),
    "bad truncation mode": (lambda t, p: (lambda: PreferenceDataModule(train_data="x", truncation_mode="middle")),
                            ValueError, r"data.init_args.truncation_mode must be"),
    "batch_size zero": (lambda t, p: (lambda: PreferenceDataModule(train_data="x", batch_size=0)),
                        ValueError, r"data.init_args.batch_size must be >= 1"),
    # --- losses -----------------------------------------------------------------------------
    "beta zero": (lambda t, p: (lambda: DPOLoss(beta=0)), ValueError, r"loss.init_args.beta must be > 0"),
    "beta negative (IPO)": (lambda t, p: (lambda: IPOLoss(beta=-0.1)), ValueError, r"loss.init_args.beta must be > 0"),
    "label_smoothing 0.5": (lambda t, p: (lambda: DPOLoss(label_smoothing=0.5)), ValueError, r"label_smoothing must be in \[0.0, 0.5\)"),
    "label_smoothing negative": (lambda t, p: (lambda: DPOLoss(label_smoothing=-0.1)), ValueError, r"label_smoothing must be in"),
    "ODPO alpha negative": (lambda t, p: (lambda: ODPOLoss(alpha=-1)), ValueError, r"loss.init_args.alpha must be >= 0"),
    "ODPO unknown offset": (lambda t, p: (lambda: ODPOLoss(offset_fn="sqrt")), ValueError, r"offset_fn must be 'log', 'log_ratio', 'identity'"),
    "SimPO gamma negative": (lambda t, p: (lambda: SimPOLoss(gamma=-1)), ValueError, r"loss.init_args.gamma must be >= 0"),
    "NLL around an unpaired loss": (lambda t, p: (lambda: WithChosenNLL(KTOLoss())), ValueError, r"must be a pairwise loss"),
    "KTO weight zero": (lambda t, p: (lambda: KTOLoss(desirable_weight=0)), ValueError, r"desirable_weight must be > 0"),
    "BT centering negative": (lambda t, p: (lambda: BradleyTerryLoss(center_rewards_coefficient=-1)), ValueError,
                              r"center_rewards_coefficient must be >= 0"),
    "unknown loss class_path": (lambda t, p: cli_with(t, p, loss={"class_path": "dpo_lightning.losses.NoSuchLoss"}),
                                SystemExit, None),
    # --- models, optimisation, files ----------------------------------------------------------
    "model with name and config": (lambda t, p: (lambda: ModelSpec(name_or_path="a/b", config=CONFIG).validate()),
                                   ValueError, r"model: set exactly one of `name_or_path`"),
    "model with neither": (lambda t, p: (lambda: ModelSpec().validate()), ValueError, r"set exactly one"),
    "bad dtype": (lambda t, p: (lambda: ModelSpec(name_or_path="a/b", dtype="fp8").validate()), ValueError, r"model.dtype must be one of"),
    "config without model_type": (lambda t, p: (lambda: load_causal_lm(ModelSpec(config={"hidden_size": 8}, tokenizer=TOKENIZER_DIR))),
                                  ValueError, r"model.config needs `model_type`"),
    "config without tokenizer": (lambda t, p: (lambda: ModelSpec(config=CONFIG).validate()), ValueError, r"model.tokenizer is required"),
    "missing model path": (lambda t, p: (lambda: load_causal_lm(ModelSpec(name_or_path=str(t / "no" / "model")))),
                           FileNotFoundError, r"model.name_or_path: no folder at"),
    "tokenizer without pad or eos": (lambda t, p: tokenizer_without(t, "pad_token", "eos_token"), ValueError,
                                     r"neither a pad nor an eos token"),
    "reference with another vocabulary": (lambda t, p: reference_with_other_vocab(t), ValueError, r"vocab size 600 != policy's"),
    "corrupt checkpoint": (lambda t, p: corrupt_checkpoint(t, p), ValueError, r"--ckpt_path .* is not a readable checkpoint"),
    "export directory exists": (lambda t, p: export_exists(t, p), FileExistsError, r"overwrite_export: true"),
    "bad on_nonfinite": (lambda t, p: (lambda: PreferenceModule(model=tiny_spec(), on_nonfinite="ignore")), ValueError,
                         r"model.init_args.on_nonfinite must be 'stop' or 'skip'"),
    "bad scheduler decay": (lambda t, p: (lambda: WarmupDecayLR(__import__("torch").optim.SGD([__import__("torch").zeros(1, requires_grad=True)], lr=1), decay="exp")),
                            ValueError, r"model.init_args.scheduler.init_args.decay must be"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_its_error(case, tmp_path, pair_files, capsys) -> None:
    make, error, pattern = CASES[case]
    trigger = make(tmp_path, pair_files)
    with pytest.raises(error) as info:
        trigger()
    if error is SystemExit:  # a config the parser rejects: the message names the bad value
        assert info.value.code != 0
        assert "NoSuchLoss" in capsys.readouterr().err
    else:
        assert pattern is not None
        message = str(info.value)
        assert __import__("re").search(pattern, message, flags=__import__("re").S), message


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path) -> None:
    tok = tokenizer_without(tmp_path, "pad_token")()
    assert tok.pad_token == tok.eos_token == "</s>"
