"""``ragcompress bench`` on stores of every kind: the indexing side re-encodes with the store's own
settings, and a store it cannot re-encode is refused before anything is timed."""

from __future__ import annotations

import json
from functools import partial

import pytest
from test_cli import run_cli

from ragcompress.bench import bench, indexing_throughput
from ragcompress.evaluation import Question
from ragcompress.indexing import IndexConfig, index
from ragcompress.runtime.engine import Engine
from ragcompress.runtime.options import AnswerOptions
from ragcompress.store import KVStore
from ragcompress.testing import HashEmbedder, noisy_adaptor


def test_indexing_throughput_of_a_low_rank_store_uses_its_basis(tiny_lm, passages_file, tmp_path):
    """A ``--rank`` store (the ``smallest`` preset) writes latents of its basis: timing its
    indexing once failed with "a low-rank store's passages need its basis"."""
    embedder = HashEmbedder()
    config = IndexConfig(quant="int8", rank=8, calibration_passages=4, embedder=embedder.name)
    index(passages_file, tmp_path / "store", lm=tiny_lm, embedder=embedder, config=config)
    engine = Engine(KVStore.open(tmp_path / "store"), tiny_lm, embedder)
    try:
        result = indexing_throughput(engine, 2, 1)
    finally:
        engine.close()
    assert result.passages == 2 and result.indexer_passages_per_s > 0 and result.ratio > 0


def test_bench_counts_a_low_rank_stores_basis_in_its_bytes(tiny_lm, passages_file, tmp_path):
    """``bench`` counted the passages' blobs only, so a ``--rank`` store (the ``smallest``
    preset) looked more compressed in bench than in ``index`` and ``eval``, which spread the
    basis over the store's tokens. With every passage retrieved the three agree."""
    embedder = HashEmbedder()
    config = IndexConfig(quant="int8", rank=8, calibration_passages=4, embedder=embedder.name)
    index(passages_file, tmp_path / "store", lm=tiny_lm, embedder=embedder, config=config)
    with Engine(KVStore.open(tmp_path / "store"), tiny_lm, embedder, AnswerOptions(max_new_tokens=2)) as engine:
        every = list(engine.store.catalogue.entries())
        assert engine.store.basis_bytes > 0
        question = Question("q0", "Where is the city?", ["x"], every[0].id)
        (row,) = bench(engine, [question], [len(every)], 1)
        tokens = sum(e.num_tokens for e in every)
        assert row.kv_bytes["stored"] == pytest.approx(engine.store.bytes_per_token() * tokens)
        assert row.kv_bytes["stored"] == pytest.approx(engine.store.stored_bytes(every) + engine.store.basis_bytes)


def test_bench_refuses_a_store_of_an_unpackaged_adaptor_before_timing(
    tiny_lm, tiny_model_dir, passages_file, tmp_path, monkeypatch, capfd
):
    """A store encoded through a ``ragcompress train`` folder cannot be re-encoded by ``bench``
    (it has no ``--adaptor``): one line naming ``--indexing-passages 0``, before the TTFT runs,
    not a pointer to an option ``bench`` lacks after all of them."""
    folder = noisy_adaptor(tiny_lm, 1).save(tmp_path / "trained")
    store = tmp_path / "store"
    index(
        passages_file, store, model=str(tiny_model_dir("llama")), config=IndexConfig(quant="int8", adaptor=str(folder))
    )
    timed: list[int] = []
    monkeypatch.setattr("ragcompress.bench.bench", lambda *args: timed.append(1) or [])
    args = ["bench", "--store", str(store), "--top-k", "1", "--limit", "1", "--repeats", "1", "--no-packed", "--json"]
    code, out, err = run_cli([*args, "--indexing-passages", "2"], monkeypatch, capfd)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "not packaged" in err and "--indexing-passages 0" in err
    assert timed == []
    code, out, err = run_cli([*args, "--indexing-passages", "0"], monkeypatch, capfd)
    assert code == 0, err
    assert timed == [1] and "indexing" not in json.loads(out)


def test_the_floor_prefills_the_question_under_selective_recompute(tiny_lm, passages_file, tmp_path, monkeypatch):
    """The recompute pass carries the question, so a request prepared with it already holds the
    first token: the floor once timed no prefill at all (0.002 ms) and called the whole cached
    TTFT cache work. It is the question's prefill over the assembled cache, recompute or not."""
    import ragcompress.runtime.generate as generate

    embedder = HashEmbedder()
    index(passages_file, tmp_path / "store", lm=tiny_lm, embedder=embedder, config=IndexConfig(embedder=embedder.name))
    prefilled: list[int] = []  # tokens of every prefill the token generator runs
    real = generate.prefill

    def counted(model, input_ids, *args, **kwargs):
        prefilled.append(len(input_ids))
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generate, "prefill", counted)
    question = Question("q", "Who won the game?", ["x"])
    # repeats 2 after a warm-up: the floor's 3 runs (+ plain reuse's 3)
    for recompute, question_alone in ((0.0, 6), (0.5, 3)):
        engine = Engine(KVStore.open(tmp_path / "store"), tiny_lm, embedder, AnswerOptions(recompute=recompute))
        try:
            suffix = len(engine.tokens.suffix(question.question))
            prefilled.clear()
            bench(engine, [question], [2], 2)
        finally:
            engine.close()
        assert prefilled.count(suffix) == question_alone, (recompute, suffix, prefilled)

    # the near-tie check prefills the question inside ``prepare`` too, and a near tie answers by
    # full prefill there: with a margin that always falls back (0.999) the floor's prepared request
    # once held the fallback's first token and timed nothing. Only the cached runs fall back.
    import ragcompress.runtime.engine as engine_module

    fell_back: list[int] = []
    real_fallback = engine_module.fallback_prefill

    def counted_fallback(*args, **kwargs):
        fell_back.append(1)
        return real_fallback(*args, **kwargs)

    monkeypatch.setattr(engine_module, "fallback_prefill", counted_fallback)
    engine = Engine(KVStore.open(tmp_path / "store"), tiny_lm, embedder, AnswerOptions(fallback_margin=0.999))
    try:
        bench(engine, [question], [2], 2)
    finally:
        engine.close()
    assert len(fell_back) == 3  # the cached side's warm-up and two repeats


def test_packed_attention_is_compared_on_plain_reuse_whatever_the_answer_options(
    tiny_model_dir, passages_file, tmp_path, monkeypatch, capfd
):
    """``bench --preset faithful`` on its int8 store once failed after every TTFT run: the packed
    side inherited the preset's recompute, which only an assembled cache takes (a calibrated
    store's temperature, likewise)."""
    from ragcompress.bench import packed_ttft_overhead
    from ragcompress.runtime.recompute import RecomputeConfig

    store = tmp_path / "store"
    index(passages_file, store, model=str(tiny_model_dir("llama")), config=IndexConfig(quant="int8"))
    args = ["bench", "--store", str(store), *"--top-k 2 --limit 1 --repeats 1 --indexing-passages 0".split()]
    code, out, err = run_cli([*args, "--preset", "faithful", "--json"], monkeypatch, capfd)
    assert code == 0, err
    packed = json.loads(out)["packed_attention"]
    assert packed["questions"] == 1 and packed["same_first_token"] == 1.0
    engine = Engine.open(store, options=AnswerOptions(recompute=RecomputeConfig(temperature=0.9)))
    try:
        assert packed_ttft_overhead(engine, ["Who won the game?"], 2, 1).same_first_token == 1.0
    finally:
        engine.close()


def test_alternating_ttft_leaves_each_runs_cold_first_run_out_of_its_median():
    """The frontier's side-by-side TTFT took 2 runs a question and no warm-up, so each median was
    the mean of a cold first run and a warm one. A warm-up round now runs every side untimed, the
    median is over the timed runs only, and ``first`` shifts which side leads each round."""
    from ragcompress.bench import alternating_ttft
    from ragcompress.runtime.engine import Answer

    calls: list[str] = []

    def run(name: str) -> Answer:
        calls.append(name)
        cold = calls.count(name) == 1  # only a side's first run pays the cold start
        return Answer(f"{name} {calls.count(name)}", [], 9.0 if cold else float(calls.count(name)), 0.0, [])

    medians, last = alternating_ttft({name: partial(run, name) for name in "abc"}, 3, first=1)
    assert calls == [*"abc", *"bca", *"cab", *"abc"]  # the warm-up, then timed rounds led by "b", "c", "a"
    assert medians == {"a": 3.0, "b": 3.0, "c": 3.0}  # timed runs 2, 3, 4: the cold 9.0 is not among them
    assert {name: answer.answer for name, answer in last.items()} == {"a": "a 4", "b": "b 4", "c": "c 4"}
    with pytest.raises(ValueError, match="repeats"):
        alternating_ttft({"a": partial(run, "a")}, 0)


def test_no_path_tokenizes_inside_its_ttft_clock(tiny_lm, passages_file, tmp_path, monkeypatch):
    """Full prefill tokenized its prompt before its clock started while a selective recompute
    tokenized the passages it reads inside the cached path's: the two TTFTs covered different
    work. Every path's tokens are now ready when its stream is made, before the clock."""
    from ragcompress.prompt import PromptTokens

    embedder = HashEmbedder()
    index(passages_file, tmp_path / "store", lm=tiny_lm, embedder=embedder, config=IndexConfig(embedder=embedder.name))
    calls: list[str] = []
    for piece in ("passage", "suffix"):  # what a request tokenizes (the prefix is tokenized once)
        real = getattr(PromptTokens, piece)
        monkeypatch.setattr(PromptTokens, piece, lambda self, text, real=real: calls.append(text) or real(self, text))
    engine = Engine(KVStore.open(tmp_path / "store"), tiny_lm, embedder, AnswerOptions(recompute=0.5))
    try:
        entries = engine.retrieve("Who won the game?", 2)
        for stream in (
            engine.stream_full("Who won the game?", entries),
            engine.stream_prefix_cached("Who won the game?", entries),
            engine.stream_cached("Who won the game?", entries),
        ):
            made = len(calls)
            assert made > 0
            stream.run()  # prepare (the clock's start) to the last token
            assert len(calls) == made, calls[made:]
    finally:
        engine.close()


def test_plot_without_matplotlib_names_the_bench_extra(tmp_path, monkeypatch):
    """A library caller of ``bench.plot`` without matplotlib gets the one-line error naming the
    extra, not a ModuleNotFoundError traceback (the CLI checks --plot before measuring)."""
    import sys

    from ragcompress.bench import plot
    from ragcompress.errors import RagCompressError

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RagCompressError, match=r"the bench extra \(pip install -e '\.\[bench\]' in a checkout\)"):
        plot([], tmp_path / "ttft.png")


def test_bench_json_records_every_run_key_the_report_checks(
    tiny_model_dir, passages_file, tmp_path, monkeypatch, capfd
):
    """``bench --json``'s ``meta`` was built by its own copy of the benchmarks' run metadata with
    fewer keys, so ``benchmarks/report.py`` flagged the library's own output as not recording
    ``questions`` and ``model``. The questions are the ones each row timed, the model the store's."""
    import report  # benchmarks/report.py, on pytest's pythonpath

    store = tmp_path / "store"
    index(passages_file, store, model=str(tiny_model_dir("llama")), config=IndexConfig(quant="int8"))
    args = ["bench", "--store", str(store), "--top-k", "1,2", "--limit", "2", "--repeats", "1", "--no-packed"]
    code, out, err = run_cli([*args, "--indexing-passages", "0", "--json"], monkeypatch, capfd)
    assert code == 0, err
    data = json.loads(out)
    meta = data["meta"]
    assert [key for key in report.META_KEYS if key not in report.recorded_meta({"meta": meta})] == []
    assert meta["questions"] == 2 == data["rows"][0]["questions"] and meta["model"] == data["model"]
    assert (meta["repeats"], meta["limit"]) == (1, 2)
