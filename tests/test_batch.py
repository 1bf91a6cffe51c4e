"""Batched decoding (``runtime.batch``) and the service's batches: answers decoded together equal
the unbatched greedy answers token for token (tiny random model; SmolLM2 marked slow)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from ragcompress.indexing import IndexConfig, index
from ragcompress.runtime.batch import BatchStream, batchable
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.generate import TokenStream
from ragcompress.runtime.options import AnswerOptions

QUESTIONS = [
    "What city in Victoria is called the sporting capital of Australia?",
    "Who won the game?",
    "How many electorates does the Legislative Assembly of Victoria have, and since when?",
    "When was the constitution enacted?",
    "Which party is favoured in Bendigo?",
]


def store_of(tiny_model_dir, root, config: IndexConfig, passages: int = 8):
    from ragcompress.data import SAMPLE_PASSAGES

    source = root / "passages.jsonl"
    source.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:passages]) + "\n")
    index(source, root / "store", model=str(tiny_model_dir("llama")), config=config)
    return root / "store"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    path = store_of(tiny_model_dir, tmp_path_factory.mktemp("batch"), IndexConfig(quant="int8"))
    engine = Engine.open(path, options=AnswerOptions(max_new_tokens=8, backend="dense"))
    yield engine
    engine.close()


def unbatched(engine: Engine, question: str, entries, max_new: int, stop_ids: set[int]) -> list[int]:
    """The reference: one request through the unbatched generator."""
    options = engine.options.replace(max_new_tokens=max_new)
    stream = TokenStream(engine.lm.model, lambda: engine.prepare(question, entries, options), max_new, stop_ids)
    return stream.run().token_ids


def batched(
    engine: Engine, requests, stop_ids: set[int], drop: int | None = None, drop_after: int = 2
) -> tuple[list[list[int]], list]:
    prepared = [engine.prepare(q, entries, engine.options.replace(max_new_tokens=n)) for q, entries, n in requests]
    assert all(batchable(p) for p in prepared)
    stream = BatchStream(engine.lm.model, prepared, [n for _, _, n in requests], stop_ids)
    tokens: list[list[int]] = [[] for _ in requests]
    finished: list[int] = []
    for i, token in stream:
        if token is None:
            finished.append(i)
            continue
        assert i not in finished, "a token after its request finished"
        tokens[i].append(token)
        if i == drop and len(tokens[i]) == drop_after:
            stream.drop(i)
    assert all(t is not None and t > 0 for t in stream.ttft_s)
    return tokens, finished


def test_batched_tokens_equal_unbatched_greedy(engine):
    # different passages (top-k 1..3: contexts of different lengths), question lengths and budgets
    requests = [
        (q, engine.retrieve(q, 1 + i % 3), n) for i, (q, n) in enumerate(zip(QUESTIONS, (8, 3, 8, 5, 1), strict=True))
    ]
    requests.append((QUESTIONS[0], [engine.store.entry(e.id) for e in reversed(requests[0][1])], 6))
    want = [unbatched(engine, q, entries, n, engine.stop_ids) for q, entries, n in requests]
    assert len({tuple(w) for w in want}) > 1, "the requests should differ"
    got, finished = batched(engine, requests, engine.stop_ids)
    assert got == want
    assert sorted(finished) == list(range(len(requests)))

    # a stop id met by one request ends only that request, as it ends the unbatched one
    stop = engine.stop_ids | {want[0][3]}
    want_stopped = [unbatched(engine, q, entries, n, stop) for q, entries, n in requests]
    assert len(want_stopped[0]) == 3 and want_stopped[2:] != [[]] * (len(requests) - 2)
    got_stopped, _ = batched(engine, requests, stop)
    assert got_stopped == want_stopped

    # a dropped request (client gone) stops there; the others are unchanged
    got_dropped, finished = batched(engine, requests, engine.stop_ids, drop=0)
    assert got_dropped[0] == want[0][:2] and got_dropped[1:] == want[1:]
    assert 0 not in finished

    # dropped as it decodes its last token: not reported finished as well (its caller finished it)
    assert len(want[0]) == requests[0][2]
    got_dropped, finished = batched(engine, requests, engine.stop_ids, drop=0, drop_after=len(want[0]))
    assert got_dropped == want and 0 not in finished


def test_unbatchable_requests_are_refused(engine):
    question = QUESTIONS[0]
    entries = engine.retrieve(question, 2)
    recomputed = engine.prepare(question, entries, engine.options.replace(recompute=0.5))
    assert not batchable(recomputed)
    with pytest.raises(ValueError, match="cannot be batched"):
        BatchStream(engine.lm.model, [recomputed], [4], engine.stop_ids)


def test_service_batches_concurrent_requests_and_answers_as_unbatched(engine, tiny_model_dir, tmp_path):
    """Requests queued together are answered in one batch (``ragcompress.batch`` > 1) with the
    unbatched answers; a store with per-head eviction masks is answered alone inside a batch;
    max_batch 1 never batches."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from ragcompress.serve import ServeSettings, create_app
    from ragcompress.serve.worker import Job

    evicting_store = store_of(
        tiny_model_dir, tmp_path, IndexConfig(method="adaptive:knorm", ratio=0.5, quant="int8"), passages=4
    )
    evicting = Engine.open(evicting_store, options=AnswerOptions(max_new_tokens=8, backend="dense"))

    def scenario(served: Engine, max_batch: int, streams: list[bool]) -> list[dict]:
        app = create_app(served, ServeSettings(max_batch=max_batch))
        service = app.state.service
        release = threading.Event()
        service.worker.submit(Job(lambda engine, job: release.wait(30), lambda event: None))
        deadline = time.monotonic() + 10
        while not service.worker.busy and time.monotonic() < deadline:
            time.sleep(0.01)

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
                bodies = [
                    {"messages": [{"role": "user", "content": q}], "max_tokens": 3 + i % 6, "stream": stream}
                    for i, (q, stream) in enumerate(zip(QUESTIONS, streams, strict=True))
                ]
                tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=b)) for b in bodies]
                while service.worker.waiting < len(bodies):
                    await asyncio.sleep(0.01)
                release.set()  # all are queued: the thread takes them together
                return [await task for task in tasks]

        try:
            responses = asyncio.run(main())
        finally:
            service.close()
        out = []
        for response in responses:
            assert response.status_code == 200, response.text
            if response.headers["content-type"].startswith("text/event-stream"):
                chunks = [
                    json.loads(block[len("data: ") :])
                    for block in response.text.split("\n\n")
                    if block.strip() and block != "data: [DONE]"
                ]
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
                info = next(c["ragcompress"] for c in chunks if c.get("ragcompress"))
                out.append({"text": text, "info": info})
            else:
                body = response.json()
                out.append({"text": body["choices"][0]["message"]["content"], "info": body["ragcompress"]})
        return out

    streams = [False, True, False, True, False]
    try:
        for served, max_batch, batch in ((engine, 8, 5), (evicting, 8, 5), (engine, 1, 1)):
            results = scenario(served, max_batch, streams)
            for i, (question, result) in enumerate(zip(QUESTIONS, results, strict=True)):
                want = served.answer_cached(
                    question, served.retrieve(question, 3), served.options.replace(max_new_tokens=3 + i % 6)
                )
                assert result["text"] == want.answer
                assert result["info"]["passage_ids"] == want.passage_ids
                assert result["info"]["ttft_s"] > 0
                assert result["info"]["batch"] == (1 if served is evicting else batch)
    finally:
        evicting.close()


@pytest.mark.slow
def test_smollm2_batched_answers_equal_unbatched(tmp_path):
    """The default model over the bundled sample: five questions decoded together give the
    unbatched greedy tokens."""
    from ragcompress.data import SAMPLE_PASSAGES, SAMPLE_QUESTIONS
    from ragcompress.models import DEFAULT_MODEL

    questions = [json.loads(line)["question"] for line in SAMPLE_QUESTIONS.read_text().splitlines()[:5]]
    index(SAMPLE_PASSAGES, tmp_path / "store", model=DEFAULT_MODEL, config=IndexConfig(quant="int8"))
    with Engine.open(tmp_path / "store", options=AnswerOptions(max_new_tokens=24, backend="dense")) as smol:
        requests = [(q, smol.retrieve(q, 3), 24) for q in questions]
        want = [unbatched(smol, q, entries, n, smol.stop_ids) for q, entries, n in requests]
        got, _ = batched(smol, requests, smol.stop_ids)
        assert got == want


def test_requests_whose_batch_outgrows_a_sliding_window_are_not_batched(tiny_model_dir, tmp_path):
    """The batch puts every question and answer after the longest cache and the longest question,
    and transformers applies a sliding window by column: a short request with a long answer
    beside a long context lost its prefix and passages mid-answer (its tokens differed from step
    80 of 220 in the audit's run), though each request alone fitted the window."""
    from ragcompress.data import SAMPLE_PASSAGES
    from ragcompress.runtime.attention import sliding_window
    from ragcompress.runtime.batch import fits_one_batch

    source = tmp_path / "passages.jsonl"
    source.write_text("\n".join(SAMPLE_PASSAGES.read_text().splitlines()[:8]) + "\n")
    model = str(tiny_model_dir("mistral", sliding_window=700))
    index(source, tmp_path / "store", model=model, config=IndexConfig())
    with Engine.open(tmp_path / "store", options=AnswerOptions(backend="dense")) as engine:
        window = sliding_window(engine.lm.config)
        long_context = (QUESTIONS[0], engine.retrieve(QUESTIONS[0], 3), 1)
        long_answer = ("Who won?", engine.retrieve("Who won?", 1), 220)
        prepared = [
            engine.prepare(q, e, engine.options.replace(max_new_tokens=n)) for q, e, n in (long_context, long_answer)
        ]
        steps = [long_context[2], long_answer[2]]
        assert all(batchable(p, window, n) for p, n in zip(prepared, steps, strict=True))  # each alone fits
        assert not fits_one_batch(prepared, steps, window)
        with pytest.raises(ValueError, match="outgrow the model's sliding window"):
            BatchStream(engine.lm.model, prepared, steps, set())
        assert fits_one_batch(prepared[:1], steps[:1], window) and fits_one_batch(prepared[1:], steps[1:], window)
