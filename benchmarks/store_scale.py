"""Stores at 1k, 10k and 100k passages, and indexing on Ray against one process (issue 18).

``scale``: builds synthetic stores with a tiny random model
(``ragcompress.testing.make_tiny_model``: caches of the real format, small; 512 of them encoded
through the write path and reused, see :func:`build_store`) and a 384-dim bag-of-words hash
embedder (``ragcompress.testing.HashEmbedder``: vectors with topic structure, as real embeddings
have), int8 caches. Passages are 20-60 words drawn from
one of 500 topics. Per size it reports

* query-side latency, measured in one process with the stores taken in turn, a block of 10
  queries per store at a time (so load from other processes hits every size alike; the same
  queries interleaved store by store, a pessimistic bound, are reported beside): ``search`` (FAISS + the catalogue rows of
  the hits), ``load`` (read, checksum, parse and dequantize the top-k segments), their sum;
  medians over the queries, with p90; ``reload``: the top hit's segment loaded once more right
  after (page-cached), which separates the read path's own cost from cache misses;
* open time and memory: a fresh process opens the store, loads its FAISS index (sha256 checked)
  and answers one search; wall time and the RSS it added (median of three processes);
* disk bytes (shards, catalogue, index, total) and the FAISS index the store chose with the
  recall@10 its manifest records, plus recall@10 of the benchmark's text queries against an
  exact scan of the same vectors.

``throughput``: SQuAD-dev passages through SmolLM2-135M and all-MiniLM-L6-v2 (the real models),
``index()`` in one process with 2 torch threads against ``index_on_ray`` with 2 actors of 1
thread each on a local Ray instance of 2 CPUs. Each run indexes a fresh store; runs alternate
(the order rotates from round to round), after one discarded Ray run (Ray's first job starts its
worker pool). A third method, one process with 1 thread, is the control that tells whether the
2-thread process loses to thread contention on a busy machine. Fixed costs (model loads, actor start) are separated
from the rate by running two input sizes: the marginal rate is ``(n2 - n1) / (t(n2) - t(n1))``
per method and round; end-to-end rates at n2 are reported too. The two stores of each size are
compared with ``store_digest`` (same rows and segment bytes).

    .venv/bin/python benchmarks/store_scale.py scale [--sizes 1000,10000,100000]
    .venv/bin/python benchmarks/store_scale.py throughput [--sizes 16,64] [--rounds 3]
    .venv/bin/python benchmarks/store_scale.py report    # prints the tables from the JSON

Results: docs/results/store_scale.json and docs/results/ray_throughput.json (``meta`` records the
git revision, date, load averages before/after, threads and sample). The machine is shared with
other sessions: ratios measured side by side are the figures to read, absolute times are noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "issue18"
RESULTS = ROOT / "docs" / "results"
SQUAD = ROOT.parent / "shared" / "data" / "squad-dev" / "passages.jsonl"
DIM = 384
TOPICS = 500
TOP_K = 3
BLOCK = 10  # queries a store answers back to back in the served timing (run_scale)


def meta(sample: str, model: str, threads: int, repeats: int, questions: int) -> dict[str, Any]:
    """``results_meta`` (the keys every results file records) and when, on what load and CPUs.
    (``common`` is imported here, not at the top: the ``probe`` subprocess measures a fresh
    process's memory, which torch would inflate.)"""
    from common import results_meta

    return {
        **results_meta({"threads": threads, "repeats": repeats, "questions": questions, "model": model}),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_before": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "sample": sample,
    }


# -- synthetic corpus ------------------------------------------------------------------------------


def _topic_words(topic: int) -> list[str]:
    return [f"t{topic}w{j}" for j in range(40)]


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` passages of 20-60 words: 70 % from the passage's topic, 30 % common words."""
    if path.is_file() and sum(1 for _ in open(path)) == n:
        return path
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for i in range(n):
            topic = int(rng.integers(TOPICS))
            length = int(rng.integers(20, 61))
            own = rng.random(length) < 0.7
            picks = [
                f"t{topic}w{a}" if o else f"c{b}"
                for o, a, b in zip(own, rng.integers(0, 40, length), rng.integers(0, 200, length), strict=True)
            ]
            out.write(json.dumps({"id": f"p{i:07d}", "text": " ".join(picks), "title": f"topic {topic}"}) + "\n")
    return path


def queries(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = _topic_words(int(rng.integers(TOPICS)))
        out.append(" ".join(words[int(j)] for j in rng.integers(0, 40, size=8)))
    return out


POOL = 512  # distinct caches encoded through the model; passage i stores cache i % POOL


def build_store(size: int, model_dir: Path) -> tuple[Path, float | None]:
    """The store of ``size`` passages (reused when complete); seconds to build it, None if reused.

    The first :data:`POOL` passages go through the whole write path (``Indexer.records``: the
    tiny model's forward, int8 quantization, the segment codec). Encoding 100k passages that way
    takes hours on this shared machine, so passage ``i`` stores the blob of pool passage
    ``i % POOL``, committed with its own id, text, text hash and embedding through
    ``StoreWriter.add``: the catalogue, the shards, the FAISS index and every read are those of
    a real store of ``size`` passages; only the cache bytes repeat.
    """
    from ragcompress.indexing import IndexConfig, Indexer
    from ragcompress.indexing.inputs import iter_passages
    from ragcompress.models import load_model
    from ragcompress.store import KVStore, PassageRecord, StoreWriter, create_store
    from ragcompress.testing import HashEmbedder

    store = RUNS / f"scale-{size}"
    if (store / "index.json").is_file():
        with KVStore.open(store) as opened:
            if len(opened) == size:
                return store, None
    shutil.rmtree(store, ignore_errors=True)
    corpus = write_corpus(RUNS / f"corpus-{size}.jsonl", size)
    embedder = HashEmbedder(DIM)
    start = time.perf_counter()
    indexer = Indexer.from_config(
        load_model(str(model_dir)), IndexConfig(quant="int8", embedder=embedder.name), embedder
    )
    create_store(store, indexer.manifest, indexer.prefix_kv)
    passages = iter_passages(corpus)
    with StoreWriter(store) as writer:
        pool: list[PassageRecord] = []
        while batch := [p for _, p in zip(range(1024), passages, strict=False)]:
            if len(pool) < POOL:
                pool += indexer.records(batch[: POOL - len(pool)])
            vectors = embedder.embed([p.text for p in batch])
            records = [
                PassageRecord(
                    id=p.id,
                    title=p.title,
                    text=p.text,
                    meta=p.meta,
                    text_sha=p.text_sha,
                    blob=pool[int(p.id[1:]) % POOL].blob,
                    num_tokens=pool[int(p.id[1:]) % POOL].num_tokens,
                    kept=pool[int(p.id[1:]) % POOL].kept,
                    embedding=vector,
                )
                for p, vector in zip(batch, vectors, strict=True)
            ]
            writer.add(records)
        writer.write_index()
    return store, time.perf_counter() - start


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(store: str) -> None:
    """Child process: open, load the index, one search; prints seconds and RSS added (MB)."""
    import faiss  # noqa: F401 - the library's own memory is not the store's

    from ragcompress.store import KVStore
    from ragcompress.testing import HashEmbedder

    vector = HashEmbedder(DIM).embed(queries(1))[0]
    before = _rss_mb()
    start = time.perf_counter()
    with KVStore.open(store) as opened:
        opened.index()
        hits = opened.search(vector, TOP_K)
        seconds = time.perf_counter() - start
        print(json.dumps({"open_s": seconds, "rss_added_mb": _rss_mb() - before, "hits": len(hits)}))


def _open_cost(store: Path, repeats: int = 3) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "probe", str(store)], capture_output=True, text=True, check=True
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "open_s": statistics.median(r["open_s"] for r in runs),
        "rss_added_mb": statistics.median(r["rss_added_mb"] for r in runs),
    }


def _disk(store: Path) -> dict[str, int]:
    shards = sum(p.stat().st_size for p in (store / "shards").iterdir())
    catalogue = sum(p.stat().st_size for p in store.glob("catalogue.sqlite*"))
    index = (store / "index.faiss").stat().st_size
    total = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    return {"shards": shards, "catalogue": catalogue, "index": index, "total": total}


def _recall(opened: Any, vectors: np.ndarray, k: int = 10) -> float | None:
    """recall@k of the store's index against an exact scan of its own vectors (None for flat)."""
    import faiss

    from ragcompress.store.ann import stored_vectors

    index = opened.index().index
    if isinstance(faiss.downcast_index(index.index), faiss.IndexFlat):
        return None
    stored = stored_vectors(index)
    assert stored is not None, "a store's index is flat or IVF-Flat, which hold their vectors"
    exact = faiss.IndexFlatIP(index.d)
    exact.add(stored)
    _, truth = exact.search(vectors, k)
    ids = faiss.vector_to_array(index.id_map)
    _, found = index.search(vectors, k)
    return float(np.mean([len(set(ids[t].tolist()) & set(f.tolist())) / k for t, f in zip(truth, found, strict=True)]))


REAL_STORE = ROOT / "runs" / "squad-smollm2-135m-int8"


def _real_segment_load_ms(n_queries: int) -> float | None:
    """Median time to load TOP_K random segments of a real store (SmolLM2-135M int8 on SQuAD, ~2 MB
    each, page-cached), or None without that store. The synthetic stores' tiny-model segments are
    ~34 KB, so their load is a far smaller share of a query than a real model's: the size
    independence of the read path is measured on them, and this figure says what the measured
    search costs amount to beside real segments (an estimate: the two are timed separately)."""
    from ragcompress.store import KVStore

    if not (REAL_STORE / "manifest.json").is_file():
        return None
    rng = np.random.default_rng(0)
    with KVStore.open(REAL_STORE) as opened:
        entries = list(opened.catalogue.entries())
        for entry in entries:  # every segment read once first: the timed reads are page-cached
            opened.load_kv(entry)
        times = []
        for _ in range(n_queries):
            picked = [entries[i] for i in rng.choice(len(entries), TOP_K, replace=False)]
            start = time.perf_counter()
            for entry in picked:
                opened.load_kv(entry)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build_stores(sizes: list[int]) -> None:
    """Child process of :func:`run_scale`: every store built (reused when complete) with today's
    index type; prints ``{size: build seconds or null}``."""
    from ragcompress.store import Manifest, StoreWriter
    from ragcompress.store.ann import index_params
    from ragcompress.testing import make_tiny_model

    model_dir = make_tiny_model("llama", RUNS / "tiny-llama")
    seconds = {}
    for size in sizes:
        store, seconds[size] = build_store(size, model_dir)
        if Manifest.read(store).index.get("type") != index_params(size)["type"]:  # built before IVF
            with StoreWriter(store) as writer:
                writer.write_index()
    print(json.dumps(seconds))


def time_stores(sizes: list[int], n_queries: int, rounds: int) -> None:
    """Child process of :func:`run_scale`: opens the stores (never builds them, as a server),
    times them and prints ``{size: {part: median ms, part_p90: ms}}``."""
    from ragcompress.store import KVStore
    from ragcompress.testing import HashEmbedder

    vectors = HashEmbedder(DIM).embed(queries(n_queries))
    stores = {size: KVStore.open(RUNS / f"scale-{size}") for size in sizes}
    # Warm-up: one untimed pass of the same queries, so the timed rounds read page-cached
    # segments and catalogue pages, as a server does once its working set is cached. (Reading
    # every store file into the page cache first instead, 4 GB at 100k, slowed the 100k searches
    # that followed 1.5-4x on this host: memory management work on the large index's pages.)
    for opened in stores.values():
        opened.index()
        for vector in vectors:
            for entry, _ in opened.search(vector, TOP_K):
                opened.load_kv(entry)
    timings: dict[int, dict[str, list[float]]] = {
        s: {"search": [], "load": [], "total": [], "reload": [], "interleaved": []} for s in sizes
    }

    def query(opened: KVStore, vector: np.ndarray) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        hits = opened.search(vector, TOP_K)
        t1 = time.perf_counter()
        for entry, _ in hits:
            opened.load_kv(entry)
        t2 = time.perf_counter()
        opened.load_kv(hits[0][0])  # the same segment again: a read from the page cache
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3

    for r in range(rounds):
        # Served: BLOCK queries to one store, then the next (rotating), as a process serving one
        # store runs its queries back to back, its index's hot parts staying in the CPU caches.
        for b in range(0, len(vectors), BLOCK):
            turn = b // BLOCK + r
            for size in sizes[turn % len(sizes) :] + sizes[: turn % len(sizes)]:
                for vector in vectors[b : b + BLOCK]:
                    search, load, reload = query(stores[size], vector)
                    timings[size]["search"].append(search)
                    timings[size]["load"].append(load)
                    timings[size]["total"].append(search + load)
                    timings[size]["reload"].append(reload)
        # Interleaved query by query: every store's index is evicted from the CPU caches by the
        # others' between two of its queries (a pessimistic bound, reported beside the first).
        for i, vector in enumerate(vectors):
            for size in sizes[(i + r) % len(sizes) :] + sizes[: (i + r) % len(sizes)]:
                search, load, _ = query(stores[size], vector)
                timings[size]["interleaved"].append(search + load)
    summary = {
        size: {
            **{part: statistics.median(values) for part, values in parts.items()},
            **{f"{part}_p90": float(np.percentile(values, 90)) for part, values in parts.items()},
        }
        for size, parts in timings.items()
    }
    print(json.dumps(summary))


def run_scale(sizes: list[int], n_queries: int, rounds: int, processes: int) -> dict[str, Any]:
    from ragcompress.store import KVStore
    from ragcompress.testing import HashEmbedder

    info = meta("synthetic", "tiny random llama (2 layers, 2 kv heads, head_dim 16)", 1, rounds, n_queries)
    # Built (or brought up to date) in a child process, and timed in `processes` fresh ones: a
    # timing process only opens and queries, as a server does. The same code and stores gave
    # 100k searches of 0.5-3 ms from one process to the next (the host's memory state: in the
    # process that had just rebuilt the indexes 1.6 ms, after reading 4 GB into the page cache
    # 3.1 ms), so one process is one sample and the figures below are medians over processes.
    sizes_arg = ",".join(map(str, sizes))
    out = subprocess.run(
        [sys.executable, __file__, "build", "--sizes", sizes_arg], capture_output=True, text=True, check=True
    ).stdout
    built = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    samples = []
    for _ in range(processes):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "time",
                "--sizes",
                sizes_arg,
                "--queries",
                str(n_queries),
                "--rounds",
                str(rounds),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        samples.append({int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()})
    vectors = HashEmbedder(DIM).embed(queries(n_queries))
    smallest = sizes[0]
    rows = []
    for size in sizes:
        with KVStore.open(RUNS / f"scale-{size}") as opened:
            row: dict[str, Any] = {"passages": size, "build_s": built[size], "index": opened.manifest.index}
            for part in samples[0][size]:
                row[f"{part}_ms"] = statistics.median(sample[size][part] for sample in samples)
            for part in ("total", "search", "load", "interleaved"):
                ratios = [sample[size][part] / sample[smallest][part] for sample in samples]
                row[f"{part}_vs_smallest"] = statistics.median(ratios)
                row[f"{part}_vs_smallest_range"] = [min(ratios), max(ratios)]
            row["query_recall_at_10"] = _recall(opened, vectors)
            row["disk_bytes"] = _disk(opened.path)
        row["segment_bytes_mean"] = row["disk_bytes"]["shards"] / size
        row.update(_open_cost(RUNS / f"scale-{size}"))
        rows.append(row)
    real = _real_segment_load_ms(n_queries)
    for row in rows:
        if real is not None:  # the measured search of this size plus a real top-3 load (see above)
            row["with_real_segments_vs_smallest"] = (row["search_ms"] + real) / (rows[0]["search_ms"] + real)
    info["load_after"] = list(os.getloadavg())
    return {
        "meta": info,
        "top_k": TOP_K,
        "dim": DIM,
        "block": BLOCK,
        "processes": processes,
        "real_segment_store": str(REAL_STORE.relative_to(ROOT)),
        "real_segment_load_ms": real,
        "page_cache": "one untimed pass of the same queries before timing",
        "target_total_vs_smallest": 1.2,
        "rows": rows,
    }


# -- Ray against one process -----------------------------------------------------------------------


def _subset(n: int) -> Path:
    path = RUNS / f"squad-{n}.jsonl"
    lines = SQUAD.read_text().splitlines()[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_throughput(sizes: list[int], rounds: int, batch_size: int) -> dict[str, Any]:
    import ray
    import torch

    from ragcompress.indexing import IndexConfig, index
    from ragcompress.indexing.ray_runner import index_on_ray
    from ragcompress.store.digest import store_digest

    info = meta("squad-dev passages (first n)", "smollm2-135m", 2, rounds, 0)
    config = IndexConfig(quant="int8")
    inputs = {n: _subset(n) for n in sizes}
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster_s = time.perf_counter() - start
    runs: list[dict[str, Any]] = []
    same: dict[int, bool] = {}

    def single(n: int, store: Path) -> None:
        torch.set_num_threads(2)
        index(inputs[n], store, model="smollm2-135m", config=config, batch_size=batch_size)

    def on_ray(n: int, store: Path) -> None:
        torch.set_num_threads(1)  # the driver's own work (validation, prefix) on one thread
        index_on_ray(
            inputs[n],
            store,
            model="smollm2-135m",
            config=config,
            batch_size=batch_size,
            workers=2,
            threads_per_worker=1,
        )

    def single_1t(n: int, store: Path) -> None:
        torch.set_num_threads(1)
        index(inputs[n], store, model="smollm2-135m", config=config, batch_size=batch_size)

    methods = {"single": single, "ray": on_ray, "single_1t": single_1t}
    start = time.perf_counter()
    on_ray(sizes[0], RUNS / "tp-warmup")  # Ray's first job starts its worker pool: not a rate
    warmup_s = time.perf_counter() - start
    shutil.rmtree(RUNS / "tp-warmup", ignore_errors=True)
    for r in range(rounds):
        order = list(methods)[r % 3 :] + list(methods)[: r % 3]
        for n in sizes:
            for name in order:
                store = RUNS / f"tp-{name}-{n}"
                shutil.rmtree(store, ignore_errors=True)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                methods[name](n, store)
                seconds = time.perf_counter() - t0
                runs.append({"round": r, "method": name, "passages": n, "seconds": seconds, "load1": load})
                print(f"round {r} {name:6s} n={n:4d} {seconds:7.1f} s (load {load:.1f})", flush=True)
            if r == 0:
                same[n] = store_digest(RUNS / f"tp-single-{n}") == store_digest(RUNS / f"tp-ray-{n}")
    ray.shutdown()
    n1, n2 = sizes[0], sizes[-1]
    per_round = []
    for r in range(rounds):
        t = {(x["method"], x["passages"]): x["seconds"] for x in runs if x["round"] == r}
        entry: dict[str, float] = {"round": r}
        for name in methods:
            entry[f"{name}_marginal_pps"] = (n2 - n1) / (t[(name, n2)] - t[(name, n1)])
            entry[f"{name}_end_to_end_pps"] = n2 / t[(name, n2)]
        entry["marginal_ratio"] = entry["ray_marginal_pps"] / entry["single_marginal_pps"]
        entry["end_to_end_ratio"] = entry["ray_end_to_end_pps"] / entry["single_end_to_end_pps"]
        entry["single_1t_vs_single_marginal"] = entry["single_1t_marginal_pps"] / entry["single_marginal_pps"]
        per_round.append(entry)
    summary = {key: statistics.median(e[key] for e in per_round) for key in per_round[0] if key != "round"}
    info["load_after"] = list(os.getloadavg())
    return {
        "meta": info,
        "batch_size": batch_size,
        "sizes": sizes,
        "ray_cluster_start_s": cluster_s,
        "ray_warmup_run_s": warmup_s,
        "same_bytes": {str(n): v for n, v in same.items()},
        "target_ratio": 0.9,
        "runs": runs,
        "rounds": per_round,
        "median": summary,
    }


# -- 10M passages, simulated -----------------------------------------------------------------------


def _commit_rate(rows: int = 20_000, batch: int = 8) -> float:
    """Catalogue rows/s the driver commits (one transaction per batch, as ``index_on_ray``), measured
    on a fresh catalogue with SQuAD-sized rows (700-character text, 384-dim embedding)."""
    import tempfile

    from ragcompress.indexing.ray_runner import catalogue_rows
    from ragcompress.store.catalogue import Catalogue
    from ragcompress.store.record import PassageRecord
    from ragcompress.store.writer import catalogue_row

    vector = np.zeros(DIM, dtype=np.float32)
    vector[0] = 1.0
    text = "x" * 700
    # each batch as a Ray actor returns it (catalogue_row, then the rows as JSON and the embeddings
    # as one byte string), made before the clock; the driver's part is timed: decoding the batch
    # (ray_runner.catalogue_rows) and committing it. The blobs are never written.
    blob = b"\0" * 100
    batches = []
    for b in range(rows // batch):
        made = [
            catalogue_row(PassageRecord(f"p{n}", "t", text, {}, "0" * 64, blob, 150, 150, vector), "00000.kvs", n * 100)
            for n in range(b * batch, (b + 1) * batch)
        ]
        embeddings = b"".join(row.pop("embedding") for row in made)
        batches.append((json.dumps(made), embeddings))
    RUNS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=RUNS) as tmp:
        catalogue = Catalogue(Path(tmp), readonly=False)
        start = time.perf_counter()
        for rows_json, embeddings in batches:
            catalogue.add(catalogue_rows(rows_json, embeddings))
        seconds = time.perf_counter() - start
        catalogue.close()
    return rows / seconds


def simulate(passages: int, workers: int, batch: int, actor_pps: float, commit_pps: float, seed: int = 0) -> float:
    """Seconds for ``passages`` through ``workers`` actors and one in-order committing driver.

    Discrete events: each actor takes the next batch when free; a batch's encode time is
    proportional to its padded length (8 SQuAD-dev passages drawn at random: a batch costs its
    longest passage times its size), scaled so that one actor's mean rate is ``actor_pps``; the
    driver commits batches in input order, each taking ``batch / commit_pps``, so a slow batch
    holds back the ones after it (head-of-line blocking) and the driver can become the bottleneck.
    """
    import heapq

    lengths = np.array([len(json.loads(line)["text"].split()) for line in SQUAD.read_text().splitlines()])
    rng = np.random.default_rng(seed)
    n_batches = passages // batch
    padded = lengths[rng.integers(0, len(lengths), size=(n_batches, batch))].max(axis=1).astype(np.float64)
    service = padded / padded.mean() * (batch / actor_pps)
    free = [0.0] * workers
    heapq.heapify(free)
    done = np.empty(n_batches)
    for b in range(n_batches):
        start = heapq.heappop(free)
        done[b] = start + service[b]
        heapq.heappush(free, done[b])
    commit, clock = batch / commit_pps, 0.0
    for b in range(n_batches):
        clock = max(clock, done[b]) + commit
    return clock


def run_estimate(passages: int) -> dict[str, Any]:
    """10M passages on N nodes of 16 cores, from this machine's measured rates (module doc)."""
    from ragcompress.store import KVStore
    from ragcompress.store.ann import index_params, nlist_for
    from ragcompress.store.kvstore import build_index

    tp = json.loads((RESULTS / "ray_throughput.json").read_text())
    info = meta("estimate from measured rates", "smollm2-135m", 1, 1, 0)
    # One actor's steady rate: the 1-thread process's marginal rate (the same Indexer.records on
    # one thread, startup excluded). Ray's own marginal rate is not used: its start-up costs
    # varied more than the work between the two input sizes (negative in some rounds).
    actor_pps = tp["median"]["single_1t_marginal_pps"]
    commit_pps = _commit_rate()
    n0 = 100_000  # an IVF build of the 100k store, timed here (k-means on the sample, then every add)
    with KVStore.open(RUNS / f"scale-{n0}") as opened:
        start = time.perf_counter()
        build_index(opened.catalogue, index_params(n0, flat_max=0))
        build_s = time.perf_counter() - start
    # Training (k-means over <= 256 points per cell) and adding (each vector against every
    # centroid) both cost at most N x nlist x dim: scale the measured build by N x nlist(N).
    build_at = build_s * (passages * nlist_for(passages)) / (n0 * nlist_for(n0))
    real = ROOT / "runs" / "squad-smollm2-135m-int8"
    with KVStore.open(real) as opened:
        entries = list(opened.catalogue.entries())
        blob_per_passage = sum(e.length for e in entries) / len(entries)
    catalogue_per_passage = (real / "catalogue.sqlite").stat().st_size / len(entries)
    rows = []
    for nodes in (1, 4, 16, 64):
        workers = nodes * 16
        seconds = simulate(passages, workers, 8, actor_pps, commit_pps)
        rows.append(
            {
                "nodes": nodes,
                "workers": workers,
                "encode_and_commit_h": seconds / 3600,
                "index_build_h": build_at / 3600,
                "total_h": (seconds + build_at) / 3600,
                "driver_bound": bool(passages / commit_pps >= 0.9 * seconds),
            }
        )
    info["load_after"] = list(os.getloadavg())
    return {
        "meta": info,
        "passages": passages,
        "actor_pps": actor_pps,
        "driver_commit_rows_per_s": commit_pps,
        "index_type_at_estimate": index_params(passages),
        "index_build_s_measured": build_s,
        "index_build_measured_at": n0,
        "index_build_h_estimated": build_at / 3600,
        "segment_bytes_per_passage": blob_per_passage,
        "catalogue_bytes_per_passage": catalogue_per_passage,
        "store_tb": passages * (blob_per_passage + catalogue_per_passage) / 1e12,
        "index_gb": passages * (DIM * 4 + 8 + 8) / 1e9,  # IVF-Flat: vector, list id, id map
        "rows": rows,
    }


# -- tables ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    scale = sub.add_parser("scale")
    scale.add_argument("--sizes", default="1000,10000,100000")
    scale.add_argument("--queries", type=int, default=200)
    scale.add_argument("--rounds", type=int, default=3)
    scale.add_argument("--processes", type=int, default=3, help="fresh timing processes (medians over them)")
    tm = sub.add_parser("time")
    tm.add_argument("--sizes", default="1000,10000,100000")
    tm.add_argument("--queries", type=int, default=200)
    tm.add_argument("--rounds", type=int, default=3)
    tp = sub.add_parser("throughput")
    tp.add_argument("--sizes", default="16,64")
    tp.add_argument("--rounds", type=int, default=3)
    tp.add_argument("--batch-size", type=int, default=8)
    est = sub.add_parser("estimate")
    est.add_argument("--passages", type=int, default=10_000_000)
    bu = sub.add_parser("build")
    bu.add_argument("--sizes", default="1000,10000,100000")
    pr = sub.add_parser("probe")
    pr.add_argument("store")
    sub.add_parser("report")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "probe":
        probe(args.store)
        return
    if args.command == "build":
        build_stores([int(s) for s in args.sizes.split(",")])
        return
    if args.command == "time":
        time_stores([int(s) for s in args.sizes.split(",")], args.queries, args.rounds)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.command == "scale":
        result = run_scale([int(s) for s in args.sizes.split(",")], args.queries, args.rounds, args.processes)
        (RESULTS / "store_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "throughput":
        result = run_throughput([int(s) for s in args.sizes.split(",")], args.rounds, args.batch_size)
        (RESULTS / "ray_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    elif args.command == "estimate":
        result = run_estimate(args.passages)
        (RESULTS / "scale_estimate.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.path.insert(0, str(Path(__file__).parent))
    from report import render_store_scale

    print(render_store_scale(RESULTS))


if __name__ == "__main__":
    main()
