"""Writing nodes' caches into a store and finding them again (shared by all components).

:class:`CacheWriter` turns nodes into store records with ragcompress's
:class:`~ragcompress.indexing.Indexer` (the store's settings, the same write path as
``ragcompress index``) and commits them with :class:`~ragcompress.store.StoreWriter`.
A node's passage id is its node id; when that id is already stored with another text (the node
was edited), the passage id becomes ``"{node_id}~{sha256(text)[:16]}"`` so old and new caches
never mix. :class:`CacheResolver` maps nodes to store entries, computing missing ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.schema import BaseNode

from llama_index.postprocessor.ragcompress._shared import (
    encoding,
    get_handle,
    node_text,
    passage_meta,
    require_ragcompress,
    set_handle,
    shared_embedder,
    store_path,
    text_sha,
    writer_model,
)
from llama_index.postprocessor.ragcompress.events import KVCacheStoredEvent

dispatcher = instrument.get_dispatcher(__name__)


def alias_id(node_id: str, sha: str) -> str:
    return f"{node_id}~{sha[:16]}"


def checked_passage_id(passage_id: str, node_id: str, what: str = "id") -> str:
    """``passage_id`` (a node's id, or ``what`` else), refused as ``ragcompress index`` refuses
    it in a JSONL input (``InputError``): a store never holds an id its CLI could not take."""
    from ragcompress.errors import InputError
    from ragcompress.indexing.inputs import check_id

    shown = repr(node_id) if len(node_id) <= 60 else f"{node_id[:40]!r}... ({len(node_id)} characters)"
    try:
        return check_id(passage_id, f"node {shown}" + ("" if what == "id" else f" ({what})"))
    except InputError as exc:
        raise InputError(f"{exc}; give the node such an id (id_=..., or a splitter's id_func)") from None


# How long a writer waits for another one (another process indexing the same store).
WRITER_WAIT_S = 600.0


def finish_pipeline(batch_size: int) -> str:
    """What a store's unfinished-run message tells the user to do when an ingestion call that
    encoded batches of ``batch_size`` stopped midway (a resume keeps that size: :func:`check_batch_size`).
    It names calling the transform itself: an ``IngestionPipeline`` with a docstore records each
    document's hash before its transformations run, so rerunning it hands the transform none of
    the documents the stopped call had, and the store would stay unfinished."""
    return (
        f"call the KVCacheTransform (batch_size={batch_size}) over the same nodes again, or rerun an "
        "IngestionPipeline without a docstore (one with a docstore skips the documents it recorded before the "
        "call stopped); stored nodes are not encoded again"
    )


def check_batch_size(path: Path, batch_size: int) -> None:
    """Refuse ``batch_size`` (``StoreMismatchError``) where an indexing run that stopped in the
    store at ``path`` recorded another: the check ``ragcompress index`` makes
    (:func:`~ragcompress.indexing.run.resume_batch_size`), for a transform whose batches are cut
    from the nodes it has still to store, so a resume with the stopped call's size encodes the
    batches it would have, and another size stores other bytes (docs/guarantees.md)."""
    from ragcompress.errors import StoreMismatchError
    from ragcompress.indexing.run import resume_batch_size
    from ragcompress.store.files import stopped_run_batch_size

    try:
        resume_batch_size(path, batch_size)
    except StoreMismatchError:  # its text names the CLI's --batch-size and --overwrite, which a transform lacks
        recorded = stopped_run_batch_size(path)
        raise StoreMismatchError(
            f"store {path}: the ingestion call that stopped in it encoded batches of {recorded} nodes, this "
            f"KVCacheTransform has batch_size={batch_size}, and a cache's bytes depend on its batch; finish it with "
            f"KVCacheTransform(batch_size={recorded}, ...), or build into another store_path"
        ) from None


def _no_marker() -> None:
    """What a write without a run marker calls when it finishes: nothing."""


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _writing(path: str) -> threading.Lock:
    """This process's lock for writing the store at ``path`` (one writer thread at a time)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(path, threading.Lock())


class CacheWriter:
    """Computes and commits caches for nodes; see :meth:`for_build` and :meth:`for_existing`.

    The caches come from ragcompress's :class:`~ragcompress.indexing.Indexer`, the write path
    ``ragcompress index`` uses, so a node's cache is exactly what indexing its text would store.
    Its model is the process's :func:`~._shared.writer_model` copy, never the one components
    answer with, and every forward on it runs under :func:`~._shared.encoding`: encoding
    changes the model object while it runs (hooks, swapped-in adaptor weights).
    """

    def __init__(
        self, path: str, indexer: Any, batch_size: int = 8, replace_edited: bool = False, checked: bool = True
    ) -> None:
        """``checked``: the store at ``path`` is known to be ``indexer``'s build; False when it did
        not exist yet, so one created by another process meanwhile is checked before writing."""
        self.path = store_path(path)
        self.indexer = indexer
        self.batch_size = batch_size
        self.replace_edited = replace_edited
        self.checked = checked

    @classmethod
    def for_build(
        cls,
        path: str,
        model: str | None,
        config: Any,
        batch_size: int = 8,
        replace_edited: bool = False,
        dtype: str | None = None,
        device: str | None = None,
    ) -> CacheWriter:
        """Writer for a store built with ``model`` and ``config`` (an ``IndexConfig``); an existing
        store must have been built the same way (else ``StoreMismatchError``). Either None: an
        existing store's own (as ``ragcompress index`` given no settings), else the defaults.
        ``replace_edited``: a node stored under its id with another text replaces that cache
        (``index --replace``) instead of being stored beside it under an alias id. ``dtype``: the
        model's weights (None: an existing store's own, else float32); ``device``: where its
        forwards run (None: CPU)."""
        require_ragcompress()
        from ragcompress.errors import InputError, StoreMismatchError
        from ragcompress.indexing import Indexer
        from ragcompress.indexing.run import run_indexer, settings_for
        from ragcompress.store import KVStore, Manifest
        from ragcompress.store.manifest import MANIFEST

        exists = (Path(path) / MANIFEST).is_file()
        existing = Manifest.read(Path(path)) if exists else None
        if exists:  # another batch size for a stopped call: refused before the model loads, as `index` does
            check_batch_size(Path(path), batch_size)
        given = config is not None or model is not None
        try:
            config, model, dtype = settings_for(Path(path) if exists else None, config, model, dtype)
        except InputError as exc:  # settings the manifest cannot give back (an adaptor not packaged)
            raise InputError(
                f"{exc} (to KVCacheTransform: config=IndexConfig(...) with the store's settings)"
            ) from None
        lm = writer_model(model, dtype, device)
        # the same settings as an existing store (its basis, for a low-rank one), or a new store's
        # basis fitted on config.calibration: `ragcompress index`'s checks, in its own function
        try:
            with encoding(lm):  # fitting a basis runs the model
                indexer = run_indexer(
                    lm, config, shared_embedder(config.embedder), None, Path(path) if exists else None
                )
        except StoreMismatchError as exc:
            if not given:
                raise
            raise StoreMismatchError(
                f"{exc} (to KVCacheTransform: config=None and model=None use the store's own)"
            ) from None
        if existing is not None:
            with KVStore.open(Path(path)) as store:  # the store's own settings, as it records them
                indexer = Indexer.for_store(existing, lm, indexer.embedder, indexer.adaptor).with_store_basis(store)
        return cls(path, indexer, batch_size, replace_edited, checked=exists)

    @classmethod
    def for_existing(
        cls,
        path: str,
        model: str | None = None,
        batch_size: int = 8,
        device: str | None = None,
        adaptor: str | None = None,
    ) -> CacheWriter:
        """Writer that adds to an existing store with its own model (or ``model``, the same one
        spelt another way; in the dtype its passages were encoded in, on ``device``) and
        settings. ``adaptor``: the folder of the adaptor the store was built with (``index
        --adaptor FOLDER``); a store records only its hash, so an adaptor that is not packaged
        cannot be found without it."""
        require_ragcompress()
        from ragcompress.errors import StoreError
        from ragcompress.indexing import Indexer
        from ragcompress.store import KVStore, Manifest

        if not Path(path).is_dir():
            raise StoreError(f"store {path} does not exist; build it with KVCacheTransform or `ragcompress index`")
        manifest = Manifest.read(Path(path))
        lm = writer_model(model or manifest.model_ref, manifest.dtype, device)
        loaded = _store_adaptor(path, manifest, lm, adaptor)
        indexer = Indexer.for_store(manifest, lm, shared_embedder(manifest.embedder), loaded)
        with KVStore.open(Path(path)) as store:  # a low-rank store's latents need its basis
            return cls(path, indexer.with_store_basis(store), batch_size)

    def _passages(
        self, nodes: Sequence[BaseNode], known: dict[str, str]
    ) -> tuple[list[str | None], list[Any], list[Any], list[Any]]:
        """Each node's passage id (None without text), the passages not stored with their text
        yet (an edited node's under its alias id, or under its own id with ``replace_edited``),
        every passage of ``nodes`` (the input neighbours are drawn from, as ``ragcompress index``
        draws them from its whole input), and the passages stored with their text already."""
        from ragcompress.indexing.inputs import PassageInput

        ids: list[str | None] = []
        todo: dict[str, Any] = {}
        inputs: dict[str, Any] = {}
        stored: dict[str, Any] = {}
        for node in nodes:
            text = node_text(node)
            if not text.strip():
                ids.append(None)
                continue
            sha = text_sha(text)
            pid = checked_passage_id(node.node_id, node.node_id)
            edited = known.get(pid, sha) != sha  # stored under its id with another text
            if (edited and not self.replace_edited) or (pid in todo and todo[pid].text_sha != sha):
                pid = checked_passage_id(alias_id(node.node_id, sha), node.node_id, "its edited text's alias id")
            passage = PassageInput(pid, text, str(node.metadata.get("title", "")), passage_meta(node))
            if known.get(pid) != sha and pid not in todo:  # not stored with this text (or replacing it)
                todo[pid] = passage
            elif known.get(pid) == sha:
                stored.setdefault(pid, passage)
            inputs.setdefault(pid, passage)
            ids.append(pid)
        return ids, list(todo.values()), list({**inputs, **todo}.values()), list(stored.values())

    def _open_store(self, path: Path) -> None:
        """Create the store unless it exists, and check one created by another process since this
        writer was set up (an ``IngestionPipeline(num_workers=...)`` worker that lost the race to
        create it, or any writer that came first) like :meth:`for_build` checks an existing one."""
        from ragcompress.errors import StoreError
        from ragcompress.indexing.run import check_same_build, create_store_for
        from ragcompress.store import Manifest
        from ragcompress.store.manifest import MANIFEST

        if not (path / MANIFEST).is_file():
            try:
                create_store_for(path, self.indexer)  # with a low-rank store's basis
                self.checked = True
            except StoreError:
                if not (path / MANIFEST).is_file():  # not the race: the path cannot hold a store
                    raise
        if not self.checked:
            check_same_build(Manifest.read(path), self.indexer)
            self.checked = True

    def write(
        self, nodes: Sequence[BaseNode], *, write_index: bool = True, update_fields: bool = False
    ) -> list[str | None]:
        """Store the caches of ``nodes`` not yet stored; returns each node's passage id (None for
        a node without text). Attaches the handle to every node with text. See :meth:`write_reporting`."""
        return self.write_reporting(nodes, write_index=write_index, update_fields=update_fields)[0]

    def write_reporting(
        self, nodes: Sequence[BaseNode], *, write_index: bool = True, update_fields: bool = False
    ) -> tuple[list[str | None], list[str]]:
        """:meth:`write`, and the ids this call encoded: not a node another writer (a concurrent
        query, another process) stored while this one waited for the lock.

        ``update_fields`` (ingestion): a node stored with its text already is not encoded again,
        but its title and :func:`passage_meta` (metadata, excluded keys, relationships) replace
        the stored ones where they differ. Off for caches computed at query time, whose nodes
        must not overwrite what ingestion stored.

        ``write_index`` False (caches computed at query time): the new rows are not searchable,
        so no retriever of the store ever returns them (a query adds nothing to the corpus, nor
        brings back a removed passage: :mod:`ragcompress.store.catalogue`); ingestion (True)
        makes searchable what a query had cached before."""
        from ragcompress.indexing.run import update_fields as update_stored_fields
        from ragcompress.store import StoreWriter
        from ragcompress.store.files import indexing_run

        start = time.perf_counter()
        path = Path(self.path)
        written: list[str] = []
        # Concurrent queries (aquery, threads) take turns; another process (a pipeline with
        # num_workers, `ragcompress index`) is waited for. What is stored is read again under the
        # lock, so a node another writer just stored is not encoded twice. Writers of other stores
        # in this process wait for the model (creating a store computes its prefix cache).
        with _writing(self.path), encoding(self.indexer.lm):
            self._open_store(path)
            with StoreWriter(path, wait_s=WRITER_WAIT_S) as writer:
                if write_index:  # decided under the lock, as `index` decides, before anything is written
                    check_batch_size(path, self.batch_size)
                ids, pending, inputs, stored = self._passages(nodes, writer.known())
                # as `ragcompress index`: a node too long for the model is refused before anything
                # is written, not after earlier batches were committed under the unfinished-run
                # marker, which every reader would then refuse until the same nodes run again
                self.indexer.check_lengths(pending)
                now_searchable = writer.make_searchable([p.id for p in stored]) if write_index else 0
                if update_fields:  # as `ragcompress index` gives skipped passages their new title and metadata
                    update_stored_fields(writer, stored, [p.id for p in stored])
                # A neighbour-conditioned store: neighbours come from all of ``nodes``, not one batch.
                pool = self.indexer.neighbour_pool(inputs) if pending and self.indexer.context_neighbors else None
                # Ingestion marks the store mid-run, as `ragcompress index` does: a call killed between
                # its commits leaves a store that answering refuses until the pipeline is re-run. Caches
                # computed at query time (no index write) are each complete once committed.
                run = (
                    indexing_run(path, len(nodes), finish_pipeline(self.batch_size), batch_size=self.batch_size)
                    if write_index
                    else nullcontext(_no_marker)
                )
                with run as finished:
                    for begin in range(0, len(pending), self.batch_size):
                        records = self.indexer.records(pending[begin : begin + self.batch_size], pool=pool)
                        writer.add(records, replace=self.replace_edited, searchable=write_index)
                        written += [record.id for record in records]
                    if (written or now_searchable) and write_index:
                        writer.write_index()
                    finished()
        for node, pid in zip(nodes, ids, strict=True):
            if pid is not None:
                set_handle(node, self.path, pid)
        if written:
            dispatcher.event(
                KVCacheStoredEvent(store=self.path, passage_ids=written, seconds=time.perf_counter() - start)
            )
        return ids, written


def _store_adaptor(path: str, manifest: Any, lm: Any, folder: str | None) -> Any:
    """The adaptor the store at ``path`` was built with: ``folder``'s (a folder or packaged name,
    resolved as ``index --adaptor`` resolves it), else the packaged one of the recorded hash.
    Refused in this caller's words (``adaptor=``, ``compute_missing``) when it is not the store's:
    the library's refusal names ``--adaptor``, an option of the CLI only."""
    from ragcompress.distill.packaged import packaged_adaptor, resolve_adaptor
    from ragcompress.errors import StoreMismatchError

    recorded = manifest.adaptor_hash
    adaptor: Any
    if folder is not None:
        adaptor = resolve_adaptor(folder, lm.ref, lm.fingerprint)
        adaptor.check_model(lm.fingerprint, lm.ref)
    else:
        adaptor = packaged_adaptor(recorded)
    if (adaptor.hash if adaptor else None) == recorded:
        return adaptor
    if folder is None:
        raise StoreMismatchError(
            f"store {path} was built with adaptor {recorded[:16]}, which is not packaged, so its missing caches "
            "cannot be computed without it: pass its folder (adaptor=FOLDER), or compute_missing=False"
        )
    built = f"adaptor {recorded[:16]}" if recorded else "no adaptor (the base model)"
    raise StoreMismatchError(
        f"store {path} was built with {built}, not with adaptor {folder} ({adaptor.hash[:16]}); "
        + ("pass the store's adaptor folder (adaptor=FOLDER)" if recorded else "leave adaptor unset")
    )


class CacheResolver:
    """Finds the store entries of nodes (by handle, node id or text alias), computing missing ones.

    ``store`` is an open ``KVStore``; its model (``model``: the same one spelt another way, else
    the manifest's) is loaded on ``device`` only when a cache has to be computed, as the
    process's :func:`~._shared.writer_model` copy, never the object answering runs on;
    ``adaptor`` (a folder) is the store's adaptor, needed to compute caches when it is not a
    packaged one.
    """

    def __init__(
        self,
        store: Any,
        model: str | None = None,
        compute_missing: bool = True,
        device: str | None = None,
        adaptor: str | None = None,
    ) -> None:
        self.store = store
        self.path = store_path(store.path)
        self.model = model
        self.compute_missing = compute_missing
        self.device = device
        self.adaptor = adaptor
        self._writer: CacheWriter | None = None

    def _lookup(self, node: BaseNode) -> Any | None:
        sha = text_sha(node_text(node))
        handle = get_handle(node)
        candidates = [handle[1]] if handle and store_path(handle[0]) == self.path else []
        candidates += [node.node_id, alias_id(node.node_id, sha)]
        for pid in candidates:
            entry = self.store.catalogue.get(pid)
            if entry is not None and entry.text_sha == sha:
                return entry
        return None

    def resolve(self, nodes: Sequence[BaseNode]) -> tuple[list[Any], list[str]]:
        """Entries for ``nodes`` in order, and the passage ids computed on the fly.
        Every node gets its handle; nodes without text raise ``InputError``."""
        from ragcompress.errors import InputError, StoreError

        entries = [self._lookup(node) for node in nodes]
        missing = [node for node, entry in zip(nodes, entries, strict=True) if entry is None]
        computed: list[str] = []
        if missing:
            if not self.compute_missing:
                raise StoreError(
                    f"node {missing[0].node_id!r} has no cache in store {self.path}; "
                    "add it with KVCacheTransform or set compute_missing=True"
                )
            if self._writer is None:
                self._writer = CacheWriter.for_existing(self.path, self.model, device=self.device, adaptor=self.adaptor)
            ids, computed = self._writer.write_reporting(missing, write_index=False)
            for node, pid in zip(missing, ids, strict=True):
                if pid is None:
                    raise InputError(f"node {node.node_id!r} has no text to cache")
            entries = [
                self._lookup(node) if entry is None else entry for node, entry in zip(nodes, entries, strict=True)
            ]
        found: list[Any] = []
        for node, entry in zip(nodes, entries, strict=True):
            if entry is None:  # written above; a concurrent writer may not replace it meanwhile
                raise StoreError(f"node {node.node_id!r}: its cache was written but cannot be found in {self.path}")
            set_handle(node, self.path, entry.id)
            found.append(entry)
        return found, computed
