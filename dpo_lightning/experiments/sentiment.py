"""A toy review language with a ground-truth sentiment reward that needs no model.

Reviews are short templated sentences about products with two adjectives and a verb; each
slot's word is drawn from a positive or a negative list. :func:`score` is the ground truth:
the share of sentiment words that are positive, in [0, 1] (0.5 when there are none).
Prompts: 8 phrasings x 20 products; a quarter of those 160 (:func:`is_held_out`) are kept for
evaluation and never appear in training data.
"""

from __future__ import annotations

import random
import re

PRODUCTS = [
    "blender", "kettle", "toaster", "backpack", "jacket", "lamp", "chair", "desk", "camera", "phone",
    "laptop", "keyboard", "mouse", "monitor", "speaker", "headset", "watch", "bicycle", "tent", "stove",
]
POSITIVE = ["excellent", "sturdy", "reliable", "wonderful", "comfortable", "great", "solid", "lovely",
            "fantastic", "durable", "quiet", "elegant", "handy", "superb", "pleasant", "brilliant",
            "love", "recommend", "enjoy", "adore"]
NEGATIVE = ["terrible", "flimsy", "unreliable", "awful", "uncomfortable", "poor", "broken", "ugly",
            "horrible", "fragile", "noisy", "clumsy", "useless", "dreadful", "annoying", "cheap",
            "hate", "regret", "return", "dislike"]
ADJ_POS, ADJ_NEG = POSITIVE[:16], NEGATIVE[:16]
VERB_POS, VERB_NEG = POSITIVE[16:], NEGATIVE[16:]
PROMPTS = ["Write a short review of the {p}.", "Review the {p} you bought last month.",
           "What do you think of this {p}?", "Describe your experience with the {p}.",
           "How would you rate the {p}?", "Tell me about the {p} you own.",
           "Give your honest opinion of the {p}.", "Share a few words on the new {p}."]
TEMPLATES = [" The {p} is {a} and {b}. I {v} it.", " This {p} feels {a}. Honestly it is {b}, and I {v} it.",
             " I {v} this {p}: it is {a}, {b} and worth talking about.", " After a month the {p} is still {a}. Very {b}."]
_WORD = re.compile(r"[a-z]+")
_POS, _NEG = set(POSITIVE), set(NEGATIVE)


def score(text: str) -> float:
    """Ground-truth sentiment of ``text`` in [0, 1]: positive / (positive + negative) words."""
    words = _WORD.findall(text.lower())
    pos = sum(w in _POS for w in words)
    neg = sum(w in _NEG for w in words)
    return 0.5 if pos + neg == 0 else pos / (pos + neg)


def review(rng: random.Random, product: str) -> str:
    """One review; each sentiment slot is positive or negative with probability 1/2."""
    def pick(pos: list[str], neg: list[str]) -> str:
        return rng.choice(pos if rng.random() < 0.5 else neg)

    return rng.choice(TEMPLATES).format(p=product, a=pick(ADJ_POS, ADJ_NEG), b=pick(ADJ_POS, ADJ_NEG),
                                        v=pick(VERB_POS, VERB_NEG))


def is_held_out(phrasing: int, product: int) -> bool:
    """Whether the prompt ``PROMPTS[phrasing]`` about ``PRODUCTS[product]`` is an evaluation prompt.

    A quarter of the 8 x 20 (phrasing, product) pairs, spread so that every phrasing and every
    product also appears in training: 40 evaluation prompts that no SFT row and no preference
    prompt ever shows."""
    return (phrasing + 3 * product) % 4 == 0


def training_prompt(rng: random.Random, product: str) -> str:
    """A prompt about ``product`` in one of the phrasings not held out for it."""
    j = PRODUCTS.index(product)
    return rng.choice([p for i, p in enumerate(PROMPTS) if not is_held_out(i, j)]).format(p=product)


def held_out_prompts() -> list[str]:
    """The 40 evaluation prompts, each once, in a fixed order (by product, then phrasing)."""
    return [p.format(p=product) for j, product in enumerate(PRODUCTS) for i, p in enumerate(PROMPTS) if is_held_out(i, j)]


def sft_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt / completion rows of mixed sentiment for supervised fine-tuning (training prompts only)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        product = rng.choice(PRODUCTS)
        rows.append({"prompt": training_prompt(rng, product), "completion": review(rng, product)})
    return rows


def prompt_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` training prompts (no completions), for sampling pairs or online training."""
    rng = random.Random(seed)
    return [{"prompt": training_prompt(rng, rng.choice(PRODUCTS))} for _ in range(n)]


def eval_rows() -> list[dict[str, str]]:
    """The held-out evaluation prompts, one row each."""
    return [{"prompt": p} for p in held_out_prompts()]
