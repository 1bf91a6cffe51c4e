"""The on-disk KV-cache store (DESIGN §2)."""

from ragcompress.store.files import create_store
from ragcompress.store.kvstore import KVStore
from ragcompress.store.manifest import FORMAT_VERSION, Manifest
from ragcompress.store.record import PassageRecord
from ragcompress.store.writer import StoreWriter

__all__ = ["FORMAT_VERSION", "KVStore", "Manifest", "PassageRecord", "StoreWriter", "create_store"]
