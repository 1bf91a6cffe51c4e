"""``index`` and the commands that maintain a store: ``remove``, ``compact``, ``verify``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from ragcompress.cli.options import (
    BUSY,
    DTYPE_OPTION,
    PRESET_HELP,
    STORE_OPTION,
    emit,
    path_option,
    quiet_libraries,
    show_progress,
)
from ragcompress.errors import RagCompressError, StoreBusyError, missing_store


def index(
    input: Path = path_option(
        ..., "--input", help="JSONL of {id, text, ...}, a folder of .txt/.md documents, or one .txt/.md document"
    ),
    store: Path = path_option(..., "--store", help="store directory (created if missing)"),
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
    ratio: float | None = typer.Option(
        None,
        "--ratio",
        help="fraction of tokens kept, in (0, 1] (default 0.5 for an evicting --method; none keeps all)",
    ),
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
        parser=os.path.expanduser,
        help="learned passage adaptor (KV-Distill, docs/distill.md): 'default' (packaged for the model), "
        "'matching' (packaged for the model and trained for this store's compression), "
        "or a folder from `ragcompress train`",
    ),
    base_copy: bool | None = typer.Option(
        None,
        "--base-copy/--no-base-copy",
        help="with --adaptor: also store each passage's base-model cache (twice the bytes), read for the passage "
        "retrieved first, which directly follows the prefix (docs/distill.md)",
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
        None,
        "--calibration",
        parser=os.path.expanduser,
        help="JSONL the low-rank basis is fitted on (default: the input)",
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
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="passages encoded together (default 8; resuming a stopped run, the size it used: another is refused)",
    ),
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
    device: str | None = typer.Option(
        None,
        "--device",
        help="where the model's forwards run: cpu (default) or cuda / cuda:N (a GPU torch sees; with --ray, "
        "each actor takes one GPU)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Index passages into a KV-cache store (resumes: finished passages are skipped)."""
    if workers is not None and ray is None:
        raise RagCompressError("--workers sizes the Ray actor pool: give --ray local (or a cluster ADDRESS) too")
    quiet_libraries()
    from ragcompress.indexing import index as run_index
    from ragcompress.presets import index_config
    from ragcompress.store import KVStore
    from ragcompress.store.manifest import MANIFEST

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
        "base_copy": base_copy,
        "rank": rank,
        "rank_energy": rank_energy,
        "rank_schedule": rank_schedule,
        "rank_values": rank_values,
        "value_norm": value_norm,
        "calibration": calibration,
        "calibration_passages": calibration_passages,
    }
    config = None  # nothing given: an existing store's own settings (defaults for a new one)
    given = {key for key, value in settings.items() if value is not None}
    # only --adaptor, adding to a store: the store's other settings, with the folder of an adaptor
    # that is not packaged (its hash is checked against the store's when the run starts)
    adaptor_alone = preset is None and given == {"adaptor"} and not overwrite and (store / MANIFEST).is_file()
    if (preset is not None or given) and not adaptor_alone:
        try:
            config = index_config(preset, **settings)
        except (ValueError, TypeError) as exc:
            raise RagCompressError(str(exc)) from None
    if overwrite and config is not None:
        _note_settings_reset(store, config, {key for key, value in settings.items() if value is not None}, preset)
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
            progress=show_progress(as_json),
            replace=replace,
            dtype=dtype,
            device=device,
            adaptor=adaptor if adaptor_alone else None,
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
            progress=show_progress(as_json),
            dtype=dtype,
            device=device,
            adaptor=adaptor if adaptor_alone else None,
        )
    with KVStore.open(store) as opened:
        sizes = store_sizes(opened)
    data = {**report.to_json(), **sizes}
    emit(
        data,
        as_json,
        f"indexed {report.indexed} passages"
        + (f" ({report.replaced} replacing stored ones with other text)" if report.replaced else "")
        + f", skipped {report.skipped} already stored"
        + (f" (updated {report.updated} titles/metadata)" if report.updated else "")
        + f", in {report.seconds:.1f} s -> {store}\n"
        f"KV bytes per token: {sizes['kv_bytes_per_token']['stored']:.0f} stored vs "
        f"{sizes['kv_bytes_per_token']['fp16']:.0f} fp16 ({_ratio_words(sizes['compression'])})",
    )
    if report.stale:
        typer.echo(_stale_warning(report.stale, store), err=True)
    if report.short_context:
        typer.echo(
            f"warning: {report.short_context} passages were encoded after fewer than the store's context neighbours: "
            "neighbours are drawn from this run's input only, which held too few others; index passages together "
            "with those they should be encoded after (docs/recompute.md)",
            err=True,
        )
    if report.past_embedder_window:
        from ragcompress.indexing.inputs import CHUNK_WORDS

        typer.echo(
            f"warning: {report.past_embedder_window} passages are longer than the embedder reads "
            f"({report.embedder_window} word pieces): only their start is embedded, so retrieval never matches the "
            f"rest; split them into shorter JSONL passages (a folder's documents are cut into {CHUNK_WORDS}-word chunks) "
            "(docs/scaling.md)",
            err=True,
        )


def _stale_warning(stale: tuple[str, ...], store: Path) -> str:
    """The warning naming the stored chunks of the input's documents that those documents no
    longer have (``IndexReport.stale``; ``"stale"`` in ``--json``), and the command removing them."""
    import shlex

    shown = ", ".join(repr(pid) for pid in stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
    remove = f"ragcompress remove --store {shlex.quote(str(store))}"
    how = (
        f"`{remove} {' '.join(shlex.quote(pid) for pid in stale)}`"
        if len(stale) <= 5
        else f'`{remove} --ids-file FILE`, FILE listing them one per line (--json gives them as "stale")'
    )
    return (
        f"warning: {len(stale)} stored chunks of the input's documents are beyond the chunks those documents have "
        f"now and stay searchable with text they no longer hold: {shown}; remove them with {how}"
    )


def _note_settings_reset(store: Path, config: Any, named: set[str], preset: str | None) -> None:
    """Before ``--overwrite`` rebuilds an existing store with some settings given: name, on
    stderr, the store's settings the rebuild changes although the user did not name them (they
    take the preset's or the defaults, not the store's: an int8 store rebuilt with ``--method
    knorm --ratio 0.5`` becomes a full-width one)."""
    from ragcompress.indexing.config import config_from_manifest, differing_settings
    from ragcompress.store import Manifest
    from ragcompress.store.manifest import MANIFEST

    if not (store / MANIFEST).is_file():
        return
    try:
        stored = config_from_manifest(Manifest.read(store))
    except RagCompressError:  # a damaged manifest or an unpackaged adaptor: nothing to compare with
        return
    changed = [
        f"{key} {ours!r} -> {theirs!r}"
        for key, (ours, theirs) in differing_settings(stored, config).items()
        if key not in named
    ]
    if changed:
        source = f"preset {preset}'s" if preset else "the defaults"
        typer.echo(
            f"note: --overwrite rebuilds {store} with {source} for the settings not given, not the store's own: "
            + ", ".join(changed),
            err=True,
        )


def _ratio_words(compression: float) -> str:
    """``fp16 bytes / stored bytes`` in words: an unquantized (fp32) store is larger than fp16."""
    return f"{compression:.2f}x smaller" if compression >= 1 else f"{1 / compression:.2f}x larger"


def store_sizes(store: Any) -> dict[str, Any]:
    """Stored bytes per passage token (blobs as written, scales and positions included, a
    low-rank store's basis counted once) vs fp16."""
    fp16 = store.shape.fp16_bytes_per_token
    per_token = store.bytes_per_token()
    return {
        "kv_bytes_per_token": {"fp16": float(fp16), "stored": per_token},
        "compression": fp16 / per_token if per_token else 0.0,
    }


def remove(
    store: Path = STORE_OPTION,
    ids: list[str] = typer.Argument(None, help="ids of the passages to remove", show_default=False),
    ids_file: Path | None = path_option(None, "--ids-file", help="a file of passage ids, one per line"),
    missing_ok: bool = typer.Option(False, "--missing-ok", help="ids the store does not hold are not an error"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Remove passages from a store (one commit; the FAISS index is rebuilt).

    An unknown id is an error and removes nothing, unless --missing-ok."""
    from ragcompress.indexing import remove as remove_passages

    wanted = list(ids or [])
    if ids_file is not None:
        try:
            wanted += [line.strip() for line in ids_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise RagCompressError(f"cannot read --ids-file {ids_file}: {exc}") from None
    if not wanted:
        raise RagCompressError("no passage ids given: name them as arguments or with --ids-file")
    removed = remove_passages(store, wanted, missing_ok=missing_ok)
    emit(
        {"store": str(store), "requested": len(set(wanted)), "removed": removed},
        as_json,
        f"removed {removed} passages from {store}",
    )


def compact(
    store: Path = STORE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Reclaim the shard bytes of removed and replaced passages.

    Every stored cache is copied unchanged into a new store, swapped in when complete (no model
    needed; holds the writer lock)."""
    from ragcompress.store.compact import compact_store

    report = compact_store(store)
    emit(
        report.to_json(),
        as_json,
        f"compacted {store}: {report.passages} passages, shards {report.bytes_before} -> {report.bytes_after} bytes",
    )


def verify(
    store: Path = path_option(..., "--store", help="store directory"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Check every part of a store; exit 0 only if all hold and it is answerable.

    Manifest, prefix, catalogue, every segment (checksum, decoding, shape) and the FAISS index;
    each problem names its passage id and shard. Exit 1: damaged (the repair is named). Exit 2:
    intact, but its last indexing run stopped before its end, so answering refuses it until
    `ragcompress index` is re-run (it resumes). Exit 3: busy, not checked: another process holds
    its catalogue locked (a writer); retry when the writer finishes."""
    # the file names spelt out: importing ragcompress.store (its MANIFEST) loads torch, and a
    # mistyped path is named at once (tests/test_packaging.py)
    if not store.exists():
        raise missing_store(store)
    if not any((store / name).exists() for name in ("manifest.json", "catalogue.sqlite", "shards")):
        raise RagCompressError(f"{store} is not a ragcompress store (no manifest, catalogue or shards); check --store")
    from ragcompress.store.verify import busy_json, verify_store

    try:
        report = verify_store(store)
    except StoreBusyError as exc:  # being written: no damage to report, nor a rebuild to advise
        line = f"store {store} is busy, not checked: {exc}"
        if as_json:  # a script parsing stdout gets its object here too
            emit(busy_json(str(store), line), as_json, "")
        typer.echo(f"error: {line}", err=True)
        raise SystemExit(BUSY) from None
    verdict = "FAILED" if not report.ok else "OK" if report.answerable else "UNFINISHED"
    lines = [
        f"{verdict}: {store}: {report.passages} passages in {report.shards} shards, {len(report.problems)} problems"
    ]
    lines += [f"  {problem}" for problem in report.problems] + [f"  note: {note}" for note in report.notes]
    emit(report.to_json(), as_json, "\n".join(lines))
    if not report.ok:
        first = report.problems[0]
        typer.echo(
            f"error: store {store} failed verification: {len(report.problems)} problems, first: {first}. "
            f"To repair it, {report.remedy()}",
            err=True,
        )
        raise SystemExit(1)
    if not report.answerable:  # intact, yet answering refuses it: not a success for a script either
        typer.echo(f"error: store {store} is intact but not answerable: {report.unfinished}", err=True)
        raise SystemExit(2)
