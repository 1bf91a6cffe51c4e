"""The tries of each batch of a Ray indexing run (:mod:`ragcompress.indexing.ray_runner`), counted
by an actor of their own. A module of its own, importing nothing: the actor's Ray worker imports
the module that defines its class, and ``ray_runner``'s imports (torch, transformers) cost that
worker 2-3.5 CPU seconds a run, for a dict."""


class BatchStarts:
    """How many times each batch was started on an actor (a Ray actor the driver owns, which an
    :class:`~ragcompress.indexing.ray_runner.EncodeActor` tells before each batch). When a batch
    kills its worker on every try, Ray's error names only the dead actor; the batch started most
    often among those not committed is the one that did."""

    def __init__(self) -> None:
        self.starts: dict[int, int] = {}

    def start(self, number: int) -> None:
        self.starts[number] = self.starts.get(number, 0) + 1

    def counts(self) -> dict[int, int]:
        return self.starts
