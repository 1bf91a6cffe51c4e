"""Offline indexing: passages -> embeddings + compressed KV caches in a store.

Re-running on the same input skips passages already committed (matched by id and text hash), so
a killed run resumes where it stopped; a skipped passage whose title or metadata changed takes the
new ones (its cache, embedding and row stay). A passage stored under its id with another text is refused
unless ``replace`` is set, in which case it is re-encoded and takes the stored one's place in the
same commit; :func:`remove` deletes passages. A run with another model, template, compression config or
embedder on an existing store fails before writing anything, unless ``overwrite`` is set, in which case
the new store is built beside the old one and swapped in only when complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ragcompress.distill.packaged import check_store_adaptor
from ragcompress.errors import InputError, StoreError, StoreMismatchError, UnstorableCacheError
from ragcompress.indexing.calibrate import fit_calibration_basis
from ragcompress.indexing.config import IndexConfig, config_from_manifest
from ragcompress.indexing.indexer import Indexer
from ragcompress.indexing.inputs import PassageInput, count_chunks, document_chunks, iter_passages, validate
from ragcompress.interrupts import raise_if_stopped
from ragcompress.kv.lowrank import RankSpec
from ragcompress.models import DEFAULT_MODEL, EVAL_MODEL, LoadedModel, load_model
from ragcompress.retrieval import TextEmbedder, past_window
from ragcompress.store import KVStore, Manifest, StoreWriter, create_store
from ragcompress.store.basis import basis_to_bytes
from ragcompress.store.catalogue import CATALOGUE
from ragcompress.store.files import (
    check_creatable,
    indexing_run,
    overwrite_refusal,
    refuse_existing,
    remove_litter,
    remove_tree,
    replace_store,
    stopped_run_batch_size,
)
from ragcompress.store.manifest import MANIFEST, SETTINGS
from ragcompress.store.writer import StoreLock


@dataclass(frozen=True)
class IndexReport:
    """What a run did: passages in the input, how many it encoded (of which ``replaced`` took the
    place of a stored passage with another text), how many were stored already (of which
    ``updated`` took the input's other title or metadata). ``stale``: stored chunks of the
    input's documents beyond the chunks they have now (:func:`stale_chunks`), left in place.
    ``short_context``: passages of a neighbour-conditioned store encoded after fewer than its
    ``context_neighbors`` passages, because this run's input (where neighbours are drawn from,
    not the store) held fewer others (:func:`short_context`); the CLI warns about them.
    ``past_embedder_window``: passages this run embedded that are longer than the embedder reads
    (``embedder_window`` word pieces, 0 when none were): only their start is embedded, so
    retrieval never matches the rest; the CLI warns. An embedder with no window to check
    (:func:`~ragcompress.retrieval.past_window`) counts none."""

    passages: int
    indexed: int
    skipped: int
    seconds: float
    store: str
    replaced: int = 0
    updated: int = 0
    stale: tuple[str, ...] = ()
    short_context: int = 0
    past_embedder_window: int = 0
    embedder_window: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "passages": self.passages,
            "indexed": self.indexed,
            "replaced": self.replaced,
            "skipped": self.skipped,
            "updated": self.updated,
            "stale": list(self.stale),
            "short_context": self.short_context,
            "past_embedder_window": self.past_embedder_window,
            "embedder_window": self.embedder_window,
            "seconds": self.seconds,
            "store": self.store,
        }


# passages encoded together when neither the caller nor a stopped run to resume names a size
DEFAULT_BATCH_SIZE = 8


def resume_batch_size(store: Path, batch_size: int | None) -> int:
    """The batch size of a run into ``store``: the one its stopped run encoded with, where that run's
    marker records it (:func:`~ragcompress.store.files.stopped_run_batch_size`), else ``batch_size``
    (None: :data:`DEFAULT_BATCH_SIZE`). A cache's bytes depend on the batch it is encoded in (in
    bfloat16 enough to change which rows a compressor keeps; docs/guarantees.md), so a
    resume cutting other batches would store other bytes than the uninterrupted run: another size
    given for a stopped run is refused (``StoreMismatchError``) before anything is written. Only
    a stopped run's marker counts (a run still going is another writer's, which the lock refuses),
    so callers check early, before the model loads, and decide under the writer's lock; the run's
    own marker records what this returns (:func:`~ragcompress.store.files.indexing_run`)."""
    recorded = stopped_run_batch_size(store)
    if recorded is None:
        return batch_size or DEFAULT_BATCH_SIZE
    if batch_size is not None and batch_size != recorded:
        raise StoreMismatchError(
            f"store {store}: the indexing run that stopped in it encoded batches of {recorded} passages, this run "
            f"asks for --batch-size {batch_size} (batch_size= in Python), and a cache's bytes depend on its batch; "
            f"resume with --batch-size {recorded} (or none), or rebuild the store with --overwrite"
        )
    return recorded


def _batches(items: Iterator[PassageInput], size: int) -> Iterator[list[PassageInput]]:
    while batch := list(islice(items, size)):
        yield batch


def update_fields(writer: StoreWriter, batch: list[PassageInput], unchanged: Collection[str]) -> int:
    """Give the passages of ``batch`` stored with their text (``unchanged``, skipped) the input's
    title and metadata where the stored ones differ (key order counts: it is the order callers
    show): a re-run with an edited title kept the old one. Nothing is encoded; ``update_meta``
    computes each row's ``meta_checksum`` anew (``verify`` passes), as for the LlamaIndex
    ingestion. Returns how many were updated; shared by the one-process and the Ray run."""
    if not unchanged:
        return 0
    entries = writer.catalogue.get_many(unchanged)
    changed = [
        (p.id, p.title, p.meta)
        for p in batch
        if p.id in entries and (entries[p.id].title != p.title or json.dumps(entries[p.id].meta) != json.dumps(p.meta))
    ]
    return writer.update_meta(changed) if changed else 0


def stale_chunks(writer: StoreWriter, counts: dict[str, int] | None) -> tuple[str, ...]:
    """Stored ids ``<document>#<n>`` of the input's documents (a folder, or one document) with n
    at or beyond the chunks the document has now: a document edited to fewer chunks (``--replace``
    re-encodes the ones it still has) leaves its old last chunks stored and searchable, holding
    text it no longer contains. Named in the report, not removed: a store may have been built
    from more than this input, and ``ragcompress remove`` deletes them. Shared by the one-process
    and the Ray run. ``counts``: :func:`document_chunks` filled by :func:`count_chunks` from the
    run's own encoding pass (reading and chunking every document again after the run was one
    more pass over the input); None for JSONL."""
    if not counts:
        return ()
    stale: list[str] = []
    for document, count in counts.items():
        for stored in writer.catalogue.ids_starting(f"{document}#"):
            number = stored[len(document) + 1 :]
            if number.isdecimal() and number.isascii() and int(number) >= count:
                stale.append(stored)
    return tuple(stale)


def count_input(input_path: Path, existing: Path | None, replace: bool) -> int:
    """The input's passage count after one validating pass, before anything is written. Adding to
    an ``existing`` store also refuses a damaged prefix (every passage is read after it) and, in
    the same pass, ids stored with another text unless they ``replace`` them. Shared by the
    one-process and the Ray run."""
    if existing is None:
        return validate(input_path)
    with KVStore.open(existing) as stored:
        stored.prefix_kv()
        return validate(input_path, None if replace else stored.catalogue.shas_of, str(existing))


def settings_for(
    existing: Path | None,
    config: IndexConfig | None,
    model: str | None,
    dtype: str | None = None,
    adaptor: str | None = None,
) -> tuple[IndexConfig, str | None, str | None]:
    """The settings, model and model dtype to index with: those given, else an existing store's
    own (adding passages without repeating every option), else the defaults. ``adaptor`` (only
    without ``config``): the folder or name of the adaptor to encode with; an existing store
    records its adaptor by hash only, so one that is not packaged must be named here."""
    if adaptor is not None and config is not None:
        raise ValueError(
            "give the adaptor in config (IndexConfig(adaptor=...)) or adaptor= alone (the store's own settings, "
            "or the defaults for a new store), not both"
        )
    if existing is None:
        return config or IndexConfig(adaptor=adaptor), model, dtype
    manifest = Manifest.read(existing)  # a manifest it cannot read names the rebuild with the settings
    embedded = {DEFAULT_MODEL, EVAL_MODEL}  # names that mean one model each: compared before it loads (seconds)
    if model is not None and model != manifest.model_ref and {model, manifest.model_ref} <= embedded:
        raise StoreMismatchError(
            f"store was built with model {manifest.model_ref}, this run uses {model}; give the store's model "
            "(or none, to reuse it), another --store, or --overwrite"
        )
    return config or config_from_manifest(manifest, adaptor), model or manifest.model_ref, dtype or manifest.dtype


def run_indexer(
    lm: LoadedModel, config: IndexConfig, embedder: TextEmbedder | None, input_path: Path | None, existing: Path | None
) -> Indexer:
    """The indexer of one run (one process, a Ray driver, the LlamaIndex ingestion): built from
    ``config``, with its low-rank basis (the ``existing`` store's when adding to it, else fitted
    on ``config.calibration`` or ``input_path``), and refused when an ``existing`` store was built
    with another adaptor or other settings."""
    indexer = Indexer.from_config(lm, config, embedder)
    spec = config.rank_spec()
    if spec is not None:
        indexer = attach_basis(indexer, config, spec, input_path, existing)
    if existing is not None:
        check_same_build(Manifest.read(existing), indexer)
    return indexer


def check_same_build(stored: Manifest, indexer: Indexer) -> None:
    """Refuse adding ``indexer``'s caches to a store built otherwise (``StoreMismatchError``):
    the first setting that differs is named (model, template, compression before the passage
    encoding: a preset on another store differs in its compression first), an adaptor in its own
    words. ``index`` and the LlamaIndex ingestion both check here."""
    difference = stored.build_difference(indexer.manifest)
    if difference is not None and difference[0] == "passage encoding":
        check_store_adaptor(stored.adaptor_hash, indexer.manifest.adaptor_hash)
    stored.check_same_build(indexer.manifest)


def create_store_for(target: Path, indexer: Indexer) -> None:
    """A new store at ``target`` for ``indexer``: its manifest, prefix cache and basis (if any).
    A prefix cache the codec refuses (inf or NaN: the model overflowed in its dtype) is named as
    the prefix's; the store is built in a temp folder, so nothing is left at ``target``."""
    basis = basis_to_bytes(indexer.basis) if indexer.basis is not None else None
    try:
        create_store(target, indexer.manifest, indexer.prefix_kv, basis)
    except UnstorableCacheError as exc:
        raise UnstorableCacheError(f"the prompt prefix: {exc} (nothing was written)") from None


def attach_basis(
    indexer: Indexer, config: IndexConfig, spec: RankSpec, input_path: Path | None, existing: Path | None
) -> Indexer:
    """``indexer`` writing latents: of the basis of the store at ``existing`` (a store of full
    rows is refused here, before a basis is fitted for nothing), else of a basis fitted on the
    first ``config.calibration_passages`` of ``config.calibration`` (or of the input), encoded by
    the base model (:attr:`Indexer.calibration_encoder`)."""
    if existing is not None:
        with KVStore.open(existing) as store:
            lowrank = store.manifest.compression.get("lowrank")
            if store.basis is not None and isinstance(lowrank, dict):
                return indexer.with_basis(store.basis, spec, str(lowrank["calibration"]))
        raise StoreMismatchError(
            f"store was built with full-rank rows, this run asks for low-rank latents "
            f"{json.dumps(spec.as_dict(), sort_keys=True)}; use the store's settings (give none to reuse them), "
            "another --store, or --overwrite"
        )
    source = Path(config.calibration) if config.calibration else input_path
    if source is None:
        raise ValueError(
            "a new low-rank store (rank or rank_energy) needs its calibration passages: give "
            "IndexConfig(calibration=PASSAGES_JSONL), or build the store with `ragcompress index` first"
        )
    calibration = f"{'input' if config.calibration is None else source.name}:first-{config.calibration_passages}"
    sample = calibration_sample(indexer, source, config.calibration_passages, given=config.calibration is not None)
    basis = fit_calibration_basis(indexer.calibration_encoder, sample, spec, config.calibration_passages)
    return indexer.with_basis(basis, spec, calibration)


CALIBRATION = "(--calibration, IndexConfig(calibration=...) in Python)"


def calibration_sample(indexer: Indexer, source: Path, limit: int, given: bool) -> list[PassageInput]:
    """The first ``limit`` passages of ``source``, refused (``InputError``) before the basis is
    fitted when there are none (an empty file was a ValueError from the fit) or one is longer
    than the model's positions (it was encoded past them): the length check indexing applies to
    passages, with its compressor's probe check for the input's (stored afterwards, unlike a
    calibration file's). ``given``: ``source`` is the ``calibration`` setting, named in the
    messages (else the input, validated already)."""
    if given and not source.exists():
        raise InputError(
            f"calibration passages {source} {CALIBRATION} do not exist; give a JSONL file or folder of passages, "
            "or leave it out to fit on the input"
        )
    sample = list(islice(iter_passages(source), limit))
    if not sample:
        raise InputError(
            f"calibration file {source} {CALIBRATION} holds no passages, and the low-rank basis is fitted on them; "
            "give a JSONL file or folder of passages like the input, or leave it out to fit on the input"
        )
    try:
        indexer.check_lengths(sample, stored=not given)  # the input's passages are stored too, a given file's not
    except InputError as exc:
        if not given:
            raise
        raise InputError(f"calibration passages {source} {CALIBRATION}: {exc}") from None
    return sample


def check_index_arguments(config: Any, batch_size: Any, model: str | None, lm: Any) -> None:
    """Refuse, before any store is touched, what Python callers of :func:`index` and
    :func:`~ragcompress.indexing.ray_runner.index_on_ray` can pass that the CLI cannot: a batch
    size of 0 indexed nothing and reported success, a negative one left a store mid-run, a dict
    for ``config`` failed deep in the indexer, and a ``model`` beside an ``lm`` of another model
    was ignored (the store recorded ``lm``'s). ``batch_size`` None: the size a stopped run to
    resume recorded, else :data:`DEFAULT_BATCH_SIZE` (:func:`resume_batch_size`)."""
    if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
        raise ValueError(f"batch_size must be a whole number of passages, 1 or more; got {batch_size!r}")
    if config is not None and not isinstance(config, IndexConfig):
        raise TypeError(
            f"config must be an IndexConfig (ragcompress.indexing.IndexConfig(...)), got {type(config).__name__}"
        )
    if model is not None and lm is not None and not _same_model_ref(model, lm.ref):
        raise ValueError(
            f"model={model!r} and lm (a loaded {lm.ref!r}) name different models; give one of them "
            "(lm reuses a loaded model: model is then not needed)"
        )


def _same_model_ref(a: str, b: str) -> bool:
    """Whether two model references name one model: the same text, or the same folder."""
    return a == b or (
        Path(a).expanduser().exists() and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    )


def index(
    input_path: str | Path,
    store_path: str | Path,
    *,
    model: str | None = None,
    config: IndexConfig | None = None,
    overwrite: bool = False,
    replace: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
    lm: LoadedModel | None = None,
    embedder: TextEmbedder | None = None,
    dtype: str | None = None,
    device: str | None = None,
    adaptor: str | None = None,
) -> IndexReport:
    """Index ``input_path`` (JSONL or folder) into the store at ``store_path``.

    ``lm`` and ``embedder`` reuse loaded models; the embedder must be the one ``config.embedder``
    names (it is loaded from that name when not given). ``config`` None: an existing store's own
    settings and model (:func:`settings_for`), defaults for a new one. ``dtype``: the model's
    weights (a name of :data:`~ragcompress.models.DTYPES`; an existing store's own, else
    float32), recorded in the manifest when not float32. ``device``: where the model loaded here
    runs its forwards (``cpu``, ``cuda``, ``cuda:N``; :class:`~ragcompress.indexing.encoder.PassageEncoder`),
    not recorded: a store indexed on a GPU is read like any other. ``replace``: a passage stored
    under its id with another text is re-encoded and replaces it (without it, that is an error
    raised before anything is written). ``adaptor`` (without ``config``): the folder of the
    adaptor an existing store was built with when it is not packaged (its hash is checked against
    the store's), the store's other settings kept; for a new store, the defaults with it.
    ``batch_size``: passages encoded together; None resumes a stopped run with the size it
    recorded, and is :data:`DEFAULT_BATCH_SIZE` otherwise; another size for a stopped run is
    refused (:func:`resume_batch_size`).
    """
    start = time.perf_counter()
    check_index_arguments(config, batch_size, model, lm)
    input_path, store_path = Path(input_path), Path(store_path)
    remove_litter(store_path)
    exists = (store_path / MANIFEST).is_file()
    if not exists:
        check_creatable(store_path)
    total = count_input(input_path, store_path if exists and not overwrite else None, replace)
    if exists and not overwrite:  # another batch size for a stopped run: refused before the model loads
        resume_batch_size(store_path, batch_size)
    # --overwrite replaces what is at the path: only ever a store (even one whose manifest is lost)
    rebuild = overwrite and store_path.exists() and (not store_path.is_dir() or any(store_path.iterdir()))
    refusal = overwrite_refusal(store_path) if rebuild else None
    if refusal is not None:
        raise StoreError(
            f"{store_path} {refusal}; refusing to overwrite it (--overwrite deletes the folder it replaces): "
            "move what you keep out of it, or choose another --store"
        )
    if rebuild and not exists and config is None:  # the defaults would silently replace how it was built
        raise StoreError(
            f"{store_path} lost its manifest.json, so the settings it was built with are unknown; to rebuild it, "
            f"give {SETTINGS} with --overwrite (config= in Python)"
        )
    # --overwrite with no settings rebuilds the store with its own (a new model version, a damaged shard)
    existing = store_path if exists and (not overwrite or config is None) else None
    config, model, dtype = settings_for(existing, config, model, dtype, adaptor)
    lm = lm or load_model(model, dtype=dtype, device=device)
    indexer = run_indexer(lm, config, embedder, input_path, store_path if exists and not overwrite else None)
    indexer.check_lengths(iter_passages(input_path))

    # a store reached through a symbolic link is written, rebuilt and swapped where the link
    # points, the link kept (swapping the link itself left the old store there, undeleted)
    real = store_path.resolve()
    target = real
    if not exists and not overwrite:  # a store another process created since the check above: retry
        refuse_existing(store_path)
    old_lock = None
    if rebuild:  # hold the old store's writer lock until the new one replaces it
        old_lock = StoreLock(real)
        target = real.with_name(f".{real.name}.overwrite-{os.getpid()}")
        remove_tree(target)
    elif overwrite and real.exists():
        real.rmdir()  # an empty directory (checked above)
    try:
        indexed, skipped, replaced, updated, stale, short, past = _write(
            indexer, input_path, target, total, replace, batch_size, progress
        )
        if target != real:
            replace_store(target, real)
    except BaseException:
        if target != real:  # a failed --overwrite leaves the old store as it was, and no half-built copy
            remove_tree(target)
        raise
    finally:
        if old_lock is not None:  # released even when the caller keeps the exception (a notebook)
            old_lock.release()
    seconds = time.perf_counter() - start
    window = embedder_window(indexer, past)
    return IndexReport(total, indexed, skipped, seconds, str(store_path), replaced, updated, stale, short, past, window)


def embedder_window(indexer: Indexer, past: int) -> int:
    """The window of ``indexer``'s embedder in word pieces, when ``past`` passages were longer
    than it (an embedder that counted them has one), else 0: read only then, so a Ray driver,
    whose embedder embeds nothing, loads it only to name the window in a warning."""
    # `window` is Embedder's, not TextEmbedder's: past > 0 only from an embedder that counted (past_window)
    embedder: Any = indexer.embedder
    return int(embedder.window) if past else 0


def short_context(passages: int, pool: int, neighbours: int) -> int:
    """How many of ``passages`` encoded passages got fewer than ``neighbours`` encoding neighbours
    from a pool (the run's whole input, each passage among them) of ``pool`` passages: all of them
    when the input holds ``neighbours`` passages or fewer (a single appended passage gets none)."""
    return passages if neighbours and pool - 1 < neighbours else 0


def remove(store_path: str | Path, ids: list[str], *, missing_ok: bool = False) -> int:
    """Delete the passages ``ids`` from the store at ``store_path`` and rebuild its FAISS index;
    returns how many were removed. An id the store does not hold is an error raised before
    anything is deleted, unless ``missing_ok``. The rows go in one transaction and readers
    rebuild their index (the catalogue's generation changes); the blobs stay in the shards,
    unreferenced, until ``ragcompress compact`` (``ragcompress verify`` counts their bytes)."""
    if isinstance(ids, (str, bytes)):  # a string is a sequence of one-character ids
        raise TypeError(f"ids must be a list of passage ids, got the {type(ids).__name__} {ids!r}: pass [{ids!r}]")
    store_path = Path(store_path)
    if not (store_path / MANIFEST).is_file():
        raise StoreError(
            f"{store_path} is not a ragcompress store (no manifest.json); check the --store path, "
            "or build one with `ragcompress index`"
        )
    Manifest.read(store_path)  # a folder with some other manifest.json is refused before its lock file is taken
    if not (store_path / CATALOGUE).is_file():
        raise StoreError(f"{store_path} has no {CATALOGUE}; the store is damaged, rebuild it")
    wanted = list(dict.fromkeys(ids))
    with StoreWriter(store_path) as writer:
        stored = writer.known_of(wanted)
        missing = [pid for pid in wanted if pid not in stored]
        if missing and not missing_ok:
            shown = ", ".join(repr(pid) for pid in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise InputError(
                f"{len(missing)} of the ids to remove are not in {store_path}: {shown}; nothing was removed "
                "(check the ids, or remove the others with --missing-ok, missing_ok=True in Python)"
            )
        removed = writer.remove(wanted)
        writer.write_index()
    return removed


def _write(
    indexer: Indexer,
    input_path: Path,
    target: Path,
    total: int,
    replace: bool,
    batch_size: int | None,
    progress: bool,
) -> tuple[int, int, int, int, tuple[str, ...], int, int]:
    """Encode and commit ``input_path``'s passages into the store at ``target`` (created if
    absent) in batches of ``batch_size`` (:func:`resume_batch_size`, under the writer's lock);
    returns ``(indexed, skipped, replaced, updated, stale, short_context, past_embedder_window)``."""
    if not (target / MANIFEST).is_file():
        create_store_for(target, indexer)

    indexed = skipped = replaced = updated = past = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="passage", desc="indexing")
    # Neighbour-conditioned encoding draws every passage's neighbours from the whole input (of this
    # run: passages added to a store later draw from their own input only; short_context counts those short of N)
    pool = indexer.neighbour_pool(list(iter_passages(input_path))) if indexer.context_neighbors else None
    chunks = document_chunks(input_path)
    try:
        with StoreWriter(target) as writer:
            size = resume_batch_size(target, batch_size)
            with indexing_run(target, total, batch_size=size) as finished:
                for batch in _batches(iter_passages(input_path), size):
                    raise_if_stopped()  # a SIGTERM or Ctrl-C whose KeyboardInterrupt a finalizer swallowed
                    count_chunks(chunks, batch)
                    known = writer.known_of([p.id for p in batch])
                    unchanged = {p.id for p in batch if known.get(p.id) == p.text_sha}
                    writer.make_searchable(unchanged)  # ones a query had cached are part of the corpus now
                    updated += update_fields(writer, batch, unchanged)
                    records = indexer.records(batch, skip=unchanged, pool=pool)
                    if records:
                        writer.add(records, replace=replace)
                        past += past_window(indexer.embedder, [r.text for r in records])
                    indexed += len(records)
                    replaced += sum(1 for r in records if r.id in known)
                    skipped += len(batch) - len(records)
                    if bar is not None:
                        bar.update(len(batch))
                writer.write_index()
                stale = stale_chunks(writer, chunks)
                finished()
    finally:
        if bar is not None:
            bar.close()
    short = short_context(indexed, len(pool.ids), indexer.context_neighbors) if pool is not None else 0
    return indexed, skipped, replaced, updated, stale, short, past
