"""Exceptions that carry a one-line, actionable message for the CLI to print."""


class RagCompressError(Exception):
    """Base class: the message names the problem and what to do about it."""


class InputError(RagCompressError):
    """The user's input (a JSONL file, a folder, a question) cannot be used as given."""


class StoreError(RagCompressError):
    """A KV-cache store is missing, incomplete, corrupt, locked or built for something else."""


def missing_store(path: object) -> StoreError:
    """The error for a ``--store`` path that does not exist (one wording, raised by the store and
    by the CLI before it loads the model libraries)."""
    return StoreError(f"store {path} does not exist; build it with `ragcompress index --input PASSAGES --store {path}`")


class StoreMismatchError(StoreError):
    """A store was built with another model, tokenizer, template or format version."""


class CorruptSegmentError(StoreError):
    """A stored passage cache failed its checksum or shape check; it is never used."""


class SegmentManifestMismatch(CorruptSegmentError):
    """A sound passage cache disagrees with the store's manifest (its model shape or width): the
    manifest was edited after the build, so the repair is the manifest, not the passage."""


class ModelError(RagCompressError):
    """A model cannot be found, assembled, verified or used with ragcompress."""
