"""Instrumentation events emitted by the ragcompress components (LlamaIndex dispatcher)."""

from __future__ import annotations

from llama_index.core.instrumentation.events.base import BaseEvent


class KVCacheStoredEvent(BaseEvent):
    """Caches were computed and committed to a store.

    Args:
        store: store directory.
        passage_ids: ids of the passages written.
        seconds: wall time of encoding, compression and writing.
    """

    store: str
    passage_ids: list[str]
    seconds: float

    @classmethod
    def class_name(cls) -> str:
        return "KVCacheStoredEvent"


class KVCacheAttachedEvent(BaseEvent):
    """Retrieved nodes were linked to their stored caches.

    Args:
        store: store directory.
        passage_ids: the handle of every returned node, in order.
        computed: passage ids whose cache was missing and computed on the fly.
    """

    store: str
    passage_ids: list[str]
    computed: list[str]

    @classmethod
    def class_name(cls) -> str:
        return "KVCacheAttachedEvent"


class KVCacheAnswerEvent(BaseEvent):
    """An answer was generated from stored caches.

    Args:
        store: store directory.
        passage_ids: passages whose caches were placed in front of the question.
        ttft_s: time to first token, from reading the caches to the first generated token.
    """

    store: str
    passage_ids: list[str]
    ttft_s: float | None

    @classmethod
    def class_name(cls) -> str:
        return "KVCacheAnswerEvent"


class TextCompressionEvent(BaseEvent):
    """Node texts were compressed.

    Args:
        method: text compression method.
        original_tokens: tokens before, summed over nodes.
        kept_tokens: tokens after, summed over nodes.
        seconds: wall time of the compression.
    """

    method: str
    original_tokens: int
    kept_tokens: int
    seconds: float

    @classmethod
    def class_name(cls) -> str:
        return "TextCompressionEvent"
