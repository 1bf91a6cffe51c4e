"""Property-based fuzzing of indexing input: every JSONL file and every passage text is either
indexed correctly or rejected with a clear :class:`InputError`; nothing else escapes, and a
rejected input never damages an existing store (docs/guarantees.md)."""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ragcompress.errors import InputError
from ragcompress.indexing import IndexConfig, index, inputs
from ragcompress.indexing.inputs import iter_passages, validate
from ragcompress.store import KVStore
from ragcompress.store.files import unfinished_run
from ragcompress.store.verify import verify_store

sys.path.insert(0, str(Path(__file__).parent))
import store_worker  # noqa: E402

FUZZ = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_INDEX = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
LONE_SURROGATE = "\\ud800"  # what a JSON writer emits for half of a UTF-16 pair


def _consume(path: Path) -> list:
    """Read and validate ``path`` the way ``index`` does; only InputError may escape."""
    try:
        count = validate(path)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        return []
    passages = list(iter_passages(path))
    assert count == len(passages) == len({p.id for p in passages})
    for passage in passages:  # everything that passed can be stored as UTF-8
        assert len(passage.text_sha) == 64
        passage.id.encode("utf-8")
        json.dumps(passage.meta, ensure_ascii=False).encode("utf-8")
        assert passage.text.strip()
    return passages


@FUZZ
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_arbitrary_bytes_never_escape_as_other_errors(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    _consume(path)


@FUZZ
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["id", "text", "title", "meta", "x"]), json_values, max_size=5) | json_values,
        max_size=6,
    )
)
def test_arbitrary_json_records(tmp_path, records):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    _consume(path)


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=40), st.booleans()), min_size=1, max_size=6))
def test_wellformed_records_round_trip_or_are_refused_by_rule(tmp_path, rows):
    """Valid records come back exactly; a refusal is always one of the documented rules."""
    records = [{"id": pid, "text": text + (LONE_SURROGATE if broken else "")} for pid, text, broken in rows]
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(json.dumps(r).replace("\\\\ud800", "\\ud800") for r in records))
    ids = [r["id"] for r in records]
    expect_error = (
        any(broken for _, _, broken in rows)
        or len(set(ids)) != len(ids)
        or any(
            not pid.strip() or not all(c.isprintable() or unicodedata.category(c) == "Zs" for c in pid) for pid in ids
        )
        or any(not text.strip() for _, text, _ in rows)
    )
    if expect_error:
        with pytest.raises(InputError):
            validate(path)
    else:
        passages = _consume(path)
        assert [(p.id, p.text) for p in passages] == [(pid, text) for pid, text, _ in rows]


@pytest.mark.parametrize(
    "content, refusal",
    [
        pytest.param(
            b'{"id": "a", "text": "x y", "title": null}\n{"id": "b", "text": "x y", "title": 5}\n',
            r":2: passage 'b' has a \"title\" that is not a string \(5\)",
            id="title-not-a-string-refused-not-dropped",
        ),
        pytest.param(
            b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "half \\ud83d pair"}\n',
            r":2: holds an unpaired UTF-16 surrogate",
            id="lone-surrogate",
        ),
        pytest.param(
            b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', r":2: not valid UTF-8", id="not-utf8"
        ),
        pytest.param(b"[" * 100_000 + b"]" * 100_000 + b"\n", r":1", id="deeply-nested-json"),
    ],
)
def test_a_bad_line_is_an_input_error_naming_the_file_and_line(tmp_path, content, refusal):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"bad\.jsonl" + refusal):
        validate(path)


def test_ids_are_printable_spaces_included(tmp_path):
    """C1 controls (U+0085 ends a line in some viewers) and the line separator U+2028 passed the
    id rule, whose message says "printable"; spaces of any width stay ids' own."""
    from ragcompress.indexing.inputs import check_id

    for bad in ["a\x85b", "a\u2028b", "a\x9bb", "a\tb", "a\u200bb"]:
        with pytest.raises(InputError, match="printable characters"):
            check_id(bad, "x")
    for good in ["a b", "a\u00a0b", "\u6771\u4eac\u3000\u99c5", "caf\u00e9 \U0001f980"]:
        assert check_id(good, "x") == good


def test_a_duplicate_id_is_named_with_both_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(InputError, match=r"d.jsonl: duplicate passage id 'a' \(lines 1 and 4\)"):
        validate(path)
    # across validation batches: the first line comes from the table of ids seen
    path.write_text("".join(json.dumps({"id": f"p{i % 600}", "text": "x"}) + "\n" for i in range(601)))
    with pytest.raises(InputError, match=r"duplicate passage id 'p0' \(lines 1 and 601\)"):
        validate(path)


def test_a_folder_of_blank_documents_is_named_as_such(tmp_path):
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(InputError, match="folder has no .txt or .md documents"):
        validate(tmp_path / "none")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.md").write_text("\n  \n")
    with pytest.raises(InputError, match="documents are all empty or blank"):
        validate(tmp_path / "blank")


def test_chunking_and_embedder_settings_no_loop_or_later_failure_can_use_are_refused():
    """``chunk_text(text, 0)`` looped forever appending empty chunks; ``IndexConfig(embedder="  ")``
    was accepted and failed only when the embedder loaded."""
    from ragcompress.indexing import IndexConfig
    from ragcompress.indexing.inputs import chunk_text

    assert chunk_text("one two three\n\nfour", 2) == ["one two", "three\n\nfour"]
    for words in (0, -1):
        with pytest.raises(ValueError, match="max_words must be at least 1"):
            chunk_text("one two", words)
    with pytest.raises(ValueError, match="embedder must name a sentence-transformers model"):
        IndexConfig(embedder="  ")


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "with a BOM"}\n')
    assert [p.id for p in iter_passages(path)] == ["a"]


def test_byte_order_mark_of_a_folder_document_is_not_its_text(tmp_path):
    """A document saved with a UTF-8 BOM (Windows editors) reads as the same document without
    one: the mark is not the first character of its first passage, as it is not for JSONL."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bom.txt").write_bytes(b"\xef\xbb\xbfFirst paragraph.\r\n\r\nSecond.\r\n")
    (tmp_path / "docs" / "plain.txt").write_bytes(b"First paragraph.\n\nSecond.\n")
    texts = {p.id: p.text for p in iter_passages(tmp_path / "docs")}
    assert texts == {"bom.txt#0": "First paragraph.\n\nSecond.", "plain.txt#0": "First paragraph.\n\nSecond."}


def test_a_folder_reads_documents_of_any_case_and_skips_hidden_copies(tmp_path):
    """``NOTES.TXT`` is a document; a notebook's ``.ipynb_checkpoints`` copy or an editor's hidden
    file would index a second copy of a document."""
    docs = tmp_path / "docs"
    (docs / ".ipynb_checkpoints").mkdir(parents=True)
    (docs / "a.md").write_text("Alpha.\n")
    (docs / ".ipynb_checkpoints" / "a-checkpoint.md").write_text("Alpha.\n")
    (docs / ".a.md.swp.txt").write_text("Alpha.\n")
    (docs / "NOTES.TXT").write_text("Notes.\n")
    assert [p.id for p in iter_passages(docs)] == ["NOTES.TXT#0", "a.md#0"]


def test_a_file_name_that_is_not_utf8_is_refused_by_name(tmp_path, monkeypatch, capsys):
    """A Latin-1 ``caf\xe9.txt`` reaches Python as a lone surrogate, which no id in a UTF-8 store
    can hold: it was a UnicodeEncodeError traceback from SQLite."""
    from ragcompress.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    try:
        with open(os.fsencode(docs) + b"/caf\xe9.txt", "wb") as handle:
            handle.write(b"Some text.\n")
    except OSError:  # a file system that stores names as Unicode
        pytest.skip("this file system refuses names that are not UTF-8")
    with pytest.raises(InputError, match=r"caf\\xe9.txt'?: the file name is not valid UTF-8"):
        validate(docs)
    monkeypatch.setattr(sys, "argv", ["ragcompress", "index", "--input", str(docs), "--store", str(tmp_path / "s")])
    with pytest.raises(SystemExit):
        main()
    assert "file name is not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_ids_made_from_file_names_follow_the_id_rule(tmp_path):
    """A document's ids (``<path>#<n>``) pass check_id like JSONL ids: a name holding a newline
    or a path longer than MAX_ID_CHARS was accepted into listings and ``remove``."""
    (tmp_path / "ctl").mkdir()
    (tmp_path / "ctl" / "line\nbreak.txt").write_text("Some text.\n")
    with pytest.raises(InputError, match=r"'line\\nbreak.txt#0'\) must be at most 512 printable characters"):
        validate(tmp_path / "ctl")
    deep = tmp_path / "deep" / Path(*["x" * 100] * 6)
    deep.mkdir(parents=True)
    (deep / "doc.txt").write_text("Some text.\n")
    with pytest.raises(InputError, match=r"doc.txt': the passage id made from its path .*rename the file"):
        validate(tmp_path / "deep")


def test_one_document_reads_as_the_same_passages_as_in_a_folder(tmp_path):
    """``--input notes.md`` indexes one document without a folder around it: the chunks of the
    folder's copy, named by the file's name."""
    text = "First paragraph.\n\n" + " ".join(["word"] * 200) + "\n"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "Notes.MD").write_text(text)
    alone = list(iter_passages(tmp_path / "docs" / "Notes.MD"))
    in_folder = list(iter_passages(tmp_path / "docs"))
    assert len(alone) == 2
    assert alone == in_folder
    assert [p.id for p in alone] == ["Notes.MD#0", "Notes.MD#1"]


def test_a_jsonl_file_named_txt_stays_jsonl(tmp_path):
    """Before one document was accepted as input, ``--input passages.txt`` was read as JSONL: a
    ``.txt``/``.md`` file whose first non-blank line is a JSON object still is."""
    path = tmp_path / "passages.txt"
    path.write_bytes(b"\xef\xbb\xbf\n  " + json.dumps({"id": "a", "text": "Alpha."}).encode() + b"\n")
    assert [(p.id, p.text) for p in iter_passages(path)] == [("a", "Alpha.")]
    path.write_text(json.dumps({"id": "a", "text": "Alpha."}) + "\n{not JSON, a broken line}\n")
    with pytest.raises(
        InputError, match=r"passages.txt:2: malformed JSON .*; read as JSONL as its first line is a JSON object$"
    ):
        validate(path)


def test_a_document_opening_with_a_brace_is_a_document(tmp_path):
    """A Hugo shortcode or a Jinja tag (``{{< figure >}}``) opening a page given alone was read as
    JSONL and refused as malformed JSON, though the same page in a folder is a document."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text('{{< figure src="a.png" >}}\n\nThe page explains the figure above.\n')
    (tmp_path / "prose.txt").write_text("{not JSON, prose in braces}\n")
    assert list(iter_passages(page)) == list(iter_passages(tmp_path / "docs"))
    assert [p.text for p in iter_passages(tmp_path / "prose.txt")] == ["{not JSON, prose in braces}"]


def test_a_text_file_with_another_name_is_read_as_jsonl_and_the_error_says_so(tmp_path):
    path = tmp_path / "notes.text"
    path.write_text("Just prose.\n")
    with pytest.raises(
        InputError, match=r"notes.text:1: malformed JSON .*read as JSONL as its name does not end in .txt or .md"
    ):
        validate(path)
    with pytest.raises(InputError, match=r"empty.txt: file holds no passages"):
        (tmp_path / "empty.txt").write_text("\n\n  \n")
        validate(tmp_path / "empty.txt")


def test_overlong_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text('{"id": "a", "text": "short"}\n' + json.dumps({"id": "b", "text": "x" * 5000}) + "\n")
    with pytest.raises(InputError, match=r"long.jsonl:2: line is longer than"):
        validate(path)


# --- passage texts through the whole indexing path ---------------------------------------------

SPECIAL_TEXTS = [
    "",
    " ",
    "\t\n  \r\n",
    "\u200b",
    "\x00",
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "\x7f\x08\x0c",
    "مرحبا بالعالم، هذا نص عربي",
    "שלום עולם זה טקסט בעברית",
    "abc \u202e\u2066 reversed \u2069",
    "e\u0301\u0301\u0301",
    "🦀🚀👩‍👩‍👧‍👦",
    "{text} {question}",
    "\ufeffbom inside",
    "tab\tand\nnewline",
]
texts = (
    st.sampled_from(SPECIAL_TEXTS)
    | st.text(min_size=1, max_size=200)
    | st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Mn", "Lo"]), min_size=1, max_size=60)
)


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("fuzz-store")
    seed = root / "seed.jsonl"
    seed.write_text(json.dumps({"id": "seed", "text": "a passage that must survive every fuzzed run"}) + "\n")
    store = root / "store"
    _index(tiny_lm, seed, store)
    return store


def _index(lm, path: Path, store: Path, batch_size: int = 4):
    return index(
        path,
        store,
        lm=lm,
        embedder=store_worker.HashEmbedder(),
        config=IndexConfig(quant="int4", embedder=store_worker.HashEmbedder.name),
        batch_size=batch_size,
    )


def _snapshot(store: Path) -> list[tuple]:
    with KVStore.open(store) as kv:
        return [(e.id, e.text, e.checksum) for e in kv.catalogue.entries()]


@FUZZ_INDEX
@given(text=texts, raw_suffix=st.sampled_from([None, None, None, b"\xff", b"\xc3", LONE_SURROGATE.encode()]))
def test_fuzzed_passage_text_is_indexed_exactly_or_rejected(fuzz_store, tiny_lm, tmp_path_factory, text, raw_suffix):
    number = len(_snapshot(fuzz_store))
    pid = f"fuzz-{number}"
    line = json.dumps({"id": pid, "text": text}).encode()
    if raw_suffix is not None:  # splice raw bytes (or an escaped lone surrogate) into the string
        line = line[:-2] + raw_suffix + line[-2:]
    path = tmp_path_factory.mktemp("fuzz-input") / "in.jsonl"
    path.write_bytes(line + b"\n")
    before = _snapshot(fuzz_store)
    try:
        _index(tiny_lm, path, fuzz_store)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert raw_suffix is not None or not text.strip()
        assert _snapshot(fuzz_store) == before  # a refused input changes nothing
        event("rejected")
        return
    assert raw_suffix is None and text.strip()
    event("indexed")
    after = _snapshot(fuzz_store)
    assert after[:-1] == before and after[-1][:2] == (pid, text)  # stored exactly, nothing else touched
    with KVStore.open(fuzz_store) as kv:
        entry = kv.entry(pid)
        kv_cache = kv.load_kv(entry)
    from ragcompress.prompt import PromptTemplate, PromptTokens

    tokens = PromptTokens(PromptTemplate.from_tokenizer(tiny_lm.tokenizer), tiny_lm.tokenizer)
    assert kv_cache.num_tokens == entry.num_tokens == len(tokens.passage(text))


def test_too_long_passage_is_rejected_and_store_intact(fuzz_store, tiny_lm, tmp_path):
    """Refused before the run starts, even behind a passage that fits: the run once wrote the
    batches before it and stopped, leaving the store marked unfinished, which every reader
    refuses, until an input without it was indexed."""
    path = tmp_path / "long.jsonl"
    records = [{"id": "fits", "text": "a short passage"}, {"id": "very-long", "text": "word " * 6000}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = _snapshot(fuzz_store)
    with pytest.raises(
        InputError, match=r"'very-long' has \d+ tokens, more than .* can attend to.*nothing was written"
    ):
        _index(tiny_lm, path, fuzz_store, batch_size=1)
    assert _snapshot(fuzz_store) == before
    assert unfinished_run(fuzz_store) is None


def test_fuzzed_store_still_verifies(fuzz_store):
    """Runs after the fuzzing above (file order): nothing any fuzzed input did damaged the store."""
    report = verify_store(fuzz_store)
    assert report.ok, [str(p) for p in report.problems]
    with KVStore.open(fuzz_store) as kv:
        assert kv.entry("seed").text == "a passage that must survive every fuzzed run"
        for entry in kv.catalogue.entries():
            kv.load_kv(entry)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"id": "a", "text": "caf\xe9"}\n', "not valid UTF-8"),
        (b'{"id": "a", "text": "x \\udc00"}\n', "unpaired UTF-16 surrogate"),
        (b'{"id": "a", "text": "  "}\n', "empty text"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate passage id"),
        (b'{"id": "a\\u0000b", "text": "x"}\n', "printable characters"),
        (b"not json\n", "malformed JSON"),
    ],
)
def test_cli_rejects_bad_input_with_one_line_and_no_traceback(tmp_path, monkeypatch, capsys, content, message):
    from ragcompress.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    monkeypatch.setattr(sys, "argv", ["ragcompress", "index", "--input", str(path), "--store", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
