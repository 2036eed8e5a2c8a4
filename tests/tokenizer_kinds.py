"""Tokenizers of the three kinds the data path must handle, built offline from data/tokenizer."""

from __future__ import annotations

from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from conftest import TOKENIZER_DIR


def shipped() -> PreTrainedTokenizerBase:
    """BOS added by the tokenizer itself, and written by the chat template too (Llama-3 style)."""
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def template_without_bos() -> PreTrainedTokenizerBase:
    """The tokenizer adds BOS to plain text, but its chat template writes none."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
    return tok


def qwen_like() -> PreTrainedTokenizerBase:
    """No BOS at all; ChatML template; EOS is the end-of-turn token followed by a newline."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.bos_token = None
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def rewriting_template() -> PreTrainedTokenizerBase:
    """A template that renders the prompt differently when a generation prompt is asked for."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = (
        "{% if add_generation_prompt %}[draft] {% endif %}{% for message in messages %}"
        "{{ message['role'] }}: {{ message['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return tok
