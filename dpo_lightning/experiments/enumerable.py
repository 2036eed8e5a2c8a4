"""A completion set small enough to enumerate: one review template of the sentiment task with two
words per sentiment slot, and a causal LM's log-probs over it, in float64.

Every word is a single token of the shipped tokenizer (``data/tokenizer``), so the completions
have the same length and a random tiny model does not favour some for being shorter. The reward
is the sentiment task's own :func:`~dpo_lightning.experiments.sentiment.score`: 0, 1/3, 2/3 or 1.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor

from .sentiment import score

TEMPLATE = " The {p} is {a} and {b}. I {v} it."
SLOTS = {"a": ("sturdy", "flimsy"), "b": ("quiet", "ugly"), "v": ("love", "hate")}


def completions(product: str) -> list[str]:
    """The ``2 x 2 x 2 = 8`` completions of :data:`TEMPLATE` for ``product``, in slot order."""
    return [TEMPLATE.format(p=product, a=a, b=b, v=v) for a, b, v in itertools.product(*SLOTS.values())]


def rewards(texts: list[str]) -> Tensor:
    """``(K,)`` float64 ground-truth sentiment rewards of ``texts``."""
    return torch.tensor([score(t) for t in texts], dtype=torch.float64)


def encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Prompt ids (BOS first) and completion ids (EOS last), as the library's data modules
    tokenize a plain-string row."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompt: str, texts: list[str]) -> Tensor:
    """``(K,)`` float64 ``log pi(y|x)`` of each completion, summed over its tokens (EOS included),
    from a float64 copy of ``model``; not renormalised over the set."""
    model = copy.deepcopy(model).double().eval()
    out = []
    for text in texts:
        prompt_ids, completion_ids = encode(tokenizer, prompt, text)
        ids = torch.tensor([prompt_ids + completion_ids])
        logps = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)  # (T, V)
        positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
        out.append(logps[positions, ids[0, len(prompt_ids):]].sum())
    return torch.stack(out)


def set_logprobs(model, tokenizer, prompt: str, texts: list[str]) -> Tensor:
    """``(K,)`` float64 log-probs of the completions normalised over the set: the model's
    distribution conditioned on answering with one of ``texts``."""
    return torch.log_softmax(sequence_logprobs(model, tokenizer, prompt, texts), dim=-1)
