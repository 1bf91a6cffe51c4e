"""Offline indexing: passages -> embeddings + compressed KV caches in a store.

Re-running on the same input skips passages already committed (matched by id and text hash), so
a killed run resumes where it stopped. A run with another model, template or compression config
on an existing store fails before writing anything, unless ``overwrite`` is set, in which case
the new store is built beside the old one and swapped in only when complete.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ragcompress.compressors import CompressionContext, make_compressor
from ragcompress.encoder import PassageEncoder
from ragcompress.errors import InputError, StoreError
from ragcompress.inputs import PassageInput, iter_passages, validate
from ragcompress.models import LoadedModel, load_model
from ragcompress.prompt import PromptTemplate
from ragcompress.quant import QuantConfig
from ragcompress.retrieval import DEFAULT_EMBEDDER, Embedder
from ragcompress.store import KVStore, Manifest, StoreWriter, create_store
from ragcompress.store.codec import encode
from ragcompress.store.kvstore import StoreLock, replace_store


@dataclass(frozen=True)
class IndexConfig:
    """Compression settings of a store (recorded in its manifest)."""

    method: str = "none"
    ratio: float | None = None
    quant: str = "none"
    group_size: int = 32
    budget: int | None = None  # tokens kept per head; replaces ratio
    keep_first: int | None = None  # protected leading / trailing tokens; None: the method's default
    keep_last: int | None = None

    def __post_init__(self) -> None:
        QuantConfig(self.quant, self.group_size)  # validates quant and group_size
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.ratio is not None and self.budget is not None:
            raise ValueError("give either ratio (fraction kept) or budget (tokens kept), not both")
        self.compressor()  # validates method and its parameters, listing the allowed values

    def compressor(self):
        params = {} if self.ratio is None else {"ratio": self.ratio}
        for name in ("budget", "keep_first", "keep_last"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        return make_compressor(self.method, **params)


@dataclass(frozen=True)
class IndexReport:
    passages: int
    indexed: int
    skipped: int
    seconds: float
    store: str

    def to_json(self) -> dict[str, Any]:
        return {
            "passages": self.passages,
            "indexed": self.indexed,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "store": self.store,
        }


def fp16_bytes_per_token(config: Any) -> int:
    """Bytes an uncompressed fp16 cache takes per token: K and V, every layer and KV head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2


def build_manifest(lm: LoadedModel, template: PromptTemplate, config: IndexConfig, embedder: str) -> Manifest:
    compressor = config.compressor()
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    return Manifest(
        model_ref=lm.ref,
        model_fingerprint=lm.fingerprint,
        tokenizer_hash=lm.tokenizer_hash,
        template=template.as_dict(),
        compression={**compressor.config(), "quant": config.quant, "group_size": config.group_size},
        embedder=embedder,
        model_shape={
            "layers": lm.config.num_hidden_layers,
            "kv_heads": lm.config.num_key_value_heads,
            "head_dim": head_dim,
        },
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _batches(items: Iterator[PassageInput], size: int) -> Iterator[list[PassageInput]]:
    while batch := list(islice(items, size)):
        yield batch


def index(
    input_path: str | Path,
    store_path: str | Path,
    *,
    model: str | None = None,
    config: IndexConfig = IndexConfig(),
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    lm: LoadedModel | None = None,
    embedder: Embedder | None = None,
) -> IndexReport:
    """Index ``input_path`` (JSONL or folder) into the store at ``store_path``."""
    start = time.perf_counter()
    input_path, store_path = Path(input_path), Path(store_path)
    exists = (store_path / "manifest.json").is_file()
    if exists and not overwrite:  # one streaming pass also refuses ids stored with another text
        with KVStore.open(store_path) as stored:
            total = validate(input_path, stored.catalogue.shas_of, str(store_path))
    else:
        total = validate(input_path)
    if overwrite and not exists and store_path.exists() and (not store_path.is_dir() or any(store_path.iterdir())):
        raise StoreError(f"{store_path} is not a ragcompress store; refusing to overwrite it")
    lm = lm or load_model(model)
    embedder = embedder or Embedder(DEFAULT_EMBEDDER)
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    manifest = build_manifest(lm, template, config, embedder.name)
    compressor = config.compressor()
    quant = QuantConfig(config.quant, config.group_size)

    target = store_path
    if exists and not overwrite:
        Manifest.read(store_path).check_same_build(manifest)
    elif store_path.exists() and not exists and not overwrite and any(store_path.iterdir()):
        raise StoreError(f"{store_path} exists and is not a ragcompress store; choose an empty or new --store")
    old_lock = None
    if overwrite and exists:  # hold the old store's writer lock until the new one replaces it
        old_lock = StoreLock(store_path)
        target = store_path.with_name(f".{store_path.name}.overwrite-{os.getpid()}")
        shutil.rmtree(target, ignore_errors=True)
    elif overwrite and store_path.exists():
        store_path.rmdir()  # an empty directory (checked above)

    encoder = PassageEncoder(lm, template)
    if not (target / "manifest.json").is_file():
        create_store(target, manifest, encoder.prefix_kv)
    max_tokens = int(getattr(lm.config, "max_position_embeddings", 1 << 30)) - encoder.prefix_len - 64

    indexed = skipped = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="passage", desc="indexing")
    with StoreWriter(target) as writer:
        for batch in _batches(iter_passages(input_path), batch_size):
            known = writer.known_of([p.id for p in batch])
            todo = [p for p in batch if p.id not in known]
            skipped += len(batch) - len(todo)
            if todo:
                # Encode the whole input-order batch even when some of it is stored already: a
                # passage's cache then never depends on what a killed run had finished, so a
                # resumed store is byte-identical to an uninterrupted one.
                batch_ids = [encoder.tokens.passage(p.text) for p in batch]
                for passage, ids in zip(batch, batch_ids, strict=True):
                    if len(ids) > max_tokens:
                        raise InputError(
                            f"passage {passage.id!r} has {len(ids)} tokens, more than "
                            f"{lm.ref} can attend to ({max_tokens}); split it"
                        )
                batch_caches = encoder.encode(batch_ids)
                pending = [i for i, p in enumerate(batch) if p.id not in known]
                token_ids = [batch_ids[i] for i in pending]
                caches = [batch_caches[i] for i in pending]
                vectors = embedder.embed([p.text for p in todo])
                items = []
                for passage, ids, kv, vector in zip(todo, token_ids, caches, vectors, strict=True):
                    kept = compressor.compress(kv, CompressionContext(encoder, ids))
                    items.append(
                        {
                            "id": passage.id,
                            "title": passage.title,
                            "text": passage.text,
                            "meta": passage.meta,
                            "text_sha": passage.text_sha,
                            "blob": encode(kept, quant),
                            "num_tokens": kept.num_tokens,
                            "kept": kept.kept_tokens,
                            "embedding": vector,
                        }
                    )
                writer.add(items)
                indexed += len(todo)
            if bar is not None:
                bar.update(len(batch))
        writer.write_index()
    if bar is not None:
        bar.close()

    if target != store_path:
        replace_store(target, store_path)
    if old_lock is not None:
        old_lock.release()
    return IndexReport(total, indexed, skipped, time.perf_counter() - start, str(store_path))
