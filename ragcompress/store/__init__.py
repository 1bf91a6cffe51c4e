"""The on-disk KV-cache store (DESIGN §2)."""

from ragcompress.store.kvstore import KVStore, StoreWriter, create_store
from ragcompress.store.manifest import FORMAT_VERSION, Manifest

__all__ = ["FORMAT_VERSION", "KVStore", "Manifest", "StoreWriter", "create_store"]
