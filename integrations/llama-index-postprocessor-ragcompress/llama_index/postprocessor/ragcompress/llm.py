"""The local model as a LlamaIndex ``CustomLLM``: a plain full prefill of whatever prompt
LlamaIndex builds, decoded greedily. This is the baseline the cached synthesizer is compared
with (LlamaIndex's default synthesizer on the same weights), and what :class:`KVCacheSynthesizer`
hands to ``BaseSynthesizer`` so no hosted LLM is ever needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from llama_index.postprocessor.ragcompress._shared import in_thread, iterate_in_thread, shared_model, until_cancelled

# Above this a tokenizer's model_max_length is transformers' "no limit recorded" (1e30), not a limit.
_MAX_SANE_CONTEXT = 1 << 24


def model_positions(lm: Any) -> int | None:
    """The tokens ``lm`` (a ragcompress ``LoadedModel``) can attend to: its config's
    ``max_position_embeddings``, or its tokenizer's ``model_max_length`` when that is smaller;
    None when neither records a limit."""
    limits = (getattr(lm.config, "max_position_embeddings", None), getattr(lm.tokenizer, "model_max_length", None))
    known = [limit for limit in limits if isinstance(limit, int) and 0 < limit < _MAX_SANE_CONTEXT]
    return min(known, default=None)


def model_context_window(lm: Any) -> int:
    """:func:`model_positions`, or LlamaIndex's ``DEFAULT_CONTEXT_WINDOW`` when no limit is recorded."""
    return model_positions(lm) or DEFAULT_CONTEXT_WINDOW


class LocalLLM(CustomLLM):
    """A ragcompress-loadable causal LM (default SmolLM2-135M-Instruct), full prefill, greedy.

    Each call returns its own ``ttft_s`` / ``total_s`` / ``prompt_tokens`` in
    ``CompletionResponse.additional_kwargs``; ``last_timings`` holds those of the call started
    last (with concurrent calls, read each response's own).
    """

    model: str | None = Field(
        default=None,
        description="Embedded model name or local HF directory; None for the default SmolLM2-135M-Instruct.",
    )
    max_new_tokens: int = Field(default=32, gt=0, description="Greedy decoding stops after this many tokens.")
    context_window: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Context window reported to LlamaIndex's prompt helper; None for the model's own "
            "(see model_context_window), which loads the model."
        ),
    )
    chat_template: bool = Field(
        default=True, description="Wrap the prompt as one user turn with the model's chat template."
    )
    dtype: str | None = Field(default=None, description="The weights' dtype: None (float32), bfloat16, float16.")
    device: str | None = Field(
        default=None, description="Where the model runs: None or 'cpu' (the CPU), 'cuda', 'cuda:N'."
    )

    _last: dict = PrivateAttr(default_factory=dict)  # the timings of the call started last

    @classmethod
    def class_name(cls) -> str:
        return "RagcompressLocalLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or model_context_window(self._lm()),
            num_output=self.max_new_tokens,
            is_chat_model=False,
            model_name=self.model or "smollm2-135m",
        )

    def _lm(self) -> Any:
        """The model, shared with every component that loads it in the same dtype on the same device."""
        return shared_model(self.model, self.dtype, self.device)

    @property
    def last_timings(self) -> dict[str, float]:
        return dict(self._last)

    def prompt_ids(self, prompt: str) -> list[int]:
        """``prompt`` as one user turn (or as it is, without ``chat_template``); control-token
        text in it (``<|im_end|>`` in a node) is encoded as text, as the cached path encodes
        passages and questions."""
        from ragcompress.prompt import control_tokens, encode_user_text, user_turn_ids

        tokenizer = self._lm().tokenizer
        if self.chat_template:
            return user_turn_ids(tokenizer, prompt)
        return encode_user_text(tokenizer, "{prompt}", "{prompt}", prompt, control_tokens(tokenizer, ""))

    def _stream(self, prompt: str, timings: dict[str, Any]) -> Iterator[str]:
        """Text deltas of a plain full prefill of ``prompt`` (the library's one token generator),
        this call's timings filled into ``timings`` as it runs.
        A prompt that, with the new tokens, needs more positions than the model handles is
        refused here, before the model runs (``InputError``, as the cached path's
        ``Engine.suffix_ids``): past them a model's output is garbage, not an error."""
        from ragcompress.errors import InputError

        lm = self._lm()
        ids = self.prompt_ids(prompt)
        limit = model_positions(lm)
        if limit is not None and len(ids) + self.max_new_tokens > limit:
            raise InputError(
                f"prompt needs {len(ids) + self.max_new_tokens} positions ({len(ids)} prompt tokens, "
                f"{self.max_new_tokens} new tokens) but the model handles {limit}; shorten the prompt "
                "(fewer or shorter nodes, similarity_top_k), or lower max_new_tokens"
            )
        return self._deltas(lm, ids, timings)

    def _deltas(self, lm: Any, ids: list[int], timings: dict[str, Any]) -> Iterator[str]:
        """The deltas; ``timings`` belong to this call alone (kept in one attribute shared by
        every call, concurrent calls, ``acomplete`` under ``asyncio.gather``, reported each other's)."""
        from ragcompress.runtime.generate import TokenStream, stop_token_ids, text_deltas
        from ragcompress.runtime.prepare import plain_prefill

        timings["prompt_tokens"] = len(ids)
        self._last = timings  # what last_timings reads: the call started last
        stream = TokenStream(
            lm.model,
            lambda: plain_prefill(lm, ids, self.max_new_tokens),
            self.max_new_tokens,
            stop_token_ids(lm.tokenizer, lm.model),
        )
        with until_cancelled(stream):
            for delta in text_deltas(lm.tokenizer, stream):
                timings["ttft_s"] = stream.ttft_s
                yield delta
        timings.update(ttft_s=stream.ttft_s, total_s=stream.total_s)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        timings: dict[str, Any] = {}
        text = "".join(self._stream(prompt, timings))
        return CompletionResponse(text=text, additional_kwargs=dict(timings))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        text, timings = "", dict[str, Any]()
        for delta in self._stream(prompt, timings):
            text += delta
            yield CompletionResponse(text=text, delta=delta, additional_kwargs=dict(timings))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """:meth:`complete` with the decoding on a worker thread (the event loop keeps running)."""
        timings: dict[str, Any] = {}
        text = await in_thread(lambda: "".join(self._stream(prompt, timings)))
        return CompletionResponse(text=text, additional_kwargs=dict(timings))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        """:meth:`stream_complete`, each token decoded on a worker thread."""

        async def responses() -> CompletionResponseAsyncGen:
            text, timings = "", dict[str, Any]()
            async for delta in iterate_in_thread(self._stream(prompt, timings)):
                text += delta
                yield CompletionResponse(text=text, delta=delta, additional_kwargs=dict(timings))

        return responses()
