"""The RAG prompt, rendered once with the model's chat template and split into three parts.

``prefix``  system prompt and the opening of the user turn; encoded once per store.
``passage`` each passage, encoded independently as a continuation of the prefix.
``suffix``  the question and the generation prompt; the only part computed at query time.

Splitting the *rendered* template (rather than hand-writing special tokens) keeps every chat
format right, and lets the full-prefill baseline use exactly the same token ids as the cached
path: ``prefix + passage_1 + … + passage_k + suffix`` (DESIGN §1). Passages and questions are
data: control-token text in them (``<|im_end|>``) is encoded as text, the template's own control
tokens as control tokens (:func:`encode_user_text`).

The rendering must not depend on when it runs: a store's prefix cache is encoded once, and a
later run that adds passages must render the same prefix. Templates that print today's date are
given :data:`TEMPLATE_DATE`, the date Llama 3.x templates fall back to themselves: as
``date_string`` (Llama 3.2 reads it before ``strftime_now``), and as the clock behind
``strftime_now`` for templates that always call it (SmolLM3: ``strftime_now("%d %B %Y")``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from importlib import import_module
from typing import Any

SYSTEM_PROMPT = "You are a helpful assistant. Answer questions using only the given passages."
INSTRUCTION = "Read the passages and answer the question with a short phrase.\n\n"
_PASSAGES = "\x00RAGCOMPRESS_PASSAGES\x00"
_QUESTION = "\x00RAGCOMPRESS_QUESTION\x00"
TEMPLATE_DATE = "26 Jul 2024"  # Llama 3.x templates' own default for ``date_string``
# The same day as the clock ``strftime_now`` reads while a template renders (midnight, so a
# template printing the time prints a fixed one too).
TEMPLATE_CLOCK = datetime(2024, 7, 26)
_CLOCK_LOCK = threading.Lock()


@contextmanager
def _fixed_clock() -> Iterator[None]:
    """Within this block, transformers' chat templates see :data:`TEMPLATE_CLOCK` as ``now``.

    transformers defines the templates' ``strftime_now`` as ``datetime.now().strftime(...)``
    over its ``chat_template_utils`` module's ``datetime``, and refuses a replacement passed as a
    template variable, so that name is swapped for the render. The lock keeps concurrent renders
    from restoring each other's swap out of order; other threads still read the real clock through
    the stand-in.
    """
    chat_utils: Any = import_module("transformers.utils.chat_template_utils")
    with _CLOCK_LOCK:
        real = chat_utils.datetime
        chat_utils.datetime = _Clock(real, threading.get_ident())
        try:
            yield
        finally:
            chat_utils.datetime = real


class _Clock:
    """Stands in for ``datetime`` in transformers' template module: ``now()`` is
    :data:`TEMPLATE_CLOCK` in the rendering thread, the real clock elsewhere; anything else is
    the real ``datetime``'s."""

    def __init__(self, real: Any, owner: int) -> None:
        self._real, self._owner = real, owner

    def now(self, tz: Any = None) -> Any:
        if threading.get_ident() != self._owner:
            return self._real.now(tz)
        return TEMPLATE_CLOCK.replace(tzinfo=tz) if tz is not None else TEMPLATE_CLOCK

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered by ``tokenizer``'s chat template with the generation prompt, on the
    fixed day :data:`TEMPLATE_DATE` whichever way the template reads the date."""
    with _fixed_clock():
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, date_string=TEMPLATE_DATE
        )


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
                rendered = _render(tokenizer, messages)
            except Exception:  # templates without a system role (Gemma) raise on it
                merged = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{user}"}]
                rendered = _render(tokenizer, merged)
        else:  # base models: a plain-text prompt, after the BOS their tokenizer adds to any text
            rendered = f"{_default_bos(tokenizer)}{SYSTEM_PROMPT}\n\n{user}\nAnswer:"
        head, rest = rendered.split(_PASSAGES)
        between, tail = rest.split(_QUESTION)
        return cls(prefix=head, passage_format="{text}\n\n", suffix_format=between + "{question}" + tail)

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> PromptTemplate:
        return cls(data["prefix"], data["passage_format"], data["suffix_format"])

    def as_dict(self) -> dict[str, str]:
        return {"prefix": self.prefix, "passage_format": self.passage_format, "suffix_format": self.suffix_format}


def render_user_turn(tokenizer: Any, content: str) -> str | None:
    """``content`` as one user turn and the generation prompt, rendered by ``tokenizer``'s chat
    template with :data:`TEMPLATE_DATE` (so the text does not depend on the day it runs), or
    None for a tokenizer without a template (the caller writes its plain-text form)."""
    if not tokenizer.chat_template:
        return None
    return _render(tokenizer, [{"role": "user", "content": content}])


def _default_bos(tokenizer: Any) -> str:
    """The BOS token text when ``tokenizer`` puts one before every text it encodes (Llama, Mistral
    and Gemma base models, which answer badly without it), else ``""``. A chat template writes its
    own BOS; the pieces are encoded without special tokens (:class:`PromptTokens`)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or tokenizer("")["input_ids"][:1] != [bos_id]:
        return ""
    return tokenizer.bos_token


def control_tokens(tokenizer: Any, template_text: str) -> re.Pattern[str] | None:
    """A pattern of the tokenizer's control tokens, or None when it has none: its special added
    tokens, those it lists as ``chat_control_tokens``, and other added tokens ``template_text``
    (the prompt's own text) writes, whitespace ones aside (transformers' own rule for
    ``apply_chat_template(sanitize_control_tokens=True)``)."""
    listed = set(getattr(tokenizer, "chat_control_tokens", None) or ())
    tokens = [
        token.content
        for token in tokenizer.added_tokens_decoder.values()
        if token.special or token.content in listed or (token.content in template_text and not token.content.isspace())
    ]
    if not tokens:
        return None
    return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))


def encode_user_text(
    tokenizer: Any, form: str, placeholder: str, text: str, control: re.Pattern[str] | None
) -> list[int]:
    """Ids of ``form`` with ``placeholder`` replaced by ``text`` (a passage, a question: data, not
    prompt), the form's control tokens encoded as control tokens and any control-token text in
    ``text`` (``<|im_end|>`` in a document) as the plain text it is: else a document could close
    the user turn and write a system turn of its own inside the cached prompt.

    Text without control-token text is encoded in one call, exactly as before; text with some is
    marked and encoded by transformers' ``sanitize_control_tokens`` (the mechanism of
    ``apply_chat_template``), which encodes the marked tokens as text and the rest as usual."""
    if control is None or not control.search(text):
        return tokenizer(form.replace(placeholder, text), add_special_tokens=False)["input_ids"]
    from transformers.utils.chat_template_utils import mark_control_tokens

    marked = form.replace(placeholder, mark_control_tokens(text, control))
    return tokenizer(marked, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]


def user_turn_ids(tokenizer: Any, content: str) -> list[int]:
    """Ids of :func:`render_user_turn` of ``content`` (``content`` itself for a tokenizer without
    a template), control-token text in ``content`` encoded as text (:func:`encode_user_text`)."""
    control = control_tokens(tokenizer, render_user_turn(tokenizer, "") or "")
    if control is None or not control.search(content):
        text = render_user_turn(tokenizer, content)
        return tokenizer(content if text is None else text, add_special_tokens=False)["input_ids"]
    from transformers.utils.chat_template_utils import mark_control_tokens

    marked = mark_control_tokens(content, control)
    text = render_user_turn(tokenizer, marked)
    return tokenizer(marked if text is None else text, add_special_tokens=False, sanitize_control_tokens=True)[
        "input_ids"
    ]


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of the three parts, tokenized piece by piece (no special tokens added). The
    template's control tokens are control tokens; in a passage's or a question's text they are
    plain text (:func:`encode_user_text`)."""

    template: PromptTemplate
    tokenizer: Any

    @cached_property
    def _control(self) -> re.Pattern[str] | None:
        template = self.template
        return control_tokens(self.tokenizer, template.prefix + template.passage_format + template.suffix_format)

    def prefix(self) -> list[int]:
        return self.tokenizer(self.template.prefix, add_special_tokens=False)["input_ids"]

    def passage(self, text: str) -> list[int]:
        return encode_user_text(self.tokenizer, self.template.passage_format, "{text}", text, self._control)

    def suffix(self, question: str) -> list[int]:
        return encode_user_text(self.tokenizer, self.template.suffix_format, "{question}", question, self._control)
