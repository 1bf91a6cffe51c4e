"""The ``ragcompress`` command line (DESIGN §3): index, ask, eval, bench, verify, serve.

Every command prints human-readable output (progress bars only on a terminal); ``--json`` prints
exactly one JSON object on stdout. Errors exit non-zero with one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import typer

from ragcompress.errors import CorruptSegmentError, RagCompressError, missing_store
from ragcompress.runtime.memory import keep_freed_memory

app = typer.Typer(
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings' wrapped lines read as one paragraph
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Answer RAG questions from precomputed, compressed passage KV caches.",
)


# the names of ragcompress/presets.py (not imported here: --help stays fast; a test checks the list)
PRESET_HELP = (
    "measured settings: fast, small, smallest, faithful, distilled (README: Presets); explicit options override them"
)
RECOMPUTE_OPTION = typer.Option(
    None,
    "--recompute",
    min=0.0,
    max=1.0,
    help="fraction of passage tokens recomputed at query time (CacheBlend; docs/recompute.md; default 0)",
)
SELECTION_OPTION = typer.Option(
    None,
    "--selection",
    help="how recomputed tokens are chosen: deviation (CacheBlend), question (the question's attention) or mixed",
)

# the names of runtime/options.py's BACKENDS (not imported here: --help stays fast; a test checks the list)
BACKEND_OPTION = typer.Option(
    None,
    "--backend",
    help="attention over the stored caches: auto (default: dense), dense, packed-torch or packed-triton "
    "(the fused kernel, CUDA; measured slower than dense on an H200: docs/kernels.md)",
)


def _existing_store(path: Path) -> Path:
    """``--store`` of a command that reads one: a missing path fails here, before the command
    imports torch and the model libraries (seconds), with the same error the store raises."""
    if not path.exists():
        raise missing_store(path)
    return path


STORE_OPTION = typer.Option(
    ..., "--store", callback=_existing_store, help="store directory (built by `ragcompress index`)"
)


# the names of models.DTYPES (not imported here: --help stays fast; a test checks the list)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _dtype_name(name: str | None) -> str | None:
    """``--dtype``, checked before the model libraries load."""
    if name is not None and name not in DTYPE_NAMES:
        raise RagCompressError(f"--dtype {name!r} is not one of: {', '.join(DTYPE_NAMES)}")
    return name


DTYPE_OPTION = typer.Option(
    None,
    "--dtype",
    callback=_dtype_name,
    help="the model weights' dtype: float32 (default), bfloat16 or float16 (half the memory); a "
    "store records the one it was indexed in, and answering uses it unless given",
)


DEVICE_OPTION = typer.Option(
    None,
    "--device",
    help="where the model answers: cpu (default) or cuda / cuda:N (a GPU torch sees); indexing runs on the CPU",
)


def _answer_options(
    preset: str | None,
    max_new_tokens: int | None = None,
    recompute: float | None = None,
    selection: str | None = None,
    backend: str | None = None,
) -> Any:
    """``AnswerOptions`` of ``--preset`` (defaults without one) with the options given explicitly
    (``--recompute`` / ``--selection`` replace those fields of the preset's recompute config;
    ``--backend`` replaces its attention path)."""
    import dataclasses

    from ragcompress.presets import answer_options

    try:
        base = answer_options(preset, max_new_tokens=max_new_tokens)
        changes: dict[str, Any] = {"ratio": recompute, "selection": selection}
        changes = {key: value for key, value in changes.items() if value is not None}
        if changes:
            base = base.replace(recompute=dataclasses.replace(base.recompute, **changes))
        if backend is not None:
            base = base.replace(backend=backend)
        return base
    except (ValueError, TypeError) as exc:
        raise RagCompressError(str(exc)) from None


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"ragcompress {version('ragcompress')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="print the version and exit"
    ),
) -> None:
    """Answer RAG questions from precomputed, compressed passage KV caches."""


def _quiet_libraries() -> None:
    """Keep library chatter off stdout/stderr so --json output stays one object."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _emit(data: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        typer.echo(human)


def _show_progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


@app.command()
def index(
    input: Path = typer.Option(
        ..., "--input", help="JSONL of {id, text, ...}, a folder of .txt/.md documents, or one .txt/.md document"
    ),
    store: Path = typer.Option(..., "--store", help="store directory (created if missing)"),
    model: str | None = typer.Option(
        None, "--model", help="embedded model name, local HF directory, or a model id already in the HF cache"
    ),
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    method: str | None = typer.Option(
        None,
        "--method",
        help="compression method: none, streaming, knorm, snapkv, "
        "expected-attention, kvzip, adaptive:SCORER (per-head budgets within a layer) "
        "or global:SCORER (one budget for the whole cache, KVzip's default)",
    ),
    ratio: float | None = typer.Option(None, "--ratio", help="fraction of tokens kept, in (0, 1]"),
    budget: int | None = typer.Option(None, "--budget", help="tokens kept per head (instead of --ratio)"),
    keep_first: int | None = typer.Option(
        None, "--keep-first", help="leading tokens of every passage always kept (default 4; see docs/compression.md)"
    ),
    keep_last: int | None = typer.Option(
        None, "--keep-last", help="trailing tokens of every passage always kept (default 4)"
    ),
    floor: float | None = typer.Option(
        None,
        "--floor",
        min=0.0,
        max=1.0,
        help="adaptive:/global: methods: share of the per-head budget every head of every layer keeps before "
        "the pooled rest goes by score (default: the method's)",
    ),
    quant: str | None = typer.Option(None, "--quant", help="none (default) | fp16 | int8 | int4 | int2"),
    value_quant: str | None = typer.Option(
        None, "--value-quant", help="the values' own width (int8 | int4 | int2; default: --quant, as the keys)"
    ),
    group_size: int | None = typer.Option(None, "--group-size", help="quantization group size (default 32)"),
    context_neighbors: int | None = typer.Option(
        None,
        "--context-neighbors",
        help="encode each passage after its N most similar passages of the input (default 0: alone; "
        "see docs/recompute.md)",
    ),
    adaptor: str | None = typer.Option(
        None,
        "--adaptor",
        help="learned passage adaptor (KV-Distill, docs/distill.md): 'default' (packaged for the model), "
        "'matching' (packaged for the model and trained for this store's compression), "
        "or a folder from `ragcompress train`",
    ),
    rank: int | None = typer.Option(
        None, "--rank", help="low-rank latents: keys (and values) projected to this rank per layer (multiple of 8)"
    ),
    rank_energy: float | None = typer.Option(
        None, "--rank-energy", help="low-rank latents: each layer keeps this fraction of the calibration variance"
    ),
    rank_schedule: str | None = typer.Option(
        None, "--rank-schedule", help="global (one energy for every layer) | progressive (more rank in shallow layers)"
    ),
    rank_values: bool | None = typer.Option(
        None, "--rank-values/--no-rank-values", help="project values too (default) or keep their rows"
    ),
    value_norm: bool | None = typer.Option(
        None,
        "--value-norm/--no-value-norm",
        help="adaptive:/global: methods: weight each score by its value's norm relative to its head (default off)",
    ),
    calibration: str | None = typer.Option(
        None, "--calibration", help="JSONL the low-rank basis is fitted on (default: the input)"
    ),
    calibration_passages: int | None = typer.Option(
        None, "--calibration-passages", help="passages of the calibration sample used (default 64)"
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="rebuild an existing store (swapped in when complete), with its own settings unless others are given",
    ),
    replace: bool = typer.Option(
        False, "--replace", help="re-encode passages stored under their id with another text, replacing them"
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    ray: str | None = typer.Option(
        None,
        "--ray",
        help="index on Ray: 'local' (a Ray instance on this machine) or a cluster ADDRESS (auto, ray://host:port); "
        "see docs/scaling.md",
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="with --ray: actors, each loading the model once (default 2)"
    ),
    dtype: str | None = DTYPE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Index passages into a KV-cache store (resumes: finished passages are skipped)."""
    if workers is not None and ray is None:
        raise RagCompressError("--workers sizes the Ray actor pool: give --ray local (or a cluster ADDRESS) too")
    _quiet_libraries()
    from ragcompress.indexing import index as run_index
    from ragcompress.presets import index_config
    from ragcompress.store import KVStore

    settings = {
        "method": method,
        "ratio": ratio,
        "quant": quant,
        "value_quant": value_quant,
        "group_size": group_size,
        "budget": budget,
        "keep_first": keep_first,
        "keep_last": keep_last,
        "floor": floor,
        "context_neighbors": context_neighbors,
        "adaptor": adaptor,
        "rank": rank,
        "rank_energy": rank_energy,
        "rank_schedule": rank_schedule,
        "rank_values": rank_values,
        "value_norm": value_norm,
        "calibration": calibration,
        "calibration_passages": calibration_passages,
    }
    config = None  # nothing given: an existing store's own settings (defaults for a new one)
    if preset is not None or any(value is not None for value in settings.values()):
        try:
            config = index_config(preset, **settings)
        except (ValueError, TypeError) as exc:
            raise RagCompressError(str(exc)) from None
    if ray is not None:
        from ragcompress.indexing.ray_runner import index_on_ray

        if overwrite:
            raise RagCompressError("--overwrite is single-process only; run it without --ray")
        report = index_on_ray(
            input,
            store,
            address=ray,
            workers=workers or 2,
            model=model,
            config=config,
            batch_size=batch_size,
            progress=_show_progress(as_json),
            replace=replace,
            dtype=dtype,
        )
    else:
        report = run_index(
            input,
            store,
            model=model,
            config=config,
            overwrite=overwrite,
            replace=replace,
            batch_size=batch_size,
            progress=_show_progress(as_json),
            dtype=dtype,
        )
    with KVStore.open(store) as opened:
        sizes = store_sizes(opened)
    data = {**report.to_json(), **sizes}
    _emit(
        data,
        as_json,
        f"indexed {report.indexed} passages"
        + (f" ({report.replaced} replacing stored ones with other text)" if report.replaced else "")
        + f", skipped {report.skipped} already stored, "
        f"in {report.seconds:.1f} s -> {store}\n"
        f"KV bytes per token: {sizes['kv_bytes_per_token']['stored']:.0f} stored vs "
        f"{sizes['kv_bytes_per_token']['fp16']:.0f} fp16 ({_ratio_words(sizes['compression'])})",
    )


def _ratio_words(compression: float) -> str:
    """``fp16 bytes / stored bytes`` in words: an unquantized (fp32) store is larger than fp16."""
    return f"{compression:.2f}x smaller" if compression >= 1 else f"{1 / compression:.2f}x larger"


def store_sizes(store: Any) -> dict[str, Any]:
    """Stored bytes per passage token (blobs as written, scales and positions included, a
    low-rank store's basis counted once) vs fp16."""
    fp16 = store.shape.fp16_bytes_per_token
    tokens = stored = 0
    for entry in store.catalogue.entries():
        tokens += entry.num_tokens
        stored += entry.length
    stored += store.basis_bytes
    per_token = stored / tokens if tokens else 0.0
    return {
        "kv_bytes_per_token": {"fp16": float(fp16), "stored": per_token},
        "compression": fp16 / per_token if per_token else 0.0,
    }


@app.command()
def train(
    model: str | None = typer.Option(
        None, "--model", help="embedded model name, local HF directory, or a model id already in the HF cache"
    ),
    passages: Path = typer.Option(..., "--passages", help="JSONL of {id, title, text} (articles split by title)"),
    questions: Path = typer.Option(..., "--questions", help="JSONL of {id, question, answers, passage_id}"),
    out: Path = typer.Option(..., "--out", help="output folder (resumes from its checkpoint.safetensors)"),
    val_articles: list[str] | None = typer.Option(
        None,
        "--val-articles",
        help="a held-out title, once per title (titles may hold commas; default: every third title, sorted)",
    ),
    steps: int = typer.Option(150, "--steps", min=1, help="optimizer steps"),
    minutes: float = typer.Option(
        40.0,
        "--minutes",
        help="stop after this many minutes of training steps (per invocation: a resumed run gets them anew)",
    ),
    batch: int = typer.Option(4, "--batch", min=1, help="examples per optimizer step"),
    lr: float = typer.Option(3e-4, "--lr"),
    warmup: int = typer.Option(0, "--warmup", min=0, help="steps over which the learning rate rises to --lr"),
    decay: str = typer.Option("constant", "--decay", help="'constant' or 'cosine' (to a tenth of --lr by --steps)"),
    rank: int = typer.Option(8, "--rank", min=1),
    alpha: int | None = typer.Option(
        None,
        "--alpha",
        min=1,
        help="LoRA alpha (the factors' product is scaled by alpha / rank); default twice --rank. With Adam "
        "the product moves about alpha * lr per step whatever the rank, so a larger rank at the same "
        "step size keeps alpha (on Qwen, rank 32 at alpha 64 was unstable where rank 8 at 16 was not)",
    ),
    kind: str = typer.Option(
        "forward",
        "--kind",
        help="'forward': LoRA layers inside the passage forward (peft); 'cache': a correction of the cached "
        "keys and values only (the first, cheaper design; docs/distill.md)",
    ),
    train_questions: int = typer.Option(0, "--train-questions", min=0, help="0: all training questions"),
    val_examples: int = typer.Option(16, "--val-examples", min=1),
    views: int = typer.Option(
        1,
        "--views",
        min=1,
        help="examples per training question: its retrieved passages, then VIEWS-1 other draws of top-k from "
        "its 2*top-k nearest (the teacher answers each; more data for the same questions)",
    ),
    continuation: int = typer.Option(32, "--continuation", min=1, help="reconstruction tokens per example"),
    continuation_weight: float = typer.Option(
        0.5, "--continuation-weight", min=0.0, help="the reconstruction KL's weight (the answer KL's is 1)"
    ),
    hard_weight: float = typer.Option(
        0.0,
        "--hard-weight",
        min=0.0,
        help="weight of the cross-entropy of the teacher's greedy answer tokens beside the answer KL (0: KL only)",
    ),
    scorer_passages: int | None = typer.Option(
        None,
        "--scorer-passages",
        min=0,
        help="passages the learned retention scorer is fitted on (default: 40, or 0 when --method evicts "
        "by another scorer, so no store would read it)",
    ),
    eval_every: int = typer.Option(10, "--eval-every", min=1),
    method: str = typer.Option(
        "none", "--method", help="train for a store evicted by this method (e.g. global:kvzip; kind forward)"
    ),
    ratio: float = typer.Option(1.0, "--ratio", min=0.0, max=1.0, help="fraction of tokens that --method keeps"),
    quant: str = typer.Option("none", "--quant", help="train for a store quantized so (int8 | int4 | int2 | fp16)"),
    value_quant: str | None = typer.Option(
        None, "--value-quant", help="train for a store whose values take this width (as index --value-quant)"
    ),
    keep_first: int | None = typer.Option(None, "--keep-first", min=0, help="as index --keep-first, for --method"),
    keep_last: int | None = typer.Option(None, "--keep-last", min=0, help="as index --keep-last, for --method"),
    value_norm: bool = typer.Option(
        False, "--value-norm", help="as index --value-norm, for --method: scores weighted by each row's value norm"
    ),
    kv_rank: int | None = typer.Option(
        None, "--kv-rank", help="train for a low-rank store (index --rank R): kept rows projected to this rank"
    ),
    kv_rank_values: bool = typer.Option(
        True, "--kv-rank-values/--no-kv-rank-values", help="with --kv-rank: project values too (as index)"
    ),
    calibration_passages: int = typer.Option(
        64, "--calibration-passages", min=1, help="with --kv-rank: training passages the basis is fitted on"
    ),
    extra_passages: str | None = typer.Option(
        None,
        "--extra-passages",
        help="more training text (JSONL or a folder of .txt/.md, e.g. ../shared/data/pg-essays-dev): the base "
        "model writes a question about each chosen passage, and the teacher answers it",
    ),
    extra_questions: int = typer.Option(
        0, "--extra-questions", min=0, help="with --extra-passages: questions written, evenly spaced (0: one each)"
    ),
    init_adaptor: str | None = typer.Option(
        None,
        "--init-adaptor",
        help="start from this adaptor (folder or packaged name; same model and kind, trained without the held-out "
        "articles) instead of zeros: continues a finished run",
    ),
    threads: int = typer.Option(2, "--threads", min=1),
    dtype: str | None = DTYPE_OPTION,
) -> None:
    """Train a KV-Distill passage adaptor and its learned retention scorer (docs/distill.md)."""
    _quiet_libraries()
    import torch

    from ragcompress.distill.train import TrainConfig
    from ragcompress.distill.train import train as run_train
    from ragcompress.models import load_model

    torch.set_num_threads(threads)
    try:
        config = TrainConfig(
            steps=steps,
            minutes=minutes,
            batch=batch,
            lr=lr,
            warmup=warmup,
            decay=decay,
            rank=rank,
            alpha=2 * rank if alpha is None else alpha,
            kind=kind,
            train_questions=train_questions,
            val_examples=val_examples,
            views=views,
            continuation=continuation,
            continuation_weight=continuation_weight,
            hard_weight=hard_weight,
            scorer_passages=scorer_passages,
            eval_every=eval_every,
            method=method,
            ratio=ratio,
            quant=quant,
            value_quant=value_quant,
            keep_first=keep_first,
            keep_last=keep_last,
            value_norm=value_norm,
            kv_rank=kv_rank,
            kv_rank_values=kv_rank_values,
            calibration_passages=calibration_passages,
            val_articles=list(val_articles or []),
            init_adaptor=init_adaptor,
            extra_passages=extra_passages,
            extra_questions=extra_questions,
        )
    except ValueError as exc:
        raise RagCompressError(str(exc)) from None
    adaptor = run_train(load_model(model, dtype=dtype), passages, questions, out, config, progress=True)
    metrics = adaptor.meta["metrics"]
    typer.echo(
        f"adaptor {adaptor.hash[:16]} -> {out / 'adaptor'}; held-out KL (answer) "
        f"{metrics['held_out_start']['kl_answer']:.4f} -> {metrics['held_out_end']['kl_answer']:.4f}, answer rows "
        f"whose argmax is full prefill's {metrics['held_out_start'].get('top1_answer', float('nan')):.3f} -> "
        f"{metrics['held_out_end'].get('top1_answer', float('nan')):.3f}"
    )


@app.command()
def ask(
    store: Path = STORE_OPTION,
    question: str = typer.Option(..., "--question"),
    top_k: int = typer.Option(3, "--top-k", min=1),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    recompute: float | None = RECOMPUTE_OPTION,
    selection: str | None = SELECTION_OPTION,
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    backend: str | None = BACKEND_OPTION,
    compare_full: bool = typer.Option(False, "--compare-full", help="also answer by full-text prefill and time it"),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Answer a question from the stored caches of the retrieved passages."""
    _quiet_libraries()
    from ragcompress.runtime.engine import Engine

    engine = Engine.open(
        store,
        options=_answer_options(preset, max_new_tokens, recompute, selection, backend),
        dtype=dtype,
        device=device,
    )
    try:
        entries = engine.retrieve(question, top_k)
        answer = engine.answer_cached(question, entries)
        data = answer.to_json()
        lines = [
            f"answer: {answer.answer}",
            "passages: " + ", ".join(answer.passage_ids),
            f"TTFT from cache: {answer.ttft_s * 1000:.0f} ms ({answer.backend} attention)",
        ]
        if compare_full:
            full = engine.answer_full(question, entries)
            data["full"] = full.to_json()
            data["ttft_speedup"] = full.ttft_s / answer.ttft_s
            lines += [
                f"TTFT of full prefill: {full.ttft_s * 1000:.0f} ms "
                f"({data['ttft_speedup']:.1f}x slower); full-prefill answer: {full.answer}"
            ]
    finally:
        engine.close()
    _emit(data, as_json, "\n".join(lines))


@app.command(name="eval")
def evaluate(
    store: Path = STORE_OPTION,
    questions: Path = typer.Option(..., "--questions", help="JSONL of {id, question, answers, passage_id?}"),
    top_k: int = typer.Option(3, "--top-k", min=1),
    limit: int | None = typer.Option(None, "--limit", min=1, help="the first N questions (after --article/--sample)"),
    sample: int | None = typer.Option(
        None, "--sample", min=1, help="N questions evenly spaced over the file (as the benchmarks' --sample)"
    ),
    articles: list[str] = typer.Option(
        [], "--article", help="only questions of this article (passage_id ARTICLE#N); repeatable"
    ),
    outside: int | None = typer.Option(
        None,
        "--outside",
        min=1,
        help="only questions not among the N that --sample N picks (after --article): a confirmation sample",
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    recompute: float | None = RECOMPUTE_OPTION,
    selection: str | None = SELECTION_OPTION,
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    backend: str | None = BACKEND_OPTION,
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Answer questions from caches and by full prefill; report quality, agreement and speedup."""
    _quiet_libraries()
    from ragcompress.evaluation import iter_eval, read_questions, select_questions, summarize
    from ragcompress.runtime.engine import Engine

    items = select_questions(read_questions(questions, scored=True), sample, articles, outside)[:limit]
    engine = Engine.open(
        store,
        options=_answer_options(preset, max_new_tokens, recompute, selection, backend),
        dtype=dtype,
        device=device,
    )
    try:
        results = iter_eval(engine, items, top_k)
        if _show_progress(as_json):
            from tqdm import tqdm

            results = tqdm(results, total=len(items), unit="question", desc="evaluating")
        summary = summarize(engine, list(results))
    finally:
        engine.close()
    human = (
        f"questions: {summary['n']}  recall@{top_k}: {summary['recall_at_k']}\n"
        f"full prefill : sub-EM {summary['full']['sub_em']:.3f}  F1 {summary['full']['f1']:.3f}  "
        f"TTFT {summary['full']['ttft_s_median'] * 1000:.0f} ms\n"
        f"from cache   : sub-EM {summary['compressed']['sub_em']:.3f}  F1 {summary['compressed']['f1']:.3f}  "
        f"TTFT {summary['compressed']['ttft_s_median'] * 1000:.0f} ms\n"
        f"agreement {summary['agreement']:.3f}  TTFT speedup {summary['ttft_speedup']:.1f}x "
        f"({summary['torch_threads']} torch threads{'' if summary['device'] == 'cpu' else ', ' + summary['device']})  "
        f"compression {summary['compression']:.2f}x vs fp16"
    )
    _emit(summary, as_json, human)


@app.command()
def bench(
    store: Path = STORE_OPTION,
    questions: Path | None = typer.Option(None, "--questions", help="JSONL of questions (default: bundled sample)"),
    top_k: str = typer.Option("1,2,4,8,16", "--top-k", help="comma-separated context sizes (passages)"),
    limit: int = typer.Option(3, "--limit", min=1, help="questions per context size"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="timed runs per question and path (median)"),
    plot_path: Path | None = typer.Option(None, "--plot", help="write a PNG of TTFT against context size"),
    indexing: int | None = typer.Option(
        None,
        "--indexing-passages",
        min=0,
        help="passages re-indexed in memory to time indexing (0: skip; default 8 on the CPU, 0 with --device "
        "cuda, since indexing runs on the CPU)",
    ),
    packed: bool = typer.Option(
        True,
        "--packed/--no-packed",
        help="on a quantized store, also time the packed attention path against "
        "dequantize-then-SDPA at the largest top-k",
    ),
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """TTFT across context sizes against full prefill; KV bytes; indexing throughput.

    Full prefill, prefix-cached prefill, stored caches and the question-only floor, alternating
    in one run."""
    _quiet_libraries()
    from ragcompress.bench import bench as run_bench
    from ragcompress.bench import (
        indexing_throughput,
        packed_ttft_overhead,
        plot,
        run_meta,
        store_indexer,
        table,
        to_json,
    )
    from ragcompress.data import SAMPLE_QUESTIONS
    from ragcompress.evaluation import read_questions
    from ragcompress.runtime.engine import Engine

    try:
        top_ks = [int(k) for k in top_k.split(",")]
    except ValueError:
        raise RagCompressError(f"--top-k takes comma-separated integers, got {top_k!r}") from None
    if repeats % 2 == 0:
        raise RagCompressError(
            f"--repeats takes an odd count (each figure is a median, and the median of {repeats} runs is "
            f"the mean of the middle two); use {repeats - 1} or {repeats + 1}"
        )
    from ragcompress.models import usable_device

    on_cpu = device is None or usable_device(device).type == "cpu"
    if indexing is None:
        indexing = 8 if on_cpu else 0
    elif indexing and not on_cpu:
        raise RagCompressError(
            f"--indexing-passages {indexing} with --device {device}: indexing runs on the CPU, so bench times it "
            "only there; pass --indexing-passages 0, or bench indexing in a run without --device"
        )
    items = read_questions(questions or SAMPLE_QUESTIONS, limit)
    engine = Engine.open(store, options=_answer_options(preset), dtype=dtype, device=device)
    comparison = throughput = None
    try:
        if max(top_ks) > len(engine.store):
            raise RagCompressError(f"--top-k {max(top_ks)} exceeds the {len(engine.store)} passages in {store}")
        indexer = store_indexer(engine) if indexing else None  # a store it cannot re-encode fails before timing
        rows = run_bench(engine, items, top_ks, repeats)
        if indexer is not None:
            throughput = indexing_throughput(engine, indexing, repeats, indexer)
        if packed and engine.store.quant.bits is not None:
            comparison = packed_ttft_overhead(engine, [q.question for q in items], max(top_ks), repeats)
        data = to_json(engine, rows, run_meta(repeats, limit))
    finally:
        engine.close()
    if plot_path is not None:
        plot(rows, plot_path, title=f"{data['model']}, {len(items)} questions")
    human = table(rows)
    if throughput is not None:
        data["indexing"] = throughput.to_json()
        human += (
            f"\n\nindexing: {throughput.indexer_passages_per_s:.1f} passages/s vs plain forward "
            f"{throughput.forward_passages_per_s:.1f} passages/s ({throughput.ratio:.2f}x of the forward's throughput)"
        )
    if comparison is not None:
        data["packed_attention"] = comparison.to_json()
        human += (
            f"\n\npacked attention ({comparison.packed_backend}; packed-torch is the kernel's PyTorch reference, "
            f"not the Triton kernel) vs dequantize-then-SDPA, top-{max(top_ks)}: "
            f"TTFT {comparison.packed_ttft_s * 1000:.0f} ms vs {comparison.assembled_ttft_s * 1000:.0f} ms, "
            f"ratio {comparison.ratio:.2f} (median per question), same first token "
            f"{comparison.same_first_token:.0%}"
        )
    _emit(data, as_json, human)


@app.command()
def calibrate(
    store: Path = STORE_OPTION,
    samples: int = typer.Option(16, "--samples", min=1, help="passage groups measured"),
    top_k: int = typer.Option(3, "--top-k", min=1, help="passages per group"),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Choose the store's attention temperature (APE) by KL to full prefill, without labels.

    The temperature is recorded in the manifest, and every stored-cache answer applies it
    (docs/recompute.md)."""
    _quiet_libraries()
    import dataclasses

    from ragcompress.runtime.calibration import calibrate_temperature
    from ragcompress.runtime.engine import Engine
    from ragcompress.runtime.options import AnswerOptions
    from ragcompress.store import Manifest
    from ragcompress.store.kvstore import StoreLock

    with Engine.open(store, options=AnswerOptions(calibrate=False), dtype=dtype, device=device) as engine:
        result = calibrate_temperature(engine, samples=samples, top_k=top_k, progress=_show_progress(as_json))
        lock = StoreLock(store)
        try:  # a temperature measured on one build is not recorded in another swapped in meanwhile
            engine.store.check_replacement()
            manifest = Manifest.read(store)
            dataclasses.replace(manifest, attention=result.as_dict()).write(store)
        finally:
            lock.release()
    table = ", ".join(f"T={t}: {kl:.4f}" for t, kl in result.kl.items())
    _emit(
        result.as_dict(),
        as_json,
        f"attention temperature {result.temperature:g} recorded in {store}/manifest.json "
        f"(mean KL to full prefill over {result.samples} groups: {table})",
    )


@app.command()
def remove(
    store: Path = STORE_OPTION,
    ids: list[str] = typer.Argument(None, help="ids of the passages to remove", show_default=False),
    ids_file: Path | None = typer.Option(None, "--ids-file", help="a file of passage ids, one per line"),
    missing_ok: bool = typer.Option(False, "--missing-ok", help="ids the store does not hold are not an error"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Remove passages from a store (one commit; the FAISS index is rebuilt).

    An unknown id is an error and removes nothing, unless --missing-ok."""
    from ragcompress.indexing import remove as remove_passages

    wanted = list(ids or [])
    if ids_file is not None:
        try:
            wanted += [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise RagCompressError(f"cannot read --ids-file {ids_file}: {exc}") from None
    if not wanted:
        raise RagCompressError("no passage ids given: name them as arguments or with --ids-file")
    removed = remove_passages(store, wanted, missing_ok=missing_ok)
    _emit(
        {"store": str(store), "requested": len(set(wanted)), "removed": removed},
        as_json,
        f"removed {removed} passages from {store}",
    )


@app.command()
def compact(
    store: Path = STORE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Reclaim the shard bytes of removed and replaced passages.

    Every stored cache is copied unchanged into a new store, swapped in when complete (no model
    needed; holds the writer lock)."""
    from ragcompress.store.compact import compact_store

    report = compact_store(store)
    _emit(
        report.to_json(),
        as_json,
        f"compacted {store}: {report.passages} passages, shards {report.bytes_before} -> {report.bytes_after} bytes",
    )


@app.command()
def verify(
    store: Path = typer.Option(..., "--store", help="store directory"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check every part of a store; exit 0 only if all hold.

    Manifest, prefix, catalogue, every segment (checksum, decoding, shape) and the FAISS index;
    each problem names its passage id and shard."""
    if not any((store / name).exists() for name in ("manifest.json", "catalogue.sqlite", "shards")):
        raise RagCompressError(f"{store} is not a ragcompress store (no manifest, catalogue or shards); check --store")
    from ragcompress.store.verify import verify_store

    report = verify_store(store)
    lines = [
        f"{'OK' if report.ok else 'FAILED'}: {store}: {report.passages} passages in {report.shards} shards, "
        f"{len(report.problems)} problems"
    ]
    lines += [f"  {problem}" for problem in report.problems] + [f"  note: {note}" for note in report.notes]
    _emit(report.to_json(), as_json, "\n".join(lines))
    if not report.ok:
        first = report.problems[0]
        typer.echo(
            f"error: store {store} failed verification: {len(report.problems)} problems, first: {first}. "
            f"Damaged passages: `ragcompress remove --store {store} ID ...`, then `ragcompress index` again "
            "re-encodes them; a lost shard, manifest or catalogue: rebuild with `ragcompress index --input ... "
            f"--store {store} --overwrite`",
            err=True,
        )
        raise SystemExit(1)


@app.command()
def serve(
    store: Path = STORE_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="port (0: a free one, logged at start)"),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="RAGCOMPRESS_API_KEY",
        show_envvar=True,
        help="require `Authorization: Bearer KEY` on every endpoint but /health",
    ),
    preset: str | None = typer.Option(None, "--preset", help=PRESET_HELP),
    queue: int = typer.Option(64, "--queue", min=1, help="requests that may wait while one is answered (then 429)"),
    top_k: int = typer.Option(3, "--top-k", min=1, help="passages retrieved when a request does not say"),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="answer length when a request gives no max_tokens (default 32)"
    ),
    batch: int = typer.Option(
        8, "--batch", min=1, help="concurrent questions decoded together in one batch (1: one at a time)"
    ),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    dtype: str | None = DTYPE_OPTION,
    device: str | None = DEVICE_OPTION,
) -> None:
    """Serve the store over HTTP: OpenAI-compatible /v1/chat/completions (docs/serve.md).

    SIGTERM lets in-flight requests finish, then exits 0."""
    _quiet_libraries()
    try:
        from ragcompress.serve import ServeSettings, create_app, run
    except ImportError as exc:
        raise RagCompressError(f"serving needs the serve extra ({exc}): pip install 'ragcompress[serve]'") from None
    from ragcompress.runtime.engine import Engine

    try:
        settings = ServeSettings(
            api_key=api_key,
            queue_size=queue,
            preset=preset,
            top_k=top_k,
            max_top_k=max(16, top_k),
            max_tokens=max(1024, max_new_tokens or 0),  # the default answer length is always allowed
            max_batch=batch,
        )
    except ValueError as exc:
        raise RagCompressError(str(exc)) from None
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: serving on {host} without an API key; anyone who reaches it can query the store", err=True
        )
    engine = Engine.open(store, options=_answer_options(preset, max_new_tokens), dtype=dtype, device=device)
    run(create_app(engine, settings), host, port, log_level=log_level)
    engine.close()


def _one_line_warning(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
    """ragcompress's own warnings as ``warning: ...`` (what to do is in the message; the source
    line Python would print is not the user's), other libraries' as Python formats them."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        return f"warning: {message}\n"
    return _PYTHON_FORMATWARNING(message, category, filename, lineno, line)


PACKAGE = Path(__file__).resolve().parent
_PYTHON_FORMATWARNING = warnings.formatwarning


def main() -> None:
    """Entry point: one-line errors and warnings, non-zero exit. The command is the whole process,
    so it keeps freed memory for the next request (:mod:`ragcompress.runtime.memory`)."""
    keep_freed_memory()
    warnings.formatwarning = _one_line_warning
    try:
        app(standalone_mode=False)
    except RagCompressError as exc:
        hint = " (run `ragcompress verify --store ...`: it lists the damage and how to repair it)"
        typer.echo(f"error: {exc}{hint if isinstance(exc, CorruptSegmentError) else ''}", err=True)
        sys.exit(1)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors (unknown option, bad value) carry their own message
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"error: {message} (see ragcompress --help)", err=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
