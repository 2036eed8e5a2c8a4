"""Generate the quickstart preference pairs and train the tiny tokenizer shipped in data/.

The task: short product reviews. The preferred response praises the product, the
dispreferred one is the same sentence with negative words. Each response also gets a 1-10
rating from its sentiment words (`score_chosen`, `score_rejected`) for ODPO's offsets. A model learns the preference
from the sentiment words, so held-out pairs (other products, other word combinations) test
whether it generalises. Deterministic: `python scripts/make_quickstart_data.py` rewrites
data/quickstart/*.jsonl and data/tokenizer/ byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = [
    "blender", "kettle", "toaster", "backpack", "jacket", "lamp", "chair", "desk", "camera", "phone",
    "laptop", "keyboard", "mouse", "monitor", "speaker", "headset", "watch", "bicycle", "tent", "stove",
    "pan", "knife", "mug", "bottle", "umbrella", "wallet", "printer", "router", "drill", "vacuum",
    "mattress", "pillow", "blanket", "scarf", "boots", "sofa", "heater", "fan", "charger", "tablet",
]
HELD_OUT_PRODUCTS = ["radio", "oven", "helmet", "stroller", "guitar", "projector"]
POSITIVE = [
    "excellent", "sturdy", "reliable", "wonderful", "comfortable", "great", "solid", "lovely",
    "fantastic", "durable", "quiet", "elegant", "handy", "superb", "pleasant", "brilliant",
]
NEGATIVE = [
    "terrible", "flimsy", "unreliable", "awful", "uncomfortable", "poor", "broken", "ugly",
    "horrible", "fragile", "noisy", "clumsy", "useless", "dreadful", "annoying", "cheap",
]
# Ground-truth strength of each sentiment word, used for the rating columns (ODPO offsets).
STRENGTH = {w: 0.5 + 0.5 * i / (len(POSITIVE) - 1) for i, w in enumerate(POSITIVE)}
STRENGTH.update({w: -0.5 - 0.5 * i / (len(NEGATIVE) - 1) for i, w in enumerate(NEGATIVE)})
POS_VERBS = ["love", "recommend", "enjoy", "adore"]
NEG_VERBS = ["hate", "regret", "return", "dislike"]
PROMPTS = [
    "Write a short review of the {p}.",
    "Review the {p} you bought last month.",
    "What do you think of this {p}?",
    "Describe your experience with the {p}.",
]
TEMPLATES = [
    " The {p} is {a} and {b}. I {v} it.",
    " This {p} feels {a}. Honestly it is {b}, and I {v} it.",
    " I {v} this {p}: it is {a}, {b} and worth talking about.",
    " After a month the {p} is still {a}. Very {b}.",
]


def rating(text: str) -> float:
    """A 1-10 rating from the sentiment words in ``text`` (the task's ground truth)."""
    words = [w.strip(".,:;") for w in text.split()]
    strengths = [STRENGTH[w] for w in words if w in STRENGTH]
    return round(5.5 + 2.25 * sum(strengths), 3)


def make_pair(rng: random.Random, product: str) -> dict[str, object]:
    prompt = rng.choice(PROMPTS).format(p=product)
    template = rng.choice(TEMPLATES)
    i, j = rng.sample(range(len(POSITIVE)), 2)
    v = rng.randrange(len(POS_VERBS))
    chosen = template.format(p=product, a=POSITIVE[i], b=POSITIVE[j], v=POS_VERBS[v])
    rejected = template.format(p=product, a=NEGATIVE[i], b=NEGATIVE[j], v=NEG_VERBS[v])
    if rng.random() < 0.5:  # vary which sentiment word pairs line up
        k, m = rng.sample(range(len(NEGATIVE)), 2)
        rejected = template.format(p=product, a=NEGATIVE[k], b=NEGATIVE[m], v=NEG_VERBS[v])
    return {
        "prompt": prompt, "chosen": chosen, "rejected": rejected,
        "score_chosen": rating(chosen), "score_rejected": rating(rejected),
    }


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 512) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1024,
    )
    fast.chat_template = (
        "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    fast.save_pretrained(out_dir)


def main() -> None:
    rng = random.Random(1234)
    train = [make_pair(rng, rng.choice(PRODUCTS)) for _ in range(1200)]
    val = [make_pair(rng, rng.choice(PRODUCTS + HELD_OUT_PRODUCTS)) for _ in range(200)]
    write_jsonl(ROOT / "data/quickstart/train.jsonl", train)
    write_jsonl(ROOT / "data/quickstart/val.jsonl", val)
    texts = [str(r[k]) for r in train + val for k in ("prompt", "chosen", "rejected")]
    texts += ["<|user|>\n", "<|assistant|>\n", "<|system|>\n"]
    train_tokenizer(texts, ROOT / "data/tokenizer")
    print(f"wrote {len(train)} train and {len(val)} val pairs and data/tokenizer/")


if __name__ == "__main__":
    main()
