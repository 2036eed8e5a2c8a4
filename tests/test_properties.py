"""Property: any row either tokenizes to a valid example or gets a known drop reason; never a crash."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dpo_lightning.data import DROP_REASONS, PairEncoder, TokenizationSettings, UnpairedEncoder
from tokenizer_kinds import qwen_like, shipped

TOKENIZERS = {"shipped": shipped(), "qwen_like": qwen_like()}
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(["", " ", "<s>", "</s>", "a</s></s>", "x<s>", "<s><s>y"])
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": text})
conversation = st.lists(message, min_size=0, max_size=3)
junk = st.none() | st.integers() | st.floats(allow_nan=True) | st.booleans() | st.lists(st.integers(), max_size=2)
field = text | conversation | junk


def check_valid(
    out: dict, tok, cfg: TokenizationSettings, completion_keys: tuple[str, ...], max_turns: int = 1,
    eos_in_content: bool = False,
) -> None:
    """``max_turns``: the most messages a completion can hold (a template whose end-of-turn token
    is the EOS ends each of them with one); plain text holds one EOS."""
    if out["drop_reason"]:
        assert out["drop_reason"] in DROP_REASONS
        return
    assert out["prompt_ids"], "a kept row has a prompt"
    for key in completion_keys:
        ids = out[key]
        assert ids and len(out["prompt_ids"]) + len(ids) <= cfg.max_length
        assert ids.count(tok.eos_token_id) <= max(max_turns, 1)
        if not eos_in_content:
            assert all(not (a == b == tok.eos_token_id) for a, b in zip(ids, ids[1:])), "EOS doubled"
        untruncated = len(out["prompt_ids"]) + len(ids) < cfg.max_length
        if untruncated:
            assert ids[-1] == tok.eos_token_id
    bos = tok.bos_token_id
    if bos is not None and len(out["prompt_ids"]) > 1:
        assert out["prompt_ids"][:2] != [bos, bos], "BOS doubled at the start"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=field, chosen=field, rejected=field, has_prompt=st.booleans(),
    kind=st.sampled_from(sorted(TOKENIZERS)), max_length=st.integers(2, 40),
    max_prompt_length=st.none() | st.integers(1, 10), mode=st.sampled_from(["keep_end", "keep_start"]),
)
@example(prompt="x<s>", chosen=" a", rejected=" b", has_prompt=True, kind="shipped", max_length=10,
         max_prompt_length=2, mode="keep_end")
@example(prompt="<s><s>y", chosen=" a", rejected=" b", has_prompt=True, kind="shipped", max_length=10,
         max_prompt_length=None, mode="keep_end")
def test_pair_rows(prompt, chosen, rejected, has_prompt, kind, max_length, max_prompt_length, mode) -> None:
    if max_prompt_length is not None and max_prompt_length >= max_length:
        max_prompt_length = max_length - 1
    tok = TOKENIZERS[kind]
    cfg = TokenizationSettings(max_length, max_prompt_length, mode)
    row = {"chosen": chosen, "rejected": rejected} | ({"prompt": prompt} if has_prompt else {})
    out = PairEncoder(tok, cfg, has_prompt=has_prompt)(row, 0)
    turns = max(len(v) if isinstance(v, list) else 1 for v in (chosen, rejected))
    # conversations go through the chat template as text, so an EOS written inside a message's
    # content is an EOS token there too (as with apply_chat_template): count those as well
    turns += sum(m.get("content", "").count(tok.eos_token) for v in (chosen, rejected) if isinstance(v, list)
                 for m in v if isinstance(m, dict) and isinstance(m.get("content"), str))
    check_valid(out, tok, cfg, ("chosen_ids", "rejected_ids"), max_turns=turns,
                eos_in_content=turns > max(len(v) if isinstance(v, list) else 1 for v in (chosen, rejected)))
    if max_prompt_length is not None and not out["drop_reason"]:
        assert len(out["prompt_ids"]) <= max_prompt_length


@settings(max_examples=100, deadline=None)
@given(prompt=field, completion=field, label=st.booleans() | junk, kind=st.sampled_from(sorted(TOKENIZERS)))
def test_unpaired_rows(prompt, completion, label, kind) -> None:
    tok = TOKENIZERS[kind]
    cfg = TokenizationSettings(32)
    out = UnpairedEncoder(tok, cfg)({"prompt": prompt, "completion": completion, "label": label}, 0)
    check_valid(out, tok, cfg, ("completion_ids",), max_turns=len(completion) if isinstance(completion, list) else 1)
