"""The split prompt: the same on every day it is rendered, and with the BOS a base model needs."""

from __future__ import annotations

from datetime import datetime

import pytest
from transformers import AutoTokenizer

from ragcompress.prompt import TEMPLATE_DATE, PromptTemplate, PromptTokens

# The date logic of Llama 3.2's chat template, around a ChatML body the test tokenizer knows.
DATED_TEMPLATE = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
    "{%- endif %}{%- endif %}"
    "<|im_start|>system\nToday Date: {{ date_string }}\n\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- for message in messages[1:] %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def _on_day(monkeypatch, day: datetime) -> None:
    import transformers.utils.chat_template_utils as chat_utils

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return day

    monkeypatch.setattr(chat_utils, "datetime", Clock)


def test_a_template_printing_todays_date_renders_the_same_prefix_on_every_day(tokenizer, monkeypatch):
    """A store built on one day was refused the next (its recorded prefix named another date)
    when more passages were indexed into it."""
    tokenizer.chat_template = DATED_TEMPLATE
    _on_day(monkeypatch, datetime(2026, 3, 1))
    first = PromptTemplate.from_tokenizer(tokenizer)
    _on_day(monkeypatch, datetime(2026, 3, 2))
    assert PromptTemplate.from_tokenizer(tokenizer) == first
    assert f"Today Date: {TEMPLATE_DATE}\n" in first.prefix


def test_a_base_model_prefix_starts_with_the_bos_its_tokenizer_adds(tiny_model_dir):
    """A model without a chat template got its plain-text prompt without the BOS its tokenizer
    puts before any text (Llama, Mistral and Gemma base models)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"), add_bos_token=True)
    tokenizer.chat_template = None
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id
    tokens = PromptTokens(PromptTemplate.from_tokenizer(tokenizer), tokenizer)
    ids = tokens.prefix()
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.bos_token_id not in tokens.passage("Some passage.") + tokens.suffix("Why?")


def test_a_base_model_without_bos_gets_none(tokenizer):
    tokenizer.chat_template = None
    assert tokenizer("Hi")["input_ids"][0] != tokenizer.bos_token_id
    assert PromptTemplate.from_tokenizer(tokenizer).prefix.startswith("You are a helpful assistant.")
