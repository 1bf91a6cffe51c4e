"""ragcompress: answer RAG questions from precomputed, compressed passage KV caches."""
