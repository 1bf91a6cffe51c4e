"""Code the benchmark scripts share (not part of the library). A script imports another only to
reuse its work: ``kv_split_probe`` reads ``lowrank_frontier``'s workdir, ``fallback_threshold``
``recompute_quality``'s checkpoints, ``gpu_kernel_bench`` ``kernel_bench``'s cases, ``store_scale``
``report``'s tables.

* data and rows: the SQuAD-dev sample (:data:`SQUAD`, :func:`pick_questions`), row names and
  plots of the compression benchmarks (:func:`row_name`, :func:`side_row`,
  :func:`plot_against_compression`);
* teacher forcing on the one query path: a request is prepared by the engine
  (``Engine.prepare``, ``Engine.stream_cached`` / ``stream_full``, ``runtime.prepare.full_prefill``)
  and :func:`teacher_forced_logprobs` reads the prompt and an answer over its cache with every
  position's logits kept (``ragcompress.runtime.generate``); :func:`run_keeping_request` and :func:`rewind` do it after the same
  request was decoded (timed) by its :class:`~ragcompress.runtime.generate.TokenStream`;
* synthetic fixtures and timing for the kernel benchmark (:class:`~ragcompress.testing.PlainRotary`,
  :func:`synthetic_segments`, :func:`median_time`);
* ``ragcompress serve`` started in a subprocess for the service benchmarks (:class:`Service`),
  the questions they ask (:func:`question_texts`) and the requests they send (:func:`chat_body`).

Scripts in this folder import it as ``from common import ...`` (they run as
``.venv/bin/python benchmarks/NAME.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ragcompress.errors import InputError, StoreError
from ragcompress.evaluation import Question, article_key, read_questions, select_questions
from ragcompress.kv import PassageKV
from ragcompress.kv.quant import QuantConfig
from ragcompress.provenance import META_KEYS, ROW_KEYS, run_meta
from ragcompress.provenance import row_run as row_run  # re-exported
from ragcompress.runtime.generate import rewind as rewind  # re-exported
from ragcompress.runtime.generate import run_keeping_request as run_keeping_request  # re-exported
from ragcompress.runtime.generate import teacher_forced_logprobs as teacher_forced_logprobs  # re-exported
from ragcompress.store import codec
from ragcompress.testing import PlainRotary

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-dev"
KVPRESS = "kvpress-"  # scores computed by benchmarks/kvpress_scores.py with NVIDIA kvpress's presses


# -- questions, rows and plots of the compression benchmarks ------------------------------------


def question_article(question: Question) -> str:
    """The article a SQuAD question is about (:attr:`Question.article`); exits when it has none."""
    article = question.article
    if article is None:
        raise SystemExit(f"question {question.id} has no passage_id, so no article")
    return article


def pick_questions(path: Path, n: int, articles: set[str] | None = None, outside: int | None = None) -> list[Question]:
    """``n`` evenly spaced questions, of ``articles`` only if given, and not among the ``outside``
    that ``n=outside`` picks if given (:func:`ragcompress.evaluation.select_questions`, as
    ``ragcompress eval --sample --article --outside``)."""
    try:
        return select_questions(read_questions(path), n, sorted(articles or ()), outside)
    except InputError as exc:
        raise SystemExit(f"{path}: {exc}") from None


def adaptor_provenance(adaptor: Any, asked: set[str], where: str = "the adaptor") -> dict[str, Any]:
    """What a store's KV-Distill adaptor is, for a results file; refused (``SystemExit``) when it
    was trained on an article the questions ask about, or on unrecorded ones: every figure of an
    adaptor comes from articles it never saw."""
    meta = adaptor.meta
    trained = set(meta.get("train_articles", []))
    if {article_key(a) for a in trained} & {article_key(a) for a in asked} or not trained:
        raise SystemExit(
            f"{where} was trained on {sorted(trained) or 'unrecorded articles'}; the questions ask {sorted(asked)}"
        )
    return {
        "hash": adaptor.hash,
        "train_articles": sorted(trained),
        **{k: meta.get(k) for k in ("method", "ratio", "quant", "lowrank")},
        **({"value_norm": True} if meta.get("value_norm") else {}),  # trained for value-weighted rows
        "steps": meta.get("metrics", {}).get("steps"),
    }


def store_adaptors(stores: dict[str, str], asked: set[str], adaptor_dirs: list[Path] | None = None) -> dict[str, dict]:
    """The KV-Distill adaptor of each store (by name) built with one, found among the packaged
    adaptors or ``adaptor_dirs``; refused (:func:`adaptor_provenance`) if it was trained on an
    article the questions ask about, or if it is neither packaged nor given. A path that is no
    store, or no adaptor, is the library's error as one line (``SystemExit``), not a traceback."""
    from ragcompress.distill.adaptor import Adaptor
    from ragcompress.distill.packaged import packaged_adaptor
    from ragcompress.store.manifest import Manifest

    try:
        given = {a.hash: a for a in (Adaptor.load(d) for d in adaptor_dirs or [])}
    except InputError as exc:
        raise SystemExit(f"--adaptor-dir: {exc}") from None
    found = {}
    for name, path in stores.items():
        try:
            recorded = Manifest.read(Path(path)).adaptor_hash
        except StoreError as exc:
            raise SystemExit(f"store {name}: {exc}") from None
        if recorded is None:
            continue
        adaptor = given.get(recorded) or packaged_adaptor(recorded)
        if adaptor is None:
            raise SystemExit(
                f"store {name}: adaptor {recorded[:16]} is neither packaged nor given with --adaptor-dir "
                "(its training articles are unknown)"
            )
        found[name] = adaptor_provenance(adaptor, asked, f"store {name}'s adaptor")
    return found


LIBRARY = Path(__file__).resolve().parents[1] / "ragcompress"
# the library modules that turn a passage into its cache: a change to any of them recomputes a
# benchmark's cached passage caches, scores and calibration moments (load_keyed)
ENCODING_CODE = ("architecture.py", "models.py", "prompt.py", "indexing/encoder.py", "kv", "distill/adaptor.py")


def library_digest(*parts: str) -> str:
    """sha256 over the code of the library modules ``parts`` (paths under ``ragcompress/``, files
    or folders): what a benchmark's cached intermediate results were computed by. A cache keyed by
    it is recomputed after that code changes, and reused across every other commit, including
    those that only edit docstrings, comments, formatting or annotations (:func:`_behaviour`)."""
    import hashlib

    digest = hashlib.sha256()
    for part in sorted(parts):
        path = LIBRARY / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(LIBRARY)).encode() + b"\0" + _behaviour(file).encode() + b"\0")
    return digest.hexdigest()[:16]


def _behaviour(file: Path) -> str:
    """The module's syntax tree (``ast.dump``: no comments, formatting or line numbers) less what
    never runs (:class:`_Unrun`). The dump is Python's, so another Python version recomputes the
    caches once."""
    return ast.dump(_Unrun().visit(ast.parse(file.read_bytes(), filename=str(file))))


class _Unrun(ast.NodeTransformer):
    """Drops string statements (docstrings: a changed ``__doc__`` changes no result) and the
    annotations of function arguments and returns and of annotated assignments in functions and
    at module level (the assignment and its target stay: they bind a name, or make it local). The
    annotations of a class body stay as written: they make dataclass fields (``ClassVar`` and
    ``InitVar`` are not fields) and pydantic fields with their validation."""

    def visit_Expr(self, node: ast.Expr) -> ast.Expr | None:
        is_string = isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        return None if is_string else node

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        arguments = node.args
        for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]:
            if arg is not None:
                arg.annotation = None
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AnnAssign:
        node.annotation = ast.Constant(None)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        body = [stmt if isinstance(stmt, ast.AnnAssign) else self.visit(stmt) for stmt in node.body]
        node.body = [stmt for stmt in body if stmt is not None]
        return node


def encoding_key(lm: Any, prefix_ids: list[int], *code: str) -> dict[str, Any]:
    """What a passage's cache (and anything computed from it) depends on, for :func:`load_keyed`:
    the model's weights, dtype and tokenizer, the prompt prefix, and the library code that
    encodes (:data:`ENCODING_CODE`) plus the modules ``code`` names (e.g. ``compressors``)."""
    return {
        "model": lm.fingerprint,
        "dtype": lm.dtype_name,
        "tokenizer": lm.tokenizer_hash,
        "prefix": tokens_digest(prefix_ids),
        "code": library_digest(*ENCODING_CODE, *code),
    }


def tokens_digest(token_ids: list[int]) -> str:
    """A short digest of a passage's token ids (what a per-passage cache entry was computed from)."""
    import hashlib

    return hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()[:16]


def load_keyed(path: Path, key: dict[str, Any], token_ids: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The per-passage tensors a benchmark cached at ``path`` (safetensors, one tensor per
    ``{passage id}/{name}``), kept only where they are still right: the file must have been
    written under ``key`` (model fingerprint, adaptor, scorer, the library code that computed it,
    ...), and each passage's entries under its current ``token_ids``. Anything else is left out
    (and said so), so it is recomputed rather than silently reused. Until 2026-12-06 these caches
    were pickles named by scorer alone, reused whatever had changed since they were written."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        written = json.loads(meta.get("key", "null"))
        if written != key:
            changed = sorted(k for k in set(key) | set(written or {}) if (written or {}).get(k) != key.get(k))
            print(f"{path.name}: written under another {', '.join(changed) or 'key'}; recomputing it", flush=True)
            return {}
        digests = json.loads(meta.get("tokens", "{}"))
        fresh = {pid for pid, ids in token_ids.items() if digests.get(pid) == tokens_digest(ids)}
        return {name: f.get_tensor(name) for name in f.keys() if name.rsplit("/", 1)[0] in fresh}


def cached_scores(
    path: Path,
    key: dict[str, Any],
    token_ids: dict[str, list[int]],
    caches: dict[str, Any],
    scorer: str,
    encoder: Any,
    unscorable: str | None = None,
) -> dict[str, torch.Tensor]:
    """Scores ``[L, H, n]`` of every passage cache in ``caches`` under ``scorer``, kept at
    ``path`` (:func:`load_keyed` under ``key``) and computed only where missing or stale, so
    later rows and resumed runs reuse them. ``unscorable``: why the missing ones cannot be
    computed here (a kvpress press's scores come from another virtualenv): exits saying so."""
    from ragcompress.compressors import CompressionContext, ScorerCompressor, make_compressor

    saved = load_keyed(path, key, token_ids)
    scores = {name.rsplit("/", 1)[0]: t for name, t in saved.items()}
    missing = [pid for pid in caches if pid not in scores]
    if missing and unscorable is not None:
        raise SystemExit(f"{path}: {len(missing)} passages have no {scorer} scores; {unscorable}")
    if missing:
        t0 = time.perf_counter()
        compressor = make_compressor(scorer)
        assert isinstance(compressor, ScorerCompressor), f"{scorer} scores no tokens"
        for pid in missing:
            scores[pid] = compressor.score(caches[pid], CompressionContext(encoder, token_ids[pid]))
        save_keyed(path, {f"{pid}/scores": t for pid, t in scores.items()}, key, token_ids)
        print(f"{scorer}: scored {len(missing)} passages in {time.perf_counter() - t0:.0f} s", flush=True)
    return scores


def save_keyed(
    path: Path, tensors: dict[str, torch.Tensor], key: dict[str, Any], token_ids: dict[str, list[int]]
) -> None:
    """Write ``tensors`` (named ``{passage id}/{name}``) for :func:`load_keyed`, atomically."""
    from safetensors.torch import save_file

    pids = {name.rsplit("/", 1)[0] for name in tensors}
    tokens = json.dumps({pid: tokens_digest(token_ids[pid]) for pid in sorted(pids)})
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    save_file(contiguous, str(tmp), metadata={"key": json.dumps(key, sort_keys=True), "tokens": tokens})
    os.replace(tmp, path)


def model_slug(model: str) -> str:
    """``model`` (a packaged name, a hub id, a local folder) as one path component: the name of
    the files and folders a benchmark keeps per model (``core_eval``'s stores and checkpoints, which
    ``lowrank_frontier`` reads back, and its workdir); a hub id's ``/`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")


def store_created(path: Path) -> str | None:
    """When the store at ``path`` was built (its manifest's ``created``; None where it is gone):
    a store rebuilt at the same path is another store to a checkpoint or a kept row."""
    from ragcompress.store.manifest import MANIFEST, Manifest

    return Manifest.read(path).created if (path / MANIFEST).is_file() else None


def measured_by(runs: Iterable[dict[str, Any]], keys: tuple[str, ...] = ROW_KEYS) -> dict[str, list[str]]:
    """Every value of each of ``keys`` among ``runs`` (what each checkpointed record or row says
    of the run that measured it, :func:`~ragcompress.provenance.row_run`; ``not recorded`` where
    it says nothing): a results file's own ``meta.git`` is only the revision that wrote it, and a
    resumed run can span several."""
    runs = list(runs)
    return {key: sorted({str(run[key]) if key in run else "not recorded" for run in runs}) for key in keys}


def row_name(method: str, ratio: float | None, quant: str) -> str:
    """A row's name in ``results.json`` and the name of its store's folder."""
    return f"{re.sub(r'[^A-Za-z0-9.-]+', '-', method).strip('-')}_{ratio if ratio is not None else 1.0}_{quant}"


def side_row(method: str) -> bool:
    """kvpress scores and parameter sweeps: in the tables, left out of the plots (legibility)."""
    return KVPRESS in method or "[" in method


def plot_against_compression(
    rows: dict[str, dict],
    metric: str,
    ylabel: str,
    path: Path,
    title: str,
    include: Callable[[dict], bool],
    extra: Callable[[Any], None] | None = None,
    **style: Any,
) -> None:
    """One line per method (``fp16`` solid, ``int4`` dashed) of ``metric`` against compression,
    over the rows ``include`` accepts; ``extra(ax)`` adds reference marks. Shared by the
    quality (sub-EM) and fidelity (KL) plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    kept = [r for r in rows.values() if include(r)]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in kept)):
        for quant, line in (("fp16", "-o"), ("int4", "--s")):
            pts = sorted((r["compression"], r[metric]) for r in kept if r["method"] == method and r["quant"] == quant)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    line,
                    color=f"C{i}",
                    label=f"{method}{' + int4' if quant == 'int4' else ''}",
                    **style,
                )
    if extra is not None:
        extra(ax)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression (fp16 bytes / stored bytes, scales and positions included)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# -- synthetic fixtures and timing of the kernel benchmark -------------------------------------


LLAMA3_ROPE_BASE = 500000.0  # the synthetic benchmarks' RoPE: Llama-3's base


def synthetic_segments(
    context: int, passage_len: int, kv_heads: int, head_dim: int, scheme: str, device: torch.device | str, seed: int = 0
) -> Any:
    """One layer of ``context // passage_len`` random passages stored with ``scheme`` through the
    store codec and packed for the kernel (``QuantizedSegments``), starting at position 0."""
    from ragcompress.runtime.packed import PackedSegments

    gen = torch.Generator().manual_seed(seed)
    blobs = []
    for _ in range(max(1, context // passage_len)):
        keys = torch.randn(1, kv_heads, passage_len, head_dim, generator=gen)
        values = torch.randn(1, kv_heads, passage_len, head_dim, generator=gen)
        blobs.append(codec.parse(codec.encode(PassageKV.full(keys, values), QuantConfig(scheme))).packed())
    return PackedSegments.from_blobs(blobs, 0, PlainRotary(head_dim, base=LLAMA3_ROPE_BASE), device).layers[0]


LATENT_SCHEME = "latent"  # kernel_bench's name for the smallest preset's shape (below)


def synthetic_latent_segments(
    context: int, passage_len: int, kv_heads: int, head_dim: int, device: torch.device | str, seed: int = 0
) -> Any:
    """One layer of ``context // passage_len`` random passages in the ``smallest`` preset's shape:
    keys near a rank-16 subspace, stored as rank-32 latents of a basis fitted on them (int4), values
    as int2 rows, packed for the latent kernel (``LatentSegments``), starting at position 0."""
    from ragcompress.kv.lowrank import RankSpec, fit_basis
    from ragcompress.runtime.latent_packed import LatentPackedSegments

    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(1, kv_heads, 16, head_dim, generator=gen)

    def passage() -> PassageKV:
        z = torch.randn(1, kv_heads, passage_len, 16, generator=gen)
        keys = z @ mix + 0.1 * torch.randn(1, kv_heads, passage_len, head_dim, generator=gen)
        return PassageKV.full(keys, torch.randn(1, kv_heads, passage_len, head_dim, generator=gen))

    passages = [passage() for _ in range(max(1, context // passage_len))]
    basis = fit_basis(passages[:4], RankSpec(rank=32, values=False))
    blobs = [codec.parse(codec.encode(kv, QuantConfig("int4", 32, "int2"), basis)) for kv in passages]
    return LatentPackedSegments.from_segments(
        blobs, basis, 0, PlainRotary(head_dim, base=LLAMA3_ROPE_BASE), device
    ).layers[0]


def median_time(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call (CPU timing)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# -- the service in a subprocess ---------------------------------------------------------------


class Service:
    """``ragcompress serve`` in a subprocess on a free port of 127.0.0.1 (``--port 0``; the port is
    read from its log, which goes to ``log``). ``options`` are further ``serve`` options; ``env``
    entries replace this process's environment's for it."""

    def __init__(self, store: Path, log: Path, options: list[str], env: dict[str, str] | None = None) -> None:
        self.log = log
        command = [sys.executable, "-m", "ragcompress.cli", "serve", "--store", str(store), "--port", "0", *options]
        self.handle = log.open("w")
        self.proc = subprocess.Popen(
            command,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, **(env or {})},
        )
        self.url = ""

    async def started(self, timeout: float = 600.0) -> str:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
                return self.url
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.2)
        raise SystemExit(f"error: the service did not start: {self.log.read_text(errors='replace')[-2000:]}")

    async def stop(self, timeout: float = 300.0) -> int | None:
        """SIGTERM, then the exit status (None: it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.handle.close()


def question_texts(path: Path) -> list[str]:
    """The ``question`` field of every line of a JSONL file (nothing else is required of it)."""
    questions = [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
    if not questions:
        raise SystemExit(f"error: no questions in {path}")
    return questions


def chat_body(
    question: str,
    max_tokens: int,
    stream: bool = False,
    passage_ids: list[str] | None = None,
    top_k: int | None = None,
) -> dict[str, Any]:
    """A ``/v1/chat/completions`` body; ``passage_ids`` or ``top_k`` go into its ``ragcompress``
    extension (docs/serve.md)."""
    body: dict[str, Any] = {
        "model": "ragcompress",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    extension = {"passage_ids": passage_ids, "top_k": top_k}
    if any(value is not None for value in extension.values()):
        body["ragcompress"] = {key: value for key, value in extension.items() if value is not None}
    return body


# -- run metadata every results file records ----------------------------------------------------


def results_meta(args_or_dict: Any) -> dict[str, Any]:
    """The run metadata a results file records under ``"meta"``
    (:func:`ragcompress.provenance.run_meta`), its :data:`~ragcompress.provenance.META_KEYS` read
    from a script's ``argparse.Namespace`` or a dict (what it does not hold is ``None``)."""
    given = args_or_dict if isinstance(args_or_dict, dict) else vars(args_or_dict)
    return run_meta(**{key: given.get(key) for key in META_KEYS})
