"""An export from a gathered state dict (FSDP's full state dict: a separate copy of every
tensor) holds the same tensors as an export of the module itself."""

from __future__ import annotations

from safetensors.torch import load_file

from dpo_lightning.export import alias_tied_weights, save_pretrained_atomic
from dpo_lightning.models import load_causal_lm


def gathered(model) -> dict:
    """The model's weights as FSDP's full state dict holds them: each a copy, none sharing
    storage (a fresh dict each time: ``save_pretrained`` empties the one it is given)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_gathered_copy_of_a_tied_head_is_written_once(tmp_path, spec, tokenizer) -> None:
    model = load_causal_lm(spec, tokenizer)  # TINY_CONFIG ties the LM head to the embeddings
    save_pretrained_atomic(model, None, tmp_path / "own")
    save_pretrained_atomic(model, None, tmp_path / "copies", state_dict=gathered(model))
    save_pretrained_atomic(model, None, tmp_path / "aliased", state_dict=alias_tied_weights(gathered(model), model))
    own = load_file(str(tmp_path / "own" / "model.safetensors"))
    assert "lm_head.weight" not in own
    assert "lm_head.weight" in load_file(str(tmp_path / "copies" / "model.safetensors"))  # what the alias fixes
    aliased = load_file(str(tmp_path / "aliased" / "model.safetensors"))
    assert sorted(aliased) == sorted(own) and all(aliased[k].equal(own[k]) for k in own)
