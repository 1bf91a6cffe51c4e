"""Peak RSS and throughput of indexing as the corpus grows (docs/guarantees.md, "Bounded memory").

Each measurement runs in a fresh subprocess: a tiny random llama (2 layers, 2 KV heads, head_dim
16), a deterministic hash embedder of dimension 384 (all-MiniLM-L6-v2's), int8 caches, batch 8.
The worker samples its own RSS every 20 ms while ``index()`` runs and reports the peak above the
RSS it had before indexing (imports and model already loaded), so start-up cost is not counted
as indexing memory; separately for the passage loop (read, encode, compress, commit) and for
the whole run, which ends by building the FAISS index (inherently passages x dim x 4 bytes). The smallest corpus is the baseline; larger ones are reported as ratios (``peak RSS x`` is of
the whole process's peak, interpreter and model included: read it beside the growth columns,
which are what indexing adds).

Also measures ``validate()`` (the streaming input pass) on JSONL files of growing size.

    .venv/bin/python benchmarks/index_memory.py                 # 1k and 10k passages
    .venv/bin/python benchmarks/index_memory.py --sizes 1000,10000 --validate-mb 20,200 --json
    .venv/bin/python benchmarks/index_memory.py --out docs/results/index_memory.json   # docs/guarantees.md's tables

``--out`` writes the rows with the run's metadata (``common.results_meta``: revision, threads)
and the date; ``benchmarks/report.py`` renders docs/guarantees.md's tables from that file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np

EMBED_DIM = 384
WORDS = (
    "river castle comet violin glacier bridge harbor lantern meadow orbit canyon archive "
    "signal forest quartz ember delta summit"
).split()


class HashEmbedder:
    """Deterministic unit vectors from sha512 of the text (no model: isolates indexing memory)."""

    name = "hash-embedder-384"

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), EMBED_DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha512(text.encode()).digest()[:8], "little")
            out[i] = np.random.default_rng(seed).standard_normal(EMBED_DIM)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples this process's RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def write_corpus(path: Path, n: int) -> None:
    with open(path, "w") as handle:
        for i in range(n):
            words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12 + i % 9))
            handle.write(json.dumps({"id": f"p{i:07d}", "text": f"Passage {i}: {words}."}) + "\n")


def write_mb(path: Path, megabytes: int) -> int:
    """A JSONL of ~``megabytes`` MB of 2 KB passages; returns the passage count."""
    body = " ".join(WORDS) + " "
    text = (body * (2000 // len(body) + 1))[:2000]
    n = megabytes * (1 << 20) // (len(text) + 40)
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"doc-{i:08d}", "text": text}) + "\n")
    return n


def worker_index(model_dir: str, corpus: str, store: str, batch_size: int) -> dict:
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.models import load_model
    from ragcompress.store.writer import StoreWriter

    lm = load_model(model_dir)
    before = rss_bytes()
    loop_peak: dict[str, int] = {}
    write_index = StoreWriter.write_index

    def timed_write_index(self: StoreWriter, params: dict[str, Any] | None = None) -> None:
        """Split the passage loop from the index build."""
        loop_peak["bytes"] = max(sampler.peak, rss_bytes())
        write_index(self, params)

    start = time.perf_counter()
    with patch.object(StoreWriter, "write_index", timed_write_index), PeakSampler() as sampler:
        report = index(
            corpus,
            store,
            lm=lm,
            embedder=HashEmbedder(),
            config=IndexConfig(quant="int8", embedder=HashEmbedder.name),
            batch_size=batch_size,
        )
    seconds = time.perf_counter() - start
    store_bytes = sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())
    return {
        "passages": report.indexed,
        "seconds": seconds,
        "passages_per_s": report.indexed / seconds,
        "rss_before_mb": before / 2**20,
        "peak_rss_mb": sampler.peak / 2**20,
        "indexing_rss_mb": (sampler.peak - before) / 2**20,
        "loop_rss_mb": (loop_peak["bytes"] - before) / 2**20,
        "store_mb": store_bytes / 2**20,
    }


def worker_validate(corpus: str) -> dict:
    from ragcompress.indexing.inputs import validate

    before = rss_bytes()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        count = validate(corpus)
    return {
        "passages": count,
        "input_mb": os.path.getsize(corpus) / 2**20,
        "seconds": time.perf_counter() - start,
        "rss_before_mb": before / 2**20,
        "peak_rss_mb": sampler.peak / 2**20,
        "validate_rss_mb": (sampler.peak - before) / 2**20,
    }


def run_worker(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="corpus sizes (passages), smallest = baseline")
    parser.add_argument("--validate-mb", default="20,200", help="JSONL sizes (MB) for the validate() pass; '' skips")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (with the run's metadata)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "index":
            model_dir, corpus, store, batch_size = rest
            result = worker_index(model_dir, corpus, store, int(batch_size))
        else:
            result = worker_validate(*rest)
        print(json.dumps(result))
        return

    from ragcompress.testing import make_tiny_model

    rows, validations = [], []
    with tempfile.TemporaryDirectory(prefix="index-memory-") as tmp:
        root = Path(tmp)
        model_dir = make_tiny_model("llama", root / "tiny")
        for n in [int(s) for s in args.sizes.split(",")]:
            corpus = root / f"corpus-{n}.jsonl"
            write_corpus(corpus, n)
            rows.append(
                run_worker("index", str(model_dir), str(corpus), str(root / f"store-{n}"), str(args.batch_size))
            )
            print(f"indexed {n}: {rows[-1]}", file=sys.stderr)
        for mb in [int(s) for s in args.validate_mb.split(",") if s]:
            corpus = root / f"input-{mb}mb.jsonl"
            write_mb(corpus, mb)
            validations.append(run_worker("validate", str(corpus)))
            corpus.unlink()
            print(f"validated {mb} MB: {validations[-1]}", file=sys.stderr)

    base = rows[0]
    for row in rows:
        row["passages_ratio"] = row["passages"] / base["passages"]
        row["peak_rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        row["throughput_ratio"] = row["passages_per_s"] / base["passages_per_s"]
    for row in validations:
        row["input_ratio"] = row["input_mb"] / validations[0]["input_mb"]
        row["peak_rss_ratio"] = row["peak_rss_mb"] / validations[0]["peak_rss_mb"]
    if args.out is not None:
        from common import results_meta

        meta = {**results_meta(vars(args)), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        meta["argv"] = sys.argv[1:]
        args.out.write_text(json.dumps({"meta": meta, "index": rows, "validate": validations}, indent=1) + "\n")
    if args.json:
        print(json.dumps({"index": rows, "validate": validations}))
        return
    from report import index_memory_tables  # docs/guarantees.md's tables are rendered by the same code

    print(index_memory_tables({"index": rows, "validate": validations}))


if __name__ == "__main__":
    main()
