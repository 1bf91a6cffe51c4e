"""Reading passages to index: a JSONL file of ``{"id", "text", ...}`` or a folder of documents.

Input is streamed (never read whole) and validated before a store is touched: a malformed line,
an empty text or a duplicate id fails the run with the line and the id named, and an existing
store stays as it was.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ragcompress.errors import InputError

DOCUMENT_SUFFIXES = (".txt", ".md")
MAX_ID_CHARS = 512


@dataclass(frozen=True)
class PassageInput:
    id: str
    text: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text_sha(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _check_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: \"id\" must be a non-empty string")
    if len(value) > MAX_ID_CHARS or any(ord(c) < 32 for c in value):
        raise InputError(f"{where}: \"id\" must be at most {MAX_ID_CHARS} printable characters")
    return value


def iter_jsonl(path: Path) -> Iterator[PassageInput]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{where}: malformed JSON ({exc})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object with \"id\" and \"text\"")
            passage_id = _check_id(record.get("id"), where)
            text = record.get("text")
            if not isinstance(text, str):
                raise InputError(f"{where}: passage {passage_id!r} has no \"text\" string")
            if not text.strip():
                raise InputError(f"{where}: passage {passage_id!r} has empty text")
            title = record.get("title") if isinstance(record.get("title"), str) else ""
            meta = {k: v for k, v in record.items() if k not in ("id", "text", "title")}
            yield PassageInput(passage_id, text, title, meta)


def chunk_text(text: str, max_words: int) -> list[str]:
    """Split on blank lines, then pack paragraphs into chunks of at most ``max_words`` words.

    A paragraph longer than ``max_words`` is cut at word boundaries.
    """
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


def iter_folder(path: Path, max_words: int = 150) -> Iterator[PassageInput]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DOCUMENT_SUFFIXES)
    for file in files:
        relative = file.relative_to(path).as_posix()
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{file}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        for number, chunk in enumerate(chunk_text(text, max_words)):
            yield PassageInput(f"{relative}#{number}", chunk, file.stem, {"source": relative})


def iter_passages(path: str | Path) -> Iterator[PassageInput]:
    """Passages of a JSONL file or a folder, in order; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_dir():
        yield from iter_folder(path)
    else:
        yield from iter_jsonl(path)


def validate(path: str | Path) -> int:
    """One streaming pass: every record well-formed, ids unique. Returns the passage count."""
    seen: set[str] = set()
    for passage in iter_passages(path):
        if passage.id in seen:
            raise InputError(f"{path}: duplicate passage id {passage.id!r}")
        seen.add(passage.id)
    if not seen:
        kind = "folder has no .txt or .md documents" if Path(path).is_dir() else "file holds no passages"
        raise InputError(f"input {path}: {kind}")
    return len(seen)
