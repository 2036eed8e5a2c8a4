"""Write the tiny Llama that the CPU recipes start from to data/tiny-llama/.

    .venv/bin/python scripts/make_tiny_model.py                    # rewrites data/tiny-llama/
    .venv/bin/python scripts/make_tiny_model.py --output /tmp/tiny # somewhere else

The model is the one recipes/quickstart.yaml used to build from scratch with `config:`: a Llama
with hidden_size 64, intermediate_size 128, 2 layers, 4 heads (2 key/value heads), 128
positions and tied embeddings, on the BPE tokenizer in data/tokenizer/ (vocabulary 512). It is
built exactly as a recipe builds it (``ModelSpec`` + ``load_tokenizer`` + ``load_causal_lm``,
seed 0), so its weights equal that from-scratch build, and written with ``save_pretrained``
(safetensors, float32, 106K parameters) together with the tokenizer (``tokenizer.save_pretrained``):
0.45 MB in all. A recipe loads it like any pretrained model: ``name_or_path: data/tiny-llama``.

Byte-for-byte reproducible: running it twice (with the same torch / transformers versions)
writes files with the same sha256 (printed at the end), whatever the environment
(HF_HUB_OFFLINE, the working directory), and they equal the committed data/tiny-llama/;
tests/test_recipes.py checks that.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from dpo_lightning.models import ModelSpec, load_causal_lm, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
SEED = 0
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def spec() -> ModelSpec:
    """The from-scratch spec the recipes used (``config`` + ``tokenizer: data/tokenizer`` + ``seed: 0``)."""
    return ModelSpec(config=dict(CONFIG), tokenizer=str(ROOT / "data" / "tokenizer"), seed=SEED)


def make(output: Path) -> dict[str, str]:
    """Build the model and tokenizer, write them to ``output``; return ``{file name: sha256}``."""
    tokenizer = load_tokenizer(spec())
    model = load_causal_lm(spec(), tokenizer)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), safe_serialization=True)
    # transformers records how the tokenizer was loaded (is_local, and local_files_only, which
    # follows HF_HUB_OFFLINE) and would save it; leave that out so the files do not depend on it
    for key in LOAD_TIME_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(str(output))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(output.iterdir()) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "data" / "tiny-llama", help="folder to write (default: data/tiny-llama)")
    args = parser.parse_args()
    hashes = make(args.output)
    total = sum((args.output / name).stat().st_size for name in hashes)
    print(f"wrote {args.output} ({total / 1e6:.2f} MB)")
    for name, digest in hashes.items():
        print(f"  {digest}  {name}")


if __name__ == "__main__":
    main()
