"""LlamaIndex integration of ragcompress: answer from precomputed, compressed passage KV caches."""

from llama_index.postprocessor.ragcompress.llm import LocalLLM
from llama_index.postprocessor.ragcompress.postprocessor import KVCacheNodePostprocessor
from llama_index.postprocessor.ragcompress.retriever import KVStoreRetriever
from llama_index.postprocessor.ragcompress.synthesizer import KVCacheSynthesizer
from llama_index.postprocessor.ragcompress.text import TextCompressionPostprocessor
from llama_index.postprocessor.ragcompress.transform import KVCacheTransform

__all__ = [
    "KVCacheNodePostprocessor",
    "KVCacheSynthesizer",
    "KVCacheTransform",
    "KVStoreRetriever",
    "LocalLLM",
    "TextCompressionPostprocessor",
]
