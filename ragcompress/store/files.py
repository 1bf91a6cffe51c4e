"""A store's files as a whole: their names, writing one atomically, creating a store, and
putting a rebuilt store in place of an old one (``compact``, ``index --overwrite``).

Every step that makes a file or a store visible is a rename, fsynced into its directory, so a
kill at any moment leaves either the old state or the new one (docs/guarantees.md); the crash
tests patch these functions by name (tests/store_worker.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ragcompress.errors import InputError, StoreError
from ragcompress.kv import PassageKV
from ragcompress.kv.quant import QuantConfig
from ragcompress.paths import follow_umask, process_gone, remove_dead_temps, remove_tree
from ragcompress.store import codec
from ragcompress.store.basis import BASIS
from ragcompress.store.catalogue import CATALOGUE, Catalogue
from ragcompress.store.jsontext import loads_json
from ragcompress.store.manifest import MANIFEST, SETTINGS, Manifest
from ragcompress.store.shards import SHARD_DIR, fsync_dir, is_shard_name

PREFIX = "prefix.safetensors"
INDEX = "index.faiss"
INDEX_META = "index.json"
LOCK = "lock"
# present while an indexing run adds passages, deleted when it finishes (:func:`indexing_run`)
RUN = "indexing-run"
# every name a store's folder holds: what create_store writes, the catalogue with SQLite's companion
# files, the search index, the writer lock and the shards folder (write_atomic's temp files aside)
STORE_ENTRIES = frozenset(
    {MANIFEST, PREFIX, BASIS, INDEX, INDEX_META, LOCK, RUN, SHARD_DIR}
    | {CATALOGUE + suffix for suffix in ("", "-wal", "-shm", "-journal")}
)


def links_refused(path: Path, name: str) -> StoreError:
    """The error for a store whose entry ``name`` is a symbolic link (see :func:`refuse_links`)."""
    return StoreError(
        f"store {path} holds a symbolic link, {name}; a store must not contain links (a writer would write "
        "through it, outside the store): no writer adds to it. Rebuild it with `ragcompress index --overwrite`, "
        "or replace the link by the file it points at"
    )


def refuse_links(path: Path) -> None:
    """Raise unless no fixed entry of the store at ``path`` (:data:`STORE_ENTRIES`) and no shard
    is a symbolic link. A store may come from someone else (a tar, a git repository), and its
    writer truncates shards, writes the catalogue, index and lock, and creates and deletes files
    in ``shards/``, each by its path: through a link, those would be files outside the store.
    Readers read through links (what they read is checksummed, and they write nothing)."""
    for name in sorted(STORE_ENTRIES):
        if (path / name).is_symlink():
            raise links_refused(path, name)
    shards = path / SHARD_DIR
    if shards.is_dir():
        for entry in sorted(shards.iterdir()):
            if entry.is_symlink():
                raise links_refused(path, f"{SHARD_DIR}/{entry.name}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (temp file, fsync, rename, fsync of the directory): a
    reader or a crash never sees half a prefix, basis or index file. Shared by the store's writers
    (``compact`` too); the crash tests patch it by this name (tests/store_worker.py)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a link left there (a killed writer's file, or a hostile store's) is not followed
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def replace_store(built: Path, path: Path) -> None:
    """Put the complete store ``built`` in place of the store at ``path`` and delete the old one.

    The swap is one atomic ``renameat2`` exchange where the OS supports it, so a kill at any
    moment leaves either the old or the new store at ``path``, never neither. ``path`` is the
    store's folder itself, not a symbolic link to it (the caller resolves it): a link would be
    what is swapped, the old store left where it pointed.
    """
    if _exchange(built, path):
        fsync_dir(path.parent)
        remove_tree(built)  # now holds the old store
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(built, path)
    fsync_dir(path.parent)
    remove_tree(old)


# the stores this process is indexing into now (its own pid is alive whether or not a run is)
_RUNNING_HERE: set[Path] = set()


def finish_index(batch_size: int | None = None) -> str:
    """How to finish a stopped ``ragcompress index`` run, with the batch size it encoded with where
    it recorded one (a resume keeps that size: ``indexing.run.resume_batch_size``). Other writers
    (the LlamaIndex transform) name their own way."""
    size = "" if batch_size is None else f", and --batch-size {batch_size} or none"
    return f"re-run `ragcompress index` with the same input and --store{size} (it resumes where it stopped)"


@contextmanager
def indexing_run(
    path: Path, passages: int, finish: str | None = None, batch_size: int | None = None
) -> Iterator[Callable[[], None]]:
    """Mark the store at ``path`` as being indexed (its ``RUN`` file: pid and that process's start
    time, input size, start, ``finish``, how to finish the run if it stops (by default
    :func:`finish_index`'s for ``batch_size``), and ``batch_size``,
    the passages it encodes together, when it cuts its input into batches of one size: a cache's
    bytes depend on its batch, so a resume must cut the same ones, :func:`stopped_run_batch_size`)
    until the run calls the function this yields, after its last commit and index write. A run
    killed before that leaves the file behind, and :func:`unfinished_run` tells readers that the
    store holds only part of its input and how to finish it. A run that fails in a process that
    goes on (a notebook, a service) rewrites the file with pid 0 as it leaves: its pid is alive,
    and would read as a run still going to every other process. A run stopped by an
    :class:`~ragcompress.errors.InputError` (a passage whose cache overflowed) records its message
    as ``refused``: running again as it was stops there again, so ``finish`` is not how to finish
    it. Call under the writer's lock."""
    pid = os.getpid()
    finish = finish or finish_index(batch_size)
    record = {"pid": pid, "pid_start": _start_time(pid), "passages": passages, "started": time.time(), "finish": finish}
    if batch_size is not None:
        record["batch_size"] = batch_size
    write_atomic(path / RUN, json.dumps(record).encode())
    _RUNNING_HERE.add(path.resolve())
    done = False
    refused: dict[str, str] = {}

    def finished() -> None:
        nonlocal done
        (path / RUN).unlink(missing_ok=True)
        fsync_dir(path)
        done = True

    try:
        yield finished
    except InputError as exc:
        refused["refused"] = str(exc)
        raise
    finally:
        _RUNNING_HERE.discard(path.resolve())
        if not done:
            try:
                write_atomic(path / RUN, json.dumps({**record, "pid": 0, "pid_start": None, **refused}).encode())
            except OSError:  # a full disk, say: the marker keeps this pid, read as stopped once it exits
                pass


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22), or
    None where there is no ``/proc``: with its pid it names one process, where a pid alone may
    name a later process that reused it (or pid 1 of another container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # fields 3.. follow the command's ")"
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: object = None) -> bool:
    """Whether process ``pid`` runs, and, when its ``start`` time was recorded and can be read
    here, is the process that recorded it."""
    if process_gone(pid):
        return False
    if isinstance(start, int):
        now = _start_time(pid)
        return now is None or now == start
    return True


def _run_record(path: Path) -> dict[str, Any] | None:
    """The ``RUN`` marker at ``path``; None where there is none, ``{}`` where it cannot be read or
    is not a JSON object (a damaged marker still marks a run)."""
    try:
        record = loads_json((path / RUN).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _still_running(path: Path, record: dict[str, Any]) -> bool:
    """Whether the run whose ``RUN`` marker at ``path`` reads ``record`` is still going (as
    :func:`unfinished_run` says); in this process, while its :func:`indexing_run` is open. One
    reading of the marker serves both of its readers."""
    pid = record.get("pid")
    start = record.get("pid_start")
    if not (isinstance(pid, int) and pid > 0):
        return False
    here = pid == os.getpid() and (not isinstance(start, int) or start == _start_time(pid))
    return path.resolve() in _RUNNING_HERE if here else _alive(pid, start)


def stopped_run_batch_size(path: Path) -> int | None:
    """The batch size of the indexing run that stopped at ``path`` (:func:`unfinished_run`), as
    its marker records it; None when no run stopped there or its marker records none (written
    before markers did, or damaged): unknown, so a resume may use any."""
    record = _run_record(path)  # read once: the marker may change between two reads
    if record is None or _still_running(path, record):
        return None
    size = record.get("batch_size")
    return size if type(size) is int and size >= 1 else None


def unfinished_run(path: Path) -> str | None:
    """What an indexing run that stopped before its end left at ``path`` (killed, or failed), and
    how to finish it; or None: no run, or one still going (its passages committed so far are
    readable, as always). A run is going while its process is: the marker's pid, the same process
    where its start time was recorded (a pid reused since, pid 1 of another container, is not)."""
    record = _run_record(path)
    if record is None or _still_running(path, record):
        return None
    started = record.get("started")
    when = time.strftime(" on %Y-%m-%d at %H:%M", time.localtime(started)) if isinstance(started, float) else ""
    size = record.get("passages")
    of = f" of an input of {size} passages" if isinstance(size, int) else ""
    finish = record.get("finish")
    finish = finish if isinstance(finish, str) and finish else finish_index()  # markers written before `finish`
    refused = record.get("refused")
    stopped = f"the indexing run started{when} stopped before its end: the store holds only part{of}"
    if isinstance(refused, str) and refused:  # re-running as it was stops there again: `finish` would not finish it
        return (
            f"{stopped}. It refused {refused}; the same input and settings stop there again: make that change, "
            "then index into this store again"
        )
    return f"{stopped}; to finish it, {finish}"


def compact_copy(path: Path) -> Path:
    """Where ``compact`` builds the new store of the store at ``path`` (beside it, hidden)."""
    return path.with_name(f".{path.name}.compact")


def _remove_compact_copy(path: Path) -> bool:
    """Delete the copy a killed ``compact`` left beside the store at ``path``, when this process
    can take the store's writer lock: a running compaction holds it throughout, so its copy is
    never deleted under it. Whether the copy was removed."""
    from ragcompress.store.writer import StoreLock

    copy = compact_copy(path)
    if not (copy.exists() or copy.is_symlink()) or not (path / MANIFEST).is_file():
        return False
    try:
        lock = StoreLock(path)
    except (StoreError, OSError):  # being written (a compaction, perhaps), or not writable here
        return False
    try:
        remove_tree(copy)
    finally:
        lock.release()
    return True


def remove_litter(path: Path) -> list[str]:
    """Delete what killed runs left beside the store at ``path``: the half-built copies of
    ``--overwrite`` (``.NAME.overwrite-PID``) and of store creation (``.NAME.init-PID-*``) whose
    process is gone (a live one's are its work in progress), and a killed ``compact``'s
    ``.NAME.compact`` (as large as the store's live shards) when no writer holds the store's lock.
    Returns the names removed. A store reached through a symbolic link is built beside the folder
    it points at, so that is where they are looked for."""
    path = path.resolve()
    # ".NAME.overwrite-PID", ".NAME.init-PID-*", and "..NAME.overwrite-PID.init-*" (the copy's creation)
    litter = re.compile(rf"\.\.?{re.escape(path.name)}\.(?:overwrite|init)-(\d+)\b.*", re.DOTALL)
    removed = remove_dead_temps(path.parent, litter)
    if _remove_compact_copy(path):
        removed.append(compact_copy(path).name)
    return removed


def overwrite_refusal(path: Path) -> str | None:
    """Why ``--overwrite`` must not delete the non-empty ``path``, or None when it is a store (the
    manifest may be lost or damaged: that is what a rebuild repairs). A folder holding anything a
    store does not, or too little of one (a store is created whole: manifest, prefix and
    catalogue together), is refused, so no file of the user's is ever deleted with it."""
    if not path.is_dir():
        return "is not a folder"
    names = {entry.name for entry in path.iterdir()}
    foreign = sorted(n for n in names - STORE_ENTRIES if not (n.startswith(".") and n.endswith(".tmp")))
    if foreign:
        return f"is not a ragcompress store, or holds files that are not the store's ({_first_few(foreign)})"
    if len(names & {MANIFEST, PREFIX, CATALOGUE, SHARD_DIR}) < 2:
        return "is not a ragcompress store"
    shards = path / SHARD_DIR
    if shards.exists():  # the shards folder holds shard files only: anything else there is the user's
        if not shards.is_dir():
            return f"holds a {SHARD_DIR} that is not the store's folder of shards"
        foreign = sorted(e.name for e in shards.iterdir() if not (e.is_file() and is_shard_name(e.name)))
        if foreign:
            return f"holds files in {SHARD_DIR}/ that are not the store's shards ({_first_few(foreign)})"
    return None


def _first_few(names: list[str]) -> str:
    """Up to five of ``names`` for a message, and how many more there are."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_creatable(path: Path) -> None:
    """Raise unless a store can be created at ``path``: its nearest existing ancestor is a folder
    this process may write in. Checked before a model loads, so a mistyped ``--store`` under a
    file or in a read-only place is one error at once, not after the load (the creation's own
    ``OSError`` remains the last word: a filesystem may refuse what the permission bits allow)."""
    ancestor = next(folder for folder in (path, *path.parents) if folder.exists())
    if ancestor != path and not ancestor.is_dir():
        raise StoreError(f"cannot create store {path}: {ancestor} is a file; choose a --store path under a folder")
    if not os.access(ancestor if ancestor.is_dir() else ancestor.parent, os.W_OK | os.X_OK):
        raise StoreError(
            f"cannot create store {path}: {ancestor} is not writable by this user; choose a writable --store"
        )


def refuse_existing(path: Path) -> None:
    """Raise unless ``path`` is absent or an empty directory. A store is created by one rename, so
    a manifest at ``path`` means another process created a complete store there since the caller
    looked: a retry opens it (and checks the input against it), one writer at a time."""
    if (path / MANIFEST).is_file():
        raise StoreError(
            f"store {path} was created by another process meanwhile; retry, and the run opens that store "
            "(one writer at a time)"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(
            f"{path} exists and is not an empty directory or a ragcompress store; choose an empty or new --store"
            + (
                ""
                if overwrite_refusal(path)
                else f" (a store that lost its manifest: rebuild it with --overwrite and {SETTINGS})"
            )
        )


def create_store(path: Path, manifest: Manifest, prefix_kv: PassageKV, basis: bytes | None = None) -> None:
    """Initialise an empty store at ``path`` atomically (built in a temp dir, then renamed).

    ``basis``: a low-rank store's basis file (``store/basis.py``), whose sha256 the manifest names.

    ``path`` must not exist or be an empty directory: ragcompress never writes into a folder it
    did not create. The rename decides a race between two processes creating the same store: the
    loser's error says so (:func:`refuse_existing`). Folders created above ``path`` are fsynced
    into their parents, as the store's own entry is, before anything can be committed in it. A
    symbolic link to an empty folder is followed: the store is created in that folder, the link
    kept (the rename would otherwise replace the link itself).
    """
    path = path.resolve()
    refuse_existing(path)
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in created:
        fsync_dir(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.init-{os.getpid()}-", dir=path.parent))
    try:
        blob = codec.encode(prefix_kv, QuantConfig("none"))
        write_atomic(tmp / PREFIX, blob)
        if basis is not None:
            write_atomic(tmp / BASIS, basis)
        Catalogue(tmp, readonly=False).close()
        dataclasses.replace(manifest, prefix_sha256=hashlib.sha256(blob).hexdigest()).sealed().write(tmp)
        follow_umask(tmp)  # mkdtemp made it 0700: readable by no other user the umask shares with
        try:
            os.replace(tmp, path)  # replaces an empty directory too; fails on anything else
        except OSError as exc:
            refuse_existing(path)
            raise StoreError(f"cannot create store {path}: {exc.strerror or exc}") from None
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_unfinished(path: Path) -> None:
    """A store whose last indexing run stopped before its end (killed, or failed) is intact but
    holds only part of its input: answering or retrieving from it would silently miss passages."""
    unfinished = unfinished_run(path)
    if unfinished is not None:
        raise StoreError(f"store {path}: {unfinished}, then use it")
