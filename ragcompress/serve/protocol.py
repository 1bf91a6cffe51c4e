"""The wire format: request parsing with bounds, OpenAI-style errors, response bodies.

Every request body is parsed here into a frozen query (:class:`ChatQuery`, :class:`RetrieveQuery`)
or refused with an :class:`ApiError` that renders as OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``. Nothing in a request names a file: passages
are named by their catalogue id and the store is fixed when the service starts.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, ValidationError

from ragcompress.errors import CorruptSegmentError, InputError, PromptTooLongError, StoreError
from ragcompress.serve.settings import ServeSettings

MAX_ID_CHARS = 512


class ApiError(Exception):
    """A request that ends with an HTTP error; ``body()`` is OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(exc: BaseException) -> ApiError:
    """The HTTP error a failure of one request maps to; the service itself goes on."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, CorruptSegmentError):
        return ApiError(
            500,
            f"a stored passage cache failed its integrity check and was not used: {exc}. "
            "Other passages are unaffected; run `ragcompress verify` on the store and re-index the passage.",
            type="server_error",
            code="corrupt_segment",
        )
    if isinstance(exc, StoreError):
        return ApiError(503, str(exc), type="server_error", code="store_unavailable")
    if isinstance(exc, PromptTooLongError):  # in the request's words, with OpenAI's code for it
        message = exc.remedy(top_k="ragcompress.top_k, or fewer ragcompress.passage_ids", max_new_tokens="max_tokens")
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, InputError | ValueError):
        return ApiError(400, str(exc), code="invalid_request")
    return ApiError(500, "internal error while answering; see the server log", type="server_error", code="internal")


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object from a request body (UTF-8), or a 400."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8", code="invalid_json") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


class _Strict(BaseModel):
    # strict: no coercion ("3" is not 3, true is not 1); unknown OpenAI fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


# ``[passages, fraction]``: one point of a recompute schedule (``RecomputeConfig.ratio_by_passages``);
# a JSON array, so the tuple is read laxly while its members stay strict
SchedulePoint = Annotated[
    tuple[Annotated[int, Strict(), Field(ge=1)], Annotated[float, Strict(), Field(ge=0.0, le=1.0)]], Strict(False)
]
# ``recompute``: a fraction, or a schedule of such points; the input's shape picks which one
# validates it, so an error names the problem of that form (not the other form's type mismatch)
Recompute = Annotated[
    Annotated[Annotated[float, Field(ge=0.0, le=1.0)], Tag("fraction")]
    | Annotated[Annotated[list[SchedulePoint], Field(min_length=1, max_length=64)], Tag("schedule")],
    Discriminator(lambda value: "schedule" if isinstance(value, list | tuple) else "fraction"),
]


class RagOptions(BaseModel):
    """The request's ``ragcompress`` object; unknown keys are refused (a typo is not ignored)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    passage_ids: list[str] | None = Field(default=None, min_length=1)
    top_k: int | None = Field(default=None, ge=1)
    recompute: Recompute | None = None
    fallback_margin: float | None = Field(default=None, ge=0.0, lt=1.0)


class ChatRequest(_Strict):
    model: str | None = Field(default=None, max_length=256)
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    ragcompress: RagOptions | None = None


class RetrieveRequest(_Strict):
    """``/v1/retrieve``'s body: ragcompress's own endpoint, with no OpenAI fields to tolerate, so
    an unknown key is refused (``{"topk": 10}`` was answered with the default 3 hits)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    query: str
    top_k: int | None = Field(default=None, ge=1)


# the request fields an error's ``param`` may name; pydantic's loc also holds the tags of union
# members ("str", "fraction"), which are no field a client sent
_FIELDS = frozenset(
    name
    for model in (ContentPart, Message, StreamOptions, RagOptions, ChatRequest, RetrieveRequest)
    for name in model.model_fields
)


def _validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        unknown = first["type"] == "extra_forbidden"  # its loc names the key the client sent
        where = ".".join(str(p) for p in first["loc"] if unknown or isinstance(p, int) or p in _FIELDS)
        raise ApiError(400, f"{where or 'body'}: {first['msg']}", code="invalid_value", param=where or None) from None


def _text(value: str, what: str, limit: int, param: str) -> str:
    """``value`` checked: encodable (no lone surrogates), not blank, at most ``limit`` characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, f"{what} is not valid Unicode (lone surrogate)", param=param, code="invalid_value"
        ) from None
    if not value.strip():
        raise ApiError(400, f"{what} is empty", param=param, code="invalid_value")
    if len(value) > limit:
        raise ApiError(
            400, f"{what} has {len(value)} characters; at most {limit} are accepted", param=param, code="too_long"
        )
    return value


@dataclass(frozen=True)
class ChatQuery:
    """One chat completion request, validated and bounded."""

    question: str
    max_new_tokens: int
    passage_ids: list[str] | None = None
    top_k: int | None = None
    recompute: float | tuple[tuple[int, float], ...] | None = None  # one fraction, or a schedule by passages
    fallback_margin: float | None = None  # AnswerOptions.fallback_margin; None: the service's
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat(data: dict[str, Any], settings: ServeSettings, default_max_tokens: int) -> ChatQuery:
    request: ChatRequest = _validated(ChatRequest, data)
    if len(request.messages) > settings.max_messages:
        raise ApiError(400, f"at most {settings.max_messages} messages are accepted", param="messages", code="too_long")
    if request.n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported")
    if request.tools:
        raise ApiError(400, "tool calls are not supported", param="tools", code="unsupported")
    users = [i for i, message in enumerate(request.messages) if message.role == "user"]
    if not users:
        raise ApiError(
            400,
            "messages hold no user message: the last user message is the question",
            param="messages",
            code="invalid_value",
        )
    last = request.messages[users[-1]]
    param = f"messages.{users[-1]}.content"
    if isinstance(last.content, list):
        if any(part.type != "text" or part.text is None for part in last.content):
            raise ApiError(400, "only text content parts are supported", param=param, code="unsupported")
        content = "".join(part.text or "" for part in last.content)
    else:
        content = last.content or ""
    question = _text(content, "the question (last user message)", settings.max_question_chars, param)

    max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens
    if max_tokens > settings.max_tokens:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} exceeds this service's limit of {settings.max_tokens}",
            param="max_tokens",
            code="invalid_value",
        )
    rag = request.ragcompress or RagOptions()
    if rag.passage_ids is not None and rag.top_k is not None:
        raise ApiError(
            400,
            "give ragcompress.passage_ids or ragcompress.top_k, not both",
            param="ragcompress",
            code="invalid_value",
        )
    top_k = rag.top_k if rag.passage_ids is None else None
    wanted = len(rag.passage_ids) if rag.passage_ids is not None else top_k or settings.top_k
    if wanted > settings.max_top_k:
        raise ApiError(
            400,
            f"{wanted} passages asked for; this service answers from at most {settings.max_top_k}",
            param="ragcompress.passage_ids" if rag.passage_ids is not None else "ragcompress.top_k",
            code="invalid_value",
        )
    recompute: float | tuple[tuple[int, float], ...] | None = None
    if isinstance(rag.recompute, list):
        passages = [k for k, _ in rag.recompute]
        if passages != sorted(set(passages)):
            raise ApiError(
                400,
                f"ragcompress.recompute's [passages, fraction] points must increase in passages, got {passages}",
                param="ragcompress.recompute",
                code="invalid_value",
            )
        recompute = tuple(rag.recompute)
    else:
        recompute = rag.recompute
    passage_ids = None
    if rag.passage_ids is not None:
        passage_ids = [
            _text(pid, "a passage id", MAX_ID_CHARS, f"ragcompress.passage_ids.{i}")
            for i, pid in enumerate(rag.passage_ids)
        ]
        repeated = sorted({pid for pid in passage_ids if passage_ids.count(pid) > 1})
        if repeated:  # its cache would be placed twice: two copies of one passage in the context
            raise ApiError(
                400,
                f"ragcompress.passage_ids names {', '.join(map(repr, repeated))} more than once; give each passage once",
                param="ragcompress.passage_ids",
                code="invalid_value",
            )
    return ChatQuery(
        question=question,
        max_new_tokens=max_tokens,
        passage_ids=passage_ids,
        top_k=None if passage_ids is not None else (top_k or settings.top_k),
        recompute=recompute,
        fallback_margin=rag.fallback_margin,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


@dataclass(frozen=True)
class RetrieveQuery:
    query: str
    top_k: int


def parse_retrieve(data: dict[str, Any], settings: ServeSettings) -> RetrieveQuery:
    request: RetrieveRequest = _validated(RetrieveRequest, data)
    top_k = request.top_k or settings.top_k
    if top_k > settings.max_top_k:
        raise ApiError(
            400,
            f"top_k {top_k} exceeds this service's limit of {settings.max_top_k}",
            param="top_k",
            code="invalid_value",
        )
    return RetrieveQuery(_text(request.query, "the query", settings.max_question_chars, "query"), top_k)


# -- responses --------------------------------------------------------------------------------------


def completion_body(
    query: ChatQuery, model: str, text: str, finish_reason: str, usage: dict[str, int], info: dict[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion`` object with the ``ragcompress`` object beside ``usage``."""
    return {
        "id": query.id,
        "object": "chat.completion",
        "created": query.created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage,
        "ragcompress": info,
    }


def chunk_body(
    query: ChatQuery,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` gives the usage chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    return {
        "id": query.id,
        "object": "chat.completion.chunk",
        "created": query.created,
        "model": model,
        "choices": choices,
        **extra,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: JSON`` and a blank line (non-ASCII escaped, as
    :class:`~ragcompress.serve.app.JSONBody` escapes it)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True)
    return f"data: {text}\n\n".encode()
