"""Conversational and implicit-prompt rows, BOS/EOS counts per tokenizer kind, template mismatches."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from dpo_lightning.data import PairEncoder, PreferenceDataModule, TokenizationSettings, UnpairedEncoder
from dpo_lightning.data.formats import split_message_prefix, split_text_prefix
from tokenizer_kinds import qwen_like, rewriting_template, shipped, template_without_bos

USER = {"role": "user", "content": "Review the kettle."}
GOOD = {"role": "assistant", "content": "It is great."}
BAD = {"role": "assistant", "content": "It is poor."}
KINDS = {"shipped": shipped, "template_without_bos": template_without_bos, "qwen_like": qwen_like}


def encode(tok, row, has_prompt=True, **settings):
    return PairEncoder(tok, TokenizationSettings(**settings), has_prompt=has_prompt)(row, 0)


def chat_ids(tok, messages, generation_prompt):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_conversation_is_prompt_tokens_plus_completion_tokens_plus_one_eos(kind) -> None:
    tok = KINDS[kind]()
    out = encode(tok, {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]})
    assert out["drop_reason"] == ""
    prompt = chat_ids(tok, [USER], True)
    assert out["prompt_ids"] == prompt
    for key, reply in (("chosen_ids", GOOD), ("rejected_ids", BAD)):
        full = chat_ids(tok, [USER, reply], False)
        assert full[: len(prompt)] == prompt
        sequence = out["prompt_ids"] + out[key]
        assert sequence == full[: len(sequence)]  # exactly what the full conversation tokenizes to
        assert out[key].count(tok.eos_token_id) == 1 and out[key][-1] == tok.eos_token_id
        bos_count = sequence.count(tok.bos_token_id) if tok.bos_token_id is not None else 0
        assert bos_count == (1 if kind == "shipped" else 0)
    if kind == "qwen_like":  # the newline after <|im_end|> is not part of the completion
        assert len(chat_ids(tok, [USER, GOOD], False)) == len(out["prompt_ids"]) + len(out["chosen_ids"]) + 1


@pytest.mark.parametrize("kind", KINDS)
def test_plain_text_bos_and_eos_per_tokenizer_kind(kind) -> None:
    tok = KINDS[kind]()
    out = encode(tok, {"prompt": "Review the kettle.", "chosen": " It is great.", "rejected": " It is poor."})
    expected_prompt = tok("Review the kettle.", add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        assert out["prompt_ids"] == [tok.bos_token_id] + expected_prompt
    else:
        assert out["prompt_ids"] == expected_prompt
    assert out["chosen_ids"] == tok(" It is great.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_multi_turn_with_system_prompt() -> None:
    tok = shipped()
    prompt = [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Which one?"},
              {"role": "user", "content": "The blue one."}]
    out = encode(tok, {"prompt": prompt, "chosen": [GOOD], "rejected": [BAD]})
    assert out["prompt_ids"] == chat_ids(tok, prompt, True)
    full = chat_ids(tok, prompt + [GOOD], False)
    sequence = out["prompt_ids"] + out["chosen_ids"]
    assert full[: len(sequence)] == sequence and tok.decode(full[len(sequence):]).strip() == ""


def test_implicit_prompt_conversation_splits_by_message() -> None:
    tok = shipped()
    explicit = encode(tok, {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]})
    implicit = encode(tok, {"chosen": [USER, GOOD], "rejected": [USER, BAD]}, has_prompt=False)
    assert implicit == explicit
    assert split_message_prefix([USER, GOOD], [USER, BAD]) == ([USER], [GOOD], [BAD])


def test_implicit_prompt_text_splits_at_a_word_boundary() -> None:
    a = "Human: hi\n\nAssistant: I like it"
    b = "Human: hi\n\nAssistant: I loathe it"
    assert split_text_prefix(a, b) == ("Human: hi\n\nAssistant: I", " like it", " loathe it")
    assert split_text_prefix("same start x", "same start y") == ("same start", " x", " y")
    assert split_text_prefix("abc", "abd") == ("", "abc", "abd")
    out = encode(shipped(), {"chosen": a, "rejected": b}, has_prompt=False)
    assert out["drop_reason"] == ""
    assert out["prompt_ids"] == encode(shipped(), {"prompt": "Human: hi\n\nAssistant: I", "chosen": " like it",
                                                   "rejected": " loathe it"})["prompt_ids"]


def test_template_that_rewrites_the_prompt_is_dropped_and_reported(tmp_path) -> None:
    tok = rewriting_template()
    assert encode(tok, {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]})["drop_reason"] == "template_mismatch"
    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}] * 3
    dm = PreferenceDataModule(train_data=write_jsonl(tmp_path / "c.jsonl", rows))
    dm.connect(tok)
    with pytest.raises(ValueError, match="no usable rows"):
        dm.setup("fit")
    assert dm.reports["train"].dropped == {"template_mismatch": 3}


def test_mixed_kinds_and_bad_messages_are_wrong_type() -> None:
    tok = shipped()
    # a string prompt before assistant-only replies is a user turn (see test_data_shapes.py);
    # mixes that cannot be made one kind are wrong_type
    assert encode(tok, {"prompt": "text", "chosen": [GOOD], "rejected": " It is poor."})["drop_reason"] == "wrong_type"
    other_user = {"role": "user", "content": "Another question."}
    assert encode(tok, {"prompt": "text", "chosen": [other_user, GOOD], "rejected": [USER, BAD]})["drop_reason"] == "wrong_type"
    assert encode(tok, {"prompt": [{"role": "user"}], "chosen": [GOOD], "rejected": [BAD]})["drop_reason"] == "wrong_type"
    assert encode(tok, {"prompt": [USER], "chosen": [], "rejected": [BAD]})["drop_reason"] == "wrong_type"
    blank = {"role": "assistant", "content": "  "}
    assert encode(tok, {"prompt": [USER], "chosen": [blank], "rejected": [BAD]})["drop_reason"] == "empty_completion"
    assert encode(tok, {"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, has_prompt=False)["drop_reason"] == "identical_pair"


def test_unpaired_conversation() -> None:
    tok = qwen_like()
    out = UnpairedEncoder(tok, TokenizationSettings())({"prompt": [USER], "completion": [GOOD], "label": False}, 3)
    assert out["prompt_ids"] == chat_ids(tok, [USER], True) and out["label"] is False and out["row_id"] == 3
    assert out["completion_ids"][-1] == tok.eos_token_id


def test_conversational_dataset_end_to_end(tmp_path) -> None:
    rows = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
            {"chosen": None, "prompt": [USER], "rejected": [BAD]}]
    dm = PreferenceDataModule(train_data=write_jsonl(tmp_path / "c.jsonl", rows), batch_size=1)
    tok = shipped()
    tok.pad_token = tok.pad_token or tok.eos_token
    dm.connect(tok)
    dm.setup("fit")
    assert dm.reports["train"].rows_kept == 1 and dm.reports["train"].dropped == {"missing_field": 1}
    batch = next(iter(dm.train_dataloader()))
    n_completion = batch["completion_mask"].sum(1).tolist()
    assert n_completion == [len(dm.train_dataset[0]["chosen_ids"]), len(dm.train_dataset[0]["rejected_ids"])]
