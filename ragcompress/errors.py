"""Exceptions that carry a one-line, actionable message for the CLI to print."""


class RagCompressError(Exception):
    """Base class: the message names the problem and what to do about it."""


class RagCompressWarning(UserWarning):
    """A warning of ragcompress's own: its message names what to do, so the CLI prints it as one
    ``warning: ...`` line. Other libraries' warnings keep Python's format, even when raised from
    ragcompress's code (a deprecation in Ray or transformers names nothing a user could do)."""


class InputError(RagCompressError):
    """The user's input (a JSONL file, a folder, a question) cannot be used as given."""


class PromptTooLongError(InputError):
    """The prefix, the passages, the question and the tokens to generate need more positions than
    the model has. The remedies are named by :meth:`remedy` in the caller's own words: the CLI's
    options by default, the request fields for an HTTP client."""

    def __init__(self, needed: int, passages: int, new_tokens: int, limit: int) -> None:
        self.needed, self.passages, self.new_tokens, self.limit = needed, passages, new_tokens, limit
        super().__init__(self.remedy())

    def __reduce__(self) -> tuple[type, tuple[int, int, int, int]]:  # pickled across processes (serve's worker)
        return type(self), (self.needed, self.passages, self.new_tokens, self.limit)

    def remedy(self, top_k: str = "top_k, --top-k", max_new_tokens: str = "max_new_tokens, --max-new-tokens") -> str:
        return (
            f"prompt needs {self.needed} positions (prefix, {self.passages} passages, question, "
            f"{self.new_tokens} new tokens) but the model handles {self.limit}; shorten the question, "
            f"retrieve fewer passages ({top_k}) or generate fewer tokens ({max_new_tokens})"
        )


class StoreError(RagCompressError):
    """A KV-cache store is missing, incomplete, corrupt, locked or built for something else."""


def missing_store(path: object) -> StoreError:
    """The error for a ``--store`` path that does not exist (one wording, raised by the store and
    by the CLI before it loads the model libraries)."""
    return StoreError(f"store {path} does not exist; build it with `ragcompress index --input PASSAGES --store {path}`")


class StoreAccessError(StoreError):
    """An intact store that this process may not use as asked where it lies: a file of it that
    this user cannot write, or a catalogue SQLite cannot read here. Never damage: the remedy is
    about access, never a rebuild, and ``verify`` raises it rather than report a problem."""


class StoreBusyError(StoreAccessError):
    """A store's catalogue that another process holds locked exclusively (a WAL reader is not
    blocked by a writer's ordinary transaction), or that a writer holds while this user cannot
    create the ``-wal``/``-shm`` needed to read beside it; or a store whose writer lock another
    process holds (``store.writer.StoreLock``: a second writer, or a reader that must keep writers
    out), refused to a writer. Nothing says it is damaged, so the remedy is to retry when the
    writer (or that reader) finishes, never a rebuild; ``verify`` raises it rather than report a
    problem, and every command exits 3 on it."""


class StoreMismatchError(StoreError):
    """A store was built with another model, tokenizer, template or format version."""


class CorruptSegmentError(StoreError):
    """A stored passage cache failed its checksum or shape check; it is never used."""


class SegmentManifestMismatch(CorruptSegmentError):
    """A sound passage cache disagrees with the store's manifest (its model shape or width): the
    manifest was edited after the build, so the repair is the manifest, not the passage."""


class NonFiniteError(RagCompressError):
    """Training's loss or an adaptor's tensors became NaN or infinite (an optimizer step that
    overflowed, e.g. in float16): nothing is saved from it and no such adaptor is used."""


class UnstorableCacheError(InputError, ValueError):
    """A passage's cache holds values its store cannot keep: inf or NaN under any quantization
    (the model overflowed in its dtype), or, for ``fp16`` and the integer schemes (whose scales
    and minimums are fp16), a finite value beyond fp16's range. Raised by the codec, and again
    with the passage's id by the indexer, so ``index`` ends in one line naming the passage. A
    ``ValueError`` too, as the codec's other refusals of what it is given."""


class ModelError(RagCompressError):
    """A model cannot be found, assembled, verified or used with ragcompress."""


def need_matplotlib(drawing: str, extra: str, otherwise: str = "") -> None:
    """A command that draws with matplotlib (an optional extra) checks it is importable before it
    loads a model or measures anything: ``train`` once trained for its full ``--minutes`` and
    then ended in a ModuleNotFoundError traceback at its loss curve. The hint names the extra,
    not the distribution, so it holds whatever the package is installed as."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RagCompressError(
            f"{drawing} with matplotlib, which is not installed: install the {extra} extra "
            f"(pip install -e '.[{extra}]' in a checkout){otherwise}"
        ) from None
