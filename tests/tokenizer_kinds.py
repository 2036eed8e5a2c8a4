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


def thinking_template() -> PreTrainedTokenizerBase:
    """A Qwen3-like template: with ``enable_thinking`` false, an empty think block opens the
    assistant's reply (after the generation prompt, and in the last assistant message), and the
    tools' names go in a system header when tools are given."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = (
        "{% set no_think = enable_thinking is defined and not enable_thinking %}"
        "{{ bos_token }}{% if tools %}<|system|>\ntools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}</s>\n{% endif %}"
        "{% for message in messages %}<|{{ message['role'] }}|>\n"
        "{% if message['role'] == 'assistant' and loop.last and no_think %}<think></think>\n{% endif %}"
        "{{ message['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% if no_think %}<think></think>\n{% endif %}{% endif %}"
    )
    return tok


def raising_template() -> PreTrainedTokenizerBase:
    """A template that refuses system messages (as Gemma's does), raising on such a row."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return tok
