"""The RAG prompt, rendered once with the model's chat template and split into three parts.

``prefix``  system prompt and the opening of the user turn; encoded once per store.
``passage`` each passage, encoded independently as a continuation of the prefix.
``suffix``  the question and the generation prompt; the only part computed at query time.

Splitting the *rendered* template (rather than hand-writing special tokens) keeps every chat
format right, and lets the full-prefill baseline use exactly the same token ids as the cached
path: ``prefix + passage_1 + … + passage_k + suffix`` (DESIGN §1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SYSTEM_PROMPT = "You are a helpful assistant. Answer questions using only the given passages."
INSTRUCTION = "Read the passages and answer the question with a short phrase.\n\n"
_PASSAGES = "\x00RAGCOMPRESS_PASSAGES\x00"
_QUESTION = "\x00RAGCOMPRESS_QUESTION\x00"


@dataclass(frozen=True)
class PromptTemplate:
    """Text pieces of the split prompt; ``as_dict`` is what a store manifest records."""

    prefix: str
    passage_format: str  # contains "{text}"
    suffix_format: str  # contains "{question}"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> PromptTemplate:
        user = f"{INSTRUCTION}{_PASSAGES}Question: {_QUESTION}"
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        if tokenizer.chat_template:
            try:
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # templates without a system role (Gemma) raise on it
                merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{user}"}]
                rendered = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        else:  # base models: a plain-text prompt
            rendered = f"{SYSTEM_PROMPT}\n\n{user}\nAnswer:"
        head, rest = rendered.split(_PASSAGES)
        between, tail = rest.split(_QUESTION)
        return cls(prefix=head, passage_format="{text}\n\n", suffix_format=between + "{question}" + tail)

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> PromptTemplate:
        return cls(data["prefix"], data["passage_format"], data["suffix_format"])

    def as_dict(self) -> dict[str, str]:
        return {"prefix": self.prefix, "passage_format": self.passage_format, "suffix_format": self.suffix_format}


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of the three parts, tokenized piece by piece (no special tokens added)."""

    template: PromptTemplate
    tokenizer: Any

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix(self) -> list[int]:
        return self._encode(self.template.prefix)

    def passage(self, text: str) -> list[int]:
        return self._encode(self.template.passage_format.replace("{text}", text))

    def suffix(self, question: str) -> list[int]:
        return self._encode(self.template.suffix_format.replace("{question}", question))
