"""Model resolution, the evaluation model's assembly check, and refusal of unsupported models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ragcompress import models
from ragcompress.errors import ModelError

from conftest import as_another_uid


def test_unknown_model_names_the_embedded_ones(tmp_path):
    with pytest.raises(ModelError, match="smollm2-135m.*qwen2.5-coder-0.5b"):
        models.resolve_model_dir("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model_dir(str(tmp_path / "empty"))


@pytest.mark.parametrize("ref", ["/no/such/model", "./model", "~/models/absent", "a/b/c", "weights.gguf"])
def test_a_path_that_is_no_model_directory_is_called_so_not_sent_to_the_hub(tmp_path, monkeypatch, ref):
    """``--model /nonexistent`` was told to run ``hf download /nonexistent``: a path (or a file)
    is never a hub id, so the message says the folder is missing, or is a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.gguf").write_text("x")
    what = "is a file, not a model directory" if ref == "weights.gguf" else "does not exist"
    with pytest.raises(ModelError, match=f"model directory {re.escape(ref)} {what}") as caught:
        models.resolve_model_dir(ref)
    assert "hf download" not in str(caught.value)


def test_model_without_rope_family_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="model type 'gpt2' cannot be used with ragcompress: no decoder layers"):
        models.load_model(str(tmp_path))


def test_a_folder_without_weights_is_named(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=f"cannot load a causal LM from {tmp_path}"):
        models.load_model(str(tmp_path))


def test_fingerprint_changes_with_weights(tiny_model_dir):
    a = models.load_model(str(tiny_model_dir("llama")))
    b = models.load_model(str(tiny_model_dir("llama", seed=1)))
    again = models.load_model(str(tiny_model_dir("llama")))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == again.fingerprint
    assert a.tokenizer_hash == b.tokenizer_hash


def test_a_converted_model_fine_tuned_in_place_loses_its_sources_fingerprint(tiny_model_dir, tmp_path):
    """A folder converted from a GGUF is fingerprinted by the GGUF's sha256 (its
    ``ragcompress_source.json``); one whose weights were replaced in place (fine-tuned,
    ``save_pretrained`` into the copy) kept that fingerprint, so a store built with the original
    accepted it. The file now records the converted weights' digest, checked on every load."""
    import shutil

    folder = tmp_path / "converted"
    shutil.copytree(tiny_model_dir("llama"), folder)
    source = {"gguf": "model.gguf", "sha256": "a" * 64, "weights": models._weight_files_digest(folder)}
    (folder / "ragcompress_source.json").write_text(json.dumps(source))
    assert models.weights_hash(folder) == "a" * 64
    for name in ("model.safetensors",):
        shutil.copy(tiny_model_dir("llama", seed=1) / name, folder / name)  # "fine-tuned" in place
    assert models.weights_hash(folder) == models._weight_files_digest(folder) != "a" * 64
    del source["weights"]  # a conversion from before the digest was recorded: trusted as it was
    (folder / "ragcompress_source.json").write_text(json.dumps(source))
    assert models.weights_hash(folder) == "a" * 64


@pytest.mark.eval_model
def test_eval_model_hash_mismatch_is_an_error_and_keeps_nothing(tmp_path, monkeypatch):
    """A wrong sha256 must fail loudly; the assembled file is never kept or used."""
    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "QWEN_SHA256", "0" * 64)
    with pytest.raises(ModelError, match="expected 0000"):
        models.qwen_gguf()
    assert not any((tmp_path / "gguf").iterdir())


@pytest.mark.eval_model
def test_eval_model_parts_assemble_to_the_published_hash():
    path = models.qwen_gguf()
    assert models.sha256_file(path) == models.QWEN_SHA256
    source = json.loads((models.resolve_model_dir(models.EVAL_MODEL) / "ragcompress_source.json").read_text())
    assert source["sha256"] == models.QWEN_SHA256


def test_a_model_with_several_named_chat_templates_loads(tiny_model_dir, tmp_path):
    """A tokenizer with named templates (``default``, ``tool_use``) has a dict as its chat
    template; hashing it raised ``AttributeError: 'dict' object has no attribute 'encode'``."""
    import shutil

    from transformers import AutoTokenizer

    directory = tmp_path / "named"
    shutil.copytree(tiny_model_dir("llama"), directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    default = tokenizer.chat_template
    tokenizer.chat_template = {"default": default, "tool_use": default + "{# tools #}"}
    tokenizer.save_pretrained(directory)
    lm = models.load_model(str(directory))
    assert isinstance(lm.tokenizer.chat_template, dict)
    plain = models.load_model(str(tiny_model_dir("llama")))
    assert lm.fingerprint == plain.fingerprint and lm.tokenizer_hash != plain.tokenizer_hash


def test_weights_replaced_with_the_same_size_and_mtime_change_the_hash(tmp_path, monkeypatch):
    """The sha256 memo was keyed by path, size and mtime only: weights copied in with their
    mtime kept (``cp -p``, ``rsync -a``) kept the old hash, so a store built for the old weights
    was used with the new ones."""
    import os
    import time

    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    before = models.weights_hash(model_dir)
    stat = weights.stat()
    time.sleep(0.05)  # past the filesystem's timestamp granularity
    replacement = model_dir / "incoming.tmp"
    replacement.write_bytes(b"b" * 64)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, weights)
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert models.weights_hash(model_dir) != before


def test_cache_dir_expands_home_and_is_absolute(tmp_path, monkeypatch):
    """``RAGCOMPRESS_CACHE=~/x`` (unexpanded, e.g. from a .env file) made a folder named ``~`` in
    the current directory; a relative value moved with the current directory."""
    from ragcompress.paths import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAGCOMPRESS_CACHE", "~/rc")
    assert cache_dir() == tmp_path / "home" / "rc"
    assert not (tmp_path / "~").exists()
    monkeypatch.setenv("RAGCOMPRESS_CACHE", "rel")
    assert cache_dir() == tmp_path / "rel"


def test_a_model_id_in_the_hugging_face_cache_loads_by_its_id(tiny_model_dir, tmp_path, monkeypatch):
    """``--model org/name`` finds a model the user already has in the Hugging Face cache (never
    downloading); the store records the id, so answering finds it again the same way."""
    import shutil

    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_model_dir("llama"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no folder named acme/tiny here
    lm = models.load_model("acme/tiny")
    assert lm.ref == "acme/tiny"
    assert lm.fingerprint == models.load_model(str(tiny_model_dir("llama"))).fingerprint
    with pytest.raises(ModelError, match="nor a model id in the Hugging Face cache"):
        models.load_model("acme/absent")


def test_every_entry_point_refuses_the_stores_model_with_another_tokenizer(tiny_model_dir, passages_file, tmp_path):
    """The same weights with another chat template tokenize prompts differently: answering from
    the store and adding to it refuse it alike, with one error class (``Manifest.check_lm``, one
    check where four places once wrote their own and answering raised a plain ``StoreError``)."""
    import shutil

    from transformers import AutoTokenizer

    from ragcompress.errors import StoreMismatchError
    from ragcompress.indexing import IndexConfig, index
    from ragcompress.indexing.indexer import Indexer
    from ragcompress.runtime.engine import Engine
    from ragcompress.store import KVStore
    from ragcompress.testing import HashEmbedder

    embedder = HashEmbedder()
    plain = models.load_model(str(tiny_model_dir("llama")))
    index(passages_file, tmp_path / "store", lm=plain, embedder=embedder, config=IndexConfig(embedder=embedder.name))
    directory = tmp_path / "other-template"
    shutil.copytree(tiny_model_dir("llama"), directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = tokenizer.chat_template + "{# another template #}"
    tokenizer.save_pretrained(directory)
    other = models.load_model(str(directory))
    assert other.fingerprint == plain.fingerprint and other.tokenizer_hash != plain.tokenizer_hash
    with KVStore.open(tmp_path / "store") as store:
        with pytest.raises(StoreMismatchError, match="another tokenizer"):
            Engine(store, other, embedder)
        with pytest.raises(StoreMismatchError, match="another tokenizer"):
            Indexer.for_store(store.manifest, other, embedder)


def test_a_cache_folder_that_cannot_be_created_is_one_named_error(tmp_path, monkeypatch):
    """An unusable ``$RAGCOMPRESS_CACHE`` (or a read-only home) was a PermissionError traceback."""
    from ragcompress.errors import RagCompressError
    from ragcompress.paths import cache_dir

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "afile" / "rc"))
    with pytest.raises(RagCompressError, match=r"cannot create the cache folder .*afile/rc.*set RAGCOMPRESS_CACHE"):
        cache_dir()


@pytest.mark.slow
def test_converting_the_packaged_model_shows_no_progress_bar_off_a_terminal(tmp_path, monkeypatch, capfd):
    """transformers' GGUF de-quantizing bar ignores ``disable_progress_bar()``: it was written
    into ``--json 2>log`` and CI logs; it shows on a terminal only now (tqdm's ``disable=None``)."""
    from ragcompress.models import resolve_model_dir

    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path))
    assert (resolve_model_dir(models.DEFAULT_MODEL) / "config.json").is_file()  # converted into the empty cache
    assert "Converting and de-quantizing" not in capfd.readouterr().err


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_conversion_killed_mid_build_leaves_no_temp_folder_after_the_next_build(tmp_path):
    """A kill (SIGTERM, SIGKILL) during the first conversion ran no ``finally``: its
    ``NAME.tmp-*`` folder (about 540 MB) stayed in the cache forever beside the folder the next
    load built. Now the temp is named for its pid and the next build deletes dead builders'."""
    import os
    import time

    final = tmp_path / "models" / "smollm2-135m-abcdef123456"
    final.parent.mkdir(parents=True)
    dead = final.parent / f"{final.name}.tmp-{_dead_pid()}-abcd_123"
    live = final.parent / f"{final.name}.tmp-{os.getppid()}-abcd_123"  # a running builder's: kept
    old_unnamed = final.parent / f"{final.name}.tmp-x1y2z3w4"  # an older version's, hours old
    young_unnamed = final.parent / f"{final.name}.tmp-q1r2s3t4"
    for folder in (dead, live, old_unnamed, young_unnamed):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 16)
    hours_ago = time.time() - 3 * 3600
    os.utime(old_unnamed, (hours_ago, hours_ago))

    models._atomic_dir(final, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (final / "config.json").is_file()
    assert sorted(p.name for p in final.parent.iterdir()) == sorted([final.name, live.name, young_unnamed.name])


def test_an_assembly_killed_mid_write_leaves_no_gguf_temp_after_the_next_one(tmp_path, monkeypatch):
    """The same for the evaluation model's assembled GGUF (a temp file of up to 491 MB)."""
    import hashlib

    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "cache"))
    parts = tmp_path / "parts"
    for index in range(1, 7):
        (parts / f"p{index}" / "data").mkdir(parents=True)
        (parts / f"p{index}" / "data" / f"part{index:02d}.bin").write_bytes(bytes([index]) * 10)
    whole = b"".join(bytes([index]) * 10 for index in range(1, 7))
    monkeypatch.setattr(models, "QWEN_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(models, "_package_dir", lambda package: parts / f"p{package[-1]}")
    folder = tmp_path / "cache" / "gguf"
    folder.mkdir(parents=True)
    name = f"qwen2.5-coder-0.5b-instruct-{models.QWEN_SHA256[:12]}.gguf"
    (folder / f"{name}.tmp-{_dead_pid()}-abcd_123").write_bytes(b"half")

    path = models.qwen_gguf()
    assert path.read_bytes() == whole
    assert [p.name for p in folder.iterdir()] == [name]


def test_a_converted_model_and_the_assembled_gguf_follow_the_umask(tmp_path, monkeypatch):
    """A converted model was built in ``mkdtemp`` (0700) with its weights saved by safetensors
    (0600), and the GGUF assembled in ``mkstemp`` (0600): whatever the umask, another user of a
    shared ``RAGCOMPRESS_CACHE`` could not read them (transformers then said "Unrecognized
    model ... model_type"). They get the modes the umask gives, before the rename."""
    import hashlib
    import os
    import stat

    old = os.umask(0o002)
    try:
        final = tmp_path / "models" / "smollm2-135m-abcdef123456"

        def build(tmp):
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"x")
            (tmp / "model.safetensors").chmod(0o600)  # as safetensors' save_file leaves it

        models._atomic_dir(final, build)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [final, *final.iterdir()]}
        assert modes == {final.name: 0o775, "config.json": 0o664, "model.safetensors": 0o664}

        monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "cache"))
        parts = tmp_path / "parts"
        for index in range(1, 7):
            (parts / f"p{index}" / "data").mkdir(parents=True)
            (parts / f"p{index}" / "data" / f"part{index:02d}.bin").write_bytes(bytes([index]))
        monkeypatch.setattr(models, "QWEN_SHA256", hashlib.sha256(bytes(range(1, 7))).hexdigest())
        monkeypatch.setattr(models, "_package_dir", lambda package: parts / f"p{package[-1]}")
        assert stat.S_IMODE(models.qwen_gguf().stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_the_sha256_memo_drops_entries_of_files_gone_or_changed_when_rewritten(tmp_path, monkeypatch):
    """``sha256.json`` only ever added entries (3,570 of them, 3,457 for deleted test folders),
    and every model load parses it whole; a kill between its write and rename left
    ``sha256.PID.tmp`` behind. A rewrite now keeps only entries that name a file as it is, and
    deletes dead writers' temps."""
    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "cache"))
    kept, deleted, changed, new = (tmp_path / name for name in ("kept", "deleted", "changed", "new"))
    for path in (kept, deleted, changed, new):
        path.write_bytes(path.name.encode())
    for path in (kept, deleted, changed):
        models._cached_sha256(path)
    deleted.unlink()
    changed.write_bytes(b"changed, longer")
    leftover = tmp_path / "cache" / f"sha256.{_dead_pid()}.tmp"
    leftover.write_text("{}")

    models._cached_sha256(new)
    memo = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert sorted(key.split("|")[0] for key in memo) == sorted(str(p.resolve()) for p in (kept, new))
    assert not leftover.exists()
    assert models._cached_sha256(kept) == models.sha256_file(kept)


def test_a_sha256_memo_that_cannot_be_written_is_a_warning_not_an_error(tmp_path, monkeypatch):
    """A model cache prepared once and mounted read-only: every ``ask`` failed with
    "error: .../sha256.PID.tmp: Read-only file system" because the memo is rewritten on a miss.
    The memo only saves time, so a write that fails warns once and returns the hash."""
    import os

    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights"
    weights.write_bytes(b"weights")
    (tmp_path / "cache" / f"sha256.{os.getpid()}.tmp").mkdir(parents=True)  # the memo's temp cannot be written
    with pytest.warns(UserWarning, match=r"cannot write .*sha256\.json.*RAGCOMPRESS_CACHE") as caught:
        assert models._cached_sha256(weights) == models.sha256_file(weights)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert not (tmp_path / "cache" / "sha256.json").exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff", b"[]", b"5", b'{"key": 5}'])
def test_a_corrupt_sha256_memo_is_a_warning_and_is_written_again(tmp_path, monkeypatch, content):
    """A memo that was no JSON object of hashes (a list, a number) crashed every model load with
    an AttributeError or TypeError. It only saves time: it counts as empty, one line says so, and
    the next write replaces it."""
    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights"
    weights.write_bytes(b"weights")
    memo = tmp_path / "cache" / "sha256.json"
    memo.parent.mkdir()
    memo.write_bytes(content)
    with pytest.warns(UserWarning, match=r"cannot use .*sha256\.json .*RAGCOMPRESS_CACHE") as caught:
        assert models._cached_sha256(weights) == models.sha256_file(weights)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert list(json.loads(memo.read_text()).values()) == [models.sha256_file(weights)]


@pytest.mark.skipif(os.geteuid() == 0 and as_another_uid() is None, reason="root needs setpriv to be another uid")
def test_another_users_unreadable_sha256_memo_is_one_warning_not_an_error():
    """A cache shared with a user whose umask is 077 holds a ``sha256.json`` only that user reads:
    every other user's model load failed with PermissionError. The memo counts as empty, and one
    line says so even where the folder cannot be written either. As root the load runs as uid
    65534 (root reads any file); otherwise the memo is made unreadable (``chmod``)."""
    place = Path(tempfile.mkdtemp())  # under /tmp: another uid can reach it, unlike pytest's tmp_path
    try:
        place.chmod(0o755)
        weights = place / "weights"
        weights.write_bytes(b"weights")
        weights.chmod(0o644)
        memo = place / "cache" / "sha256.json"
        memo.parent.mkdir(mode=0o755)
        memo.write_text("{}")
        memo.chmod(0o000)
        prefix = as_another_uid()
        if prefix is None:
            memo.parent.chmod(0o555)
        code = "import sys; from pathlib import Path; from ragcompress.models import _cached_sha256; print(_cached_sha256(Path(sys.argv[1])))"
        ran = subprocess.run(
            [*(prefix or []), sys.executable, "-c", code, str(weights)],
            capture_output=True,
            text=True,
            env={**os.environ, "RAGCOMPRESS_CACHE": str(memo.parent)},
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert ran.stdout.strip() == models.sha256_file(weights)
        warned = [line for line in ran.stderr.splitlines() if "RagCompressWarning" in line]
        assert len(warned) == 1, ran.stderr
        assert re.search(rf"cannot use {re.escape(str(memo))} \(Permission denied\).*RAGCOMPRESS_CACHE", warned[0])
    finally:
        memo.parent.chmod(0o755)
        shutil.rmtree(place, ignore_errors=True)


def test_a_user_without_a_home_folder_is_told_to_set_the_cache_variable(tmp_path, monkeypatch):
    """``docker --user N`` or Kubernetes' ``runAsUser`` without HOME, for a uid with no passwd
    entry: ``Path.home()`` raised RuntimeError, a 61-line traceback. An empty HOME is no home
    either (it made the cache ``/.cache/ragcompress``): the passwd entry is asked, as for an
    unset HOME."""
    import pwd
    from pathlib import Path
    from types import SimpleNamespace

    from ragcompress.errors import RagCompressError
    from ragcompress.paths import cache_dir

    monkeypatch.delenv("RAGCOMPRESS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: SimpleNamespace(pw_dir=str(tmp_path / "home")))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ragcompress"

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(RagCompressError, match=r"no home folder .*; set RAGCOMPRESS_CACHE to a writable folder$"):
        cache_dir()

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("HOME")
    monkeypatch.setattr(Path, "home", classmethod(no_home))
    with pytest.raises(RagCompressError, match=r"no home folder .*; set RAGCOMPRESS_CACHE to a writable folder$"):
        cache_dir()


def test_an_empty_home_where_there_is_no_passwd_module_is_told_to_set_the_cache_variable(monkeypatch):
    """An empty HOME is looked up in the passwd database, whose ``pwd`` module does not exist on
    Windows: the lookup raised ``ModuleNotFoundError`` (a traceback) instead of the one line
    naming RAGCOMPRESS_CACHE that a user without a home folder gets."""
    import sys

    from ragcompress.errors import RagCompressError
    from ragcompress.paths import cache_dir

    monkeypatch.delenv("RAGCOMPRESS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    monkeypatch.setitem(sys.modules, "pwd", None)  # `import pwd` raises ImportError, as where it does not exist
    with pytest.raises(RagCompressError, match=r"no home folder .*; set RAGCOMPRESS_CACHE to a writable folder$"):
        cache_dir()


def test_the_cache_is_under_xdg_cache_home_where_that_is_set(tmp_path, monkeypatch):
    """``$XDG_CACHE_HOME/ragcompress`` where that is an absolute path (the XDG spec ignores a
    relative one), as the Hugging Face cache does; ``~/.cache/ragcompress`` without it, and
    ``$RAGCOMPRESS_CACHE`` before both."""
    from ragcompress.paths import cache_dir

    monkeypatch.delenv("RAGCOMPRESS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "ragcompress"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    assert cache_dir() == tmp_path / "home" / ".cache" / "ragcompress"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ragcompress"
    monkeypatch.setenv("RAGCOMPRESS_CACHE", str(tmp_path / "rc"))
    assert cache_dir() == tmp_path / "rc"


# Three threads of a fresh interpreter load the model at argv[1] at once; prints what each got.
_LOAD_AT_ONCE = """
import sys, threading
from ragcompress.models import load_model

started, outcomes = threading.Barrier(3), []

def load():
    started.wait()
    try:
        outcomes.append(type(load_model(sys.argv[1]).model).__name__)
    except Exception as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")

threads = [threading.Thread(target=load) for _ in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(outcomes)
"""


def test_threads_loading_models_at_once_each_get_one(tiny_model_dir):
    """The first uses of a LlamaIndex ``LocalLLM`` in ``asyncio.gather`` load the model on worker
    threads at once: transformers imports its model classes lazily and patches torch's init
    functions while it loads, so concurrent loads failed ("cannot import name
    'AutoModelForCausalLM'", "Cannot copy out of meta tensor"). A fresh interpreter, so that the
    first import is the one raced for."""
    ran = subprocess.run(
        [sys.executable, "-c", _LOAD_AT_ONCE, str(tiny_model_dir("llama"))], capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip().splitlines()[-1] == str(["LlamaForCausalLM"] * 3)


# The embedder loads on one thread of a fresh interpreter; a causal LM (argv[1]) loads on another
# once the embedder's import of transformers has begun; prints what each got.
_LOAD_BESIDE_THE_EMBEDDER = """
import sys, threading, time

import torch  # imported first, so that the threads meet at transformers' lazy imports

from ragcompress.models import load_model
from ragcompress.retrieval import Embedder

outcomes = []

def load(what):
    try:
        outcomes.append(what())
    except Exception as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")

def load_model_once_the_embedder_imports():
    while "transformers" not in sys.modules:
        time.sleep(0.001)
    return type(load_model(sys.argv[1]).model).__name__

threads = [
    threading.Thread(target=load, args=(lambda: Embedder().window,)),
    threading.Thread(target=load, args=(load_model_once_the_embedder_imports,)),
]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(sorted(map(str, outcomes)))
"""


def test_a_model_loading_while_the_embedder_loads_gets_one(tiny_model_dir):
    """The embedder loaded without the lock model loads take: a causal LM's load on another thread
    while sentence-transformers imported transformers failed ("cannot import name
    'AutoModelForCausalLM'"; the server and the LlamaIndex components load both on first use)."""
    ran = subprocess.run(
        [sys.executable, "-c", _LOAD_BESIDE_THE_EMBEDDER, str(tiny_model_dir("llama"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip().splitlines()[-1] == str(["256", "LlamaForCausalLM"])
