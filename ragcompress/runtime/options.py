"""Per-call answering options: one frozen value, never state mutated on the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ragcompress.runtime.recompute import RecomputeConfig, is_number

# "auto": the dense assembled cache (runtime/prepare.py's choose_strategy says why the fused
# kernel is not chosen on CUDA: measured slower on an H200).
BACKENDS = ("auto", "dense", "packed-torch", "packed-triton")


@dataclass(frozen=True)
class AnswerOptions:
    """How one question is answered.

    max_new_tokens: greedy decoding budget
    recompute:      selective recompute at query time (a ratio or a :class:`RecomputeConfig`;
                    0 is plain reuse), see ``runtime.recompute``
    backend:        attention over the stored caches: ``dense`` (dequantize, rotate, assemble a
                    transformers cache, SDPA), ``packed-torch`` / ``packed-triton`` (quantized
                    segments kept packed; the kernel's PyTorch reference or the fused Triton
                    kernel), or ``auto`` (``dense``: the fused kernel was measured slower than SDPA
                    over the dense cache, docs/kernels.md);
                    the answer records which one ran
    calibrate:      apply the attention temperature ``ragcompress calibrate`` recorded in the
                    store's manifest, unless ``recompute`` sets a temperature of its own
    fallback_margin: when > 0, a question whose first answer token from the stored caches leads
                    the runner-up by less than this probability is answered by full prefill
                    instead (the shared prefix's cache reused, and the first passage's where
                    the store's passages are exact: ``runtime.prepare.fallback_prefill``; both
                    passes counted in its TTFT): the
                    answers a stale cache is most likely to flip are the near ties
                    (docs/recompute.md "Falling back on near ties"); 0 never falls back
    """

    max_new_tokens: int = 32
    recompute: RecomputeConfig = RecomputeConfig()
    backend: str = "auto"
    calibrate: bool = True
    fallback_margin: float = 0.0

    def __post_init__(self) -> None:
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        object.__setattr__(self, "recompute", RecomputeConfig.coerce(self.recompute))
        if type(self.calibrate) is not bool:
            raise ValueError(f"calibrate must be True or False, got {self.calibrate!r}")
        if not is_number(self.fallback_margin):
            raise ValueError(f"fallback_margin must be a number in [0, 1), got {self.fallback_margin!r}")
        if not 0.0 <= self.fallback_margin < 1.0:
            raise ValueError(f"fallback_margin must be in [0, 1), got {self.fallback_margin}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of: {', '.join(BACKENDS)}")

    def to_json(self) -> dict[str, Any]:
        """These options as JSON values: what ``eval --json`` and ``bench --json`` record they
        answered with (``recompute`` with every field of its :class:`RecomputeConfig`)."""
        recompute = asdict(self.recompute)
        recompute["ratio_by_passages"] = [list(point) for point in self.recompute.ratio_by_passages]
        return {
            "max_new_tokens": self.max_new_tokens,
            "recompute": recompute,
            "backend": self.backend,
            "calibrate": self.calibrate,
            "fallback_margin": self.fallback_margin,
        }

    def replace(self, **changes: Any) -> AnswerOptions:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    def overridden(
        self,
        *,
        max_new_tokens: int | None = None,
        recompute: float | Any | None = None,
        selection: str | None = None,
        backend: str | None = None,
        fallback_margin: float | None = None,
        calibrate: bool | None = None,
    ) -> AnswerOptions:
        """These options with a caller's explicit choices over them, as every front end applies
        them (``--recompute`` and friends, a ``serve`` request, the LlamaIndex synthesizer): the
        ones given as None are left alone, and ``recompute`` replaces only the fraction (one for
        every top-k, or a schedule), keeping the selection, sinks and check layer a preset chose."""
        options = self
        if max_new_tokens is not None:
            options = options.replace(max_new_tokens=max_new_tokens)
        if recompute is not None:
            options = options.replace(recompute=options.recompute.with_ratio(recompute))
        if selection is not None:
            if not options.recompute.recomputes:  # it ranks the tokens recomputed: here there are none
                raise ValueError(
                    f"selection {selection!r} chooses which passage tokens are recomputed, and nothing is: give a "
                    "recompute fraction too (--recompute R), or a preset that recomputes (faithful)"
                )
            options = options.replace(recompute=replace(options.recompute, selection=selection))
        if backend is not None:
            options = options.replace(backend=backend)
        if fallback_margin is not None:
            options = options.replace(fallback_margin=fallback_margin)
        if calibrate is not None:
            options = options.replace(calibrate=calibrate)
        return options
