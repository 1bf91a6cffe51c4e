"""Reading passages to index: a JSONL file of ``{"id", "text", ...}``, a folder of documents, or
one ``.txt``/``.md`` document (chunked into passages like a folder's).

JSONL input is streamed a line at a time (never read whole), a folder's documents one at a time
(each read whole to be chunked), and validated before a store is touched: a malformed line,
an empty text, invalid Unicode or a duplicate id fails the run with the line and the id named, and
an existing store stays as it was. Validation keeps memory bounded on any input size: seen ids go
to a temporary SQLite table (on disk, beyond a small page cache), not a Python set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from ragcompress.errors import InputError

DOCUMENT_SUFFIXES = (".txt", ".md")
MAX_ID_CHARS = 512
MAX_LINE_BYTES = 64 << 20
_VALIDATE_BATCH = 512
CHUNK_WORDS = 150  # the words of a document's chunk (:func:`chunk_text`); fixed, no option changes it


@dataclass(frozen=True)
class PassageInput:
    id: str
    text: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text_sha(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def article(self) -> str:
        """The document the passage comes from: its title, else its id's part before ``#``
        (``index`` names a document's chunks ``<document>#<n>``). Training splits by it."""
        return self.title or self.id.split("#")[0]


def check_id(value: Any, where: str) -> str:
    """``value`` as a passage id, refused (``where`` names the record) unless it is a printable,
    non-blank string of at most ``MAX_ID_CHARS``: ids are named in messages and listings, and
    given back to ``remove``; every way into a store (JSONL input, a document's ids made from its
    path, the LlamaIndex transform) applies this one rule."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f'{where}: "id" must be a non-empty string')
    if len(value) > MAX_ID_CHARS or not all(_printable(c) for c in value):
        raise InputError(f'{where}: "id" must be at most {MAX_ID_CHARS} printable characters')
    return value


def _printable(char: str) -> bool:
    """Printable (``str.isprintable``: no control, line or paragraph separator, format character
    or unassigned code point; C1 controls and U+2028 break a listing's lines too), spaces of any
    width (category Zs: a no-break or ideographic space in a title-like id) included."""
    return char.isprintable() or unicodedata.category(char) == "Zs"


def _check_unicode(record: dict[str, Any], where: str) -> None:
    """JSON may escape unpaired surrogates (``"\\ud800"``), which no UTF-8 store can hold."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise InputError(f"{where}: JSON is nested too deeply") from None
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{where}: holds an unpaired UTF-16 surrogate ({exc.object[exc.start : exc.end]!a}); "
            "fix the encoding of this record"
        ) from None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)``; a line longer than ``MAX_LINE_BYTES`` is refused unread."""
    with open(path, "rb") as handle:
        number = 0
        while raw := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{path}:{number}: line is longer than {MAX_LINE_BYTES >> 20} MiB; split the passage")
            yield number, raw


def _numbered_jsonl(path: Path, why: str = "") -> Iterator[tuple[int, PassageInput]]:
    """``(line number, passage)`` of a JSONL file; ``why`` it is read as JSONL, said when a line
    is not JSON."""
    for number, raw in _lines(path):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            read_as = f"; read as JSONL as {why}" if why else ""
            hint = (
                " (name a plain-text document .txt or .md to read it as one)"
                if number == 1 and path.suffix.lower() not in DOCUMENT_SUFFIXES  # else: line 1 was a JSON object
                else ""
            )
            raise InputError(f"{where}: malformed JSON ({exc}){read_as}{hint}") from None
        if not isinstance(record, dict):
            raise InputError(f'{where}: expected a JSON object with "id" and "text"')
        _check_unicode(record, where)
        passage_id = check_id(record.get("id"), where)
        text = record.get("text")
        if not isinstance(text, str):
            raise InputError(f'{where}: passage {passage_id!r} has no "text" string')
        if not text.strip():
            raise InputError(f"{where}: passage {passage_id!r} has empty text")
        title = record.get("title")
        if title is None:
            title = ""
        elif not isinstance(title, str):  # silently dropping it would lose what the user gave
            raise InputError(f'{where}: passage {passage_id!r} has a "title" that is not a string ({title!r})')
        meta = {k: v for k, v in record.items() if k not in ("id", "text", "title")}
        yield number, PassageInput(passage_id, text, title, meta)


def chunk_text(text: str, max_words: int) -> list[str]:
    """Split on blank lines into paragraphs (whitespace inside each normalised to single
    spaces), join them in order and cut the result into chunks of at most ``max_words`` words.

    Chunks are cut at the word count, not at paragraph boundaries: a paragraph may start in one
    chunk and end in the next. A word is what ``str.split`` separates, so text without spaces
    (Chinese, Japanese) is one word and never cut; such documents belong in JSONL passages.
    Changing this changes the chunks (and ids' texts) of every store built from a folder.
    """
    if max_words < 1:  # no chunk could hold a word: the loop below would never end
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    chunks: list[str] = []
    current: list[str] = []
    count = 0
    for paragraph in (p.strip() for p in text.split("\n\n")):
        words = paragraph.split()
        while words:
            room = max_words - count
            if room <= 0:
                chunks.append("\n\n".join(current))
                current, count = [], 0
                continue
            piece, words = words[:room], words[room:]
            current.append(" ".join(piece))
            count += len(piece)
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _is_document(relative: Path) -> bool:
    """A ``.txt``/``.md`` file (any case) outside hidden files and folders: editors and notebooks
    keep copies there (``.ipynb_checkpoints/x-checkpoint.md``) that would index twice."""
    return relative.suffix.lower() in DOCUMENT_SUFFIXES and not any(part.startswith(".") for part in relative.parts)


def iter_document(file: Path, relative: str, max_words: int = CHUNK_WORDS) -> Iterator[PassageInput]:
    """One ``.txt``/``.md`` document as passages ``<relative>#<n>`` of at most ``max_words`` words."""
    try:  # a name in another encoding (Latin-1 ``caf\xe9.txt``) reaches Python as lone surrogates
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{os.fsencode(file)!r}: the file name is not valid UTF-8, and passage ids are made from it; "
            "give it a UTF-8 name, or move it out of the input"
        ) from None
    try:
        text = file.read_text(encoding="utf-8-sig")  # a byte order mark is not text
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    for number, chunk in enumerate(chunk_text(text, max_words)):
        passage_id = f"{relative}#{number}"
        try:  # the one rule for ids (check_id): a name holding a newline, a path too deep
            check_id(passage_id, str(file))
        except InputError:
            shown = repr(passage_id if len(passage_id) <= 80 else passage_id[:60] + "...")
            raise InputError(
                f"{str(file)!r}: the passage id made from its path in the input ({shown}) must be "
                f"at most {MAX_ID_CHARS} printable characters; rename the file or move it nearer the input's top"
            ) from None
        yield PassageInput(passage_id, chunk, file.stem, {"source": relative})


def _folder_documents(path: Path) -> list[Path]:
    """The documents of the folder ``path``, in the order their passages are read."""
    return sorted(p for p in path.rglob("*") if p.is_file() and _is_document(p.relative_to(path)))


def iter_folder(path: Path, max_words: int = CHUNK_WORDS) -> Iterator[PassageInput]:
    for file in _folder_documents(path):
        yield from iter_document(file, file.relative_to(path).as_posix(), max_words)


def document_chunks(path: Path) -> dict[str, int] | None:
    """``{document: 0}`` for each document of an input read as documents (a folder's, blank ones
    included, or one ``.txt``/``.md`` document), for :func:`count_chunks` to fill from the
    passages a run reads anyway (their ids are ``<document>#<n>``, n below that count; listing a
    folder reads no document). None for JSONL, whose ids are the user's."""
    if path.is_dir():
        return {file.relative_to(path).as_posix(): 0 for file in _folder_documents(path)}
    if path.suffix.lower() in DOCUMENT_SUFFIXES and not _opens_with_a_json_object(path):
        return {path.name: 0}
    return None


def count_chunks(counts: dict[str, int] | None, passages: list[PassageInput]) -> None:
    """Add ``passages`` (of the input ``counts`` came from, :func:`document_chunks`) to their
    documents' chunk counts; nothing for JSONL (``counts`` None)."""
    if counts is not None:
        for passage in passages:
            counts[passage.meta["source"]] += 1


def iter_passages(path: str | Path) -> Iterator[PassageInput]:
    """Passages of a JSONL file, a folder of documents or one ``.txt``/``.md`` document, in order;
    errors name the file and line."""
    return (passage for _, passage in _numbered_passages(Path(path)))


def _numbered_passages(path: Path) -> Iterator[tuple[int, PassageInput]]:
    """:func:`iter_passages` with each passage's JSONL line number (0 for a document's chunks):
    a duplicate id is named with both its lines."""
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_dir():
        yield from ((0, passage) for passage in iter_folder(path))
    elif path.suffix.lower() not in DOCUMENT_SUFFIXES:
        yield from _numbered_jsonl(path, "its name does not end in .txt or .md")
    elif _opens_with_a_json_object(path):
        yield from _numbered_jsonl(path, "its first line is a JSON object")
    else:
        yield from ((0, passage) for passage in iter_document(path, path.name))


def _opens_with_a_json_object(path: Path) -> bool:
    """Whether the file's first non-blank line is a JSON object: a JSONL file named ``.txt`` (read
    as JSONL before one document was accepted as input) stays JSONL, while a page opening with
    ``{`` that is not JSON (a Hugo shortcode, a Jinja tag: ``{{< figure >}}``) is a document."""
    for number, raw in _lines(path):
        line = raw.removeprefix(b"\xef\xbb\xbf") if number == 1 else raw  # a byte order mark
        if not line.strip():
            continue
        try:
            return isinstance(json.loads(line.decode("utf-8")), dict)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return False
    return False


class _SeenIds:
    """A set of ids in a private temporary SQLite database (spills to disk, bounded memory)."""

    def __init__(self) -> None:
        self.db = sqlite3.connect("")  # "" = temporary on-disk database, deleted on close
        self.db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID")

    def first_duplicate(self, ids: list[str], lines: list[int]) -> tuple[str, int, int] | None:
        """Add ``ids`` (found on ``lines``); return the first one seen before (in this batch or
        earlier), if any, as ``(id, line seen first, line seen again)``."""
        batch: dict[str, int] = {}
        for passage_id, line in zip(ids, lines, strict=True):
            if passage_id in batch:
                return passage_id, batch[passage_id], line
            batch[passage_id] = line
        marks = ",".join("?" * len(ids))
        earlier = dict(self.db.execute(f"SELECT id, line FROM ids WHERE id IN ({marks})", ids).fetchall())
        if earlier:
            return next((i, earlier[i], batch[i]) for i in ids if i in earlier)
        self.db.executemany("INSERT INTO ids VALUES (?, ?)", batch.items())
        return None

    def close(self) -> None:
        self.db.close()


def validate(
    path: str | Path, stored: Callable[[list[str]], dict[str, str]] | None = None, store_name: str = "the store"
) -> int:
    """One streaming pass: every record well-formed, ids unique. Returns the passage count.

    ``stored`` (ids -> ``{id: text_sha}`` of those already in a store) makes the same pass refuse
    an id that is stored with another text. Memory stays bounded whatever the input's size.
    """
    count = 0
    seen = _SeenIds()
    try:
        numbered = _numbered_passages(Path(path))
        while located := list(islice(numbered, _VALIDATE_BATCH)):
            batch = [p for _, p in located]
            ids = [p.id for p in batch]
            duplicate = seen.first_duplicate(ids, [line for line, _ in located])
            if duplicate is not None:
                passage_id, first, again = duplicate
                lines = f" (lines {first} and {again})" if first and again else ""
                raise InputError(f"{path}: duplicate passage id {passage_id!r}{lines}; give each passage its own id")
            known = stored(ids) if stored is not None else {}
            for passage in batch:
                sha = known.get(passage.id)
                if sha is not None and sha != passage.text_sha:
                    raise InputError(
                        f"passage {passage.id!r} is already in {store_name} with different text; "
                        "index with --replace to re-encode it in place, give it a new id, or rebuild with --overwrite"
                    )
            count += len(batch)
    finally:
        seen.close()
    if not count:
        if not Path(path).is_dir():
            kind = "file holds no passages"
        elif any(_folder_documents(Path(path))):
            kind = "folder's .txt and .md documents are all empty or blank"
        else:
            kind = "folder has no .txt or .md documents"
        raise InputError(f"input {path}: {kind}")
    return count
