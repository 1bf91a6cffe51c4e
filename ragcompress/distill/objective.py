"""What the student is held to: one example's teacher targets (:class:`Example`) and the losses
computed against them (:class:`Losses`, :func:`binned_kl`).

The teacher's distributions are kept as their top tokens plus the remaining mass, so the KL is
exact between the teacher's and the student's distributions coarsened to those ``top + 1``
outcomes: a lower bound of the full KL, equal to it when the teacher's mass sits in its top
tokens (``benchmarks/distill_eval.py`` reports the full KL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class Example:
    """One training/validation example: retrieved passages, the question's suffix, the teacher's
    answer and, for the answer and the continuation objectives, the teacher's top tokens."""

    qid: str
    passages: list[list[int]]
    suffix: list[int]
    answer: list[int]
    qa_idx: torch.Tensor  # [len(answer) + 1, top] int64
    qa_lp: torch.Tensor  # [len(answer) + 1, top] log-probs
    cont_suffix: list[int]
    cont: list[int]
    cont_idx: torch.Tensor  # [len(cont), top]
    cont_lp: torch.Tensor
    qa_full: torch.Tensor | None = None  # held-out examples: every answer row's full log-probs


class Losses(NamedTuple):
    """One example's losses: the answer and continuation KLs (trained), the cross-entropy of the
    teacher's greedy answer tokens (trained with ``hard_weight``) and, for monitoring, the share
    of answer rows whose argmax is the teacher's (no gradient)."""

    kl_answer: torch.Tensor
    kl_cont: torch.Tensor
    ce_answer: torch.Tensor
    top1_answer: float


def binned_kl(teacher_idx: torch.Tensor, teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """Per-row KL(teacher || student) over the teacher's top tokens plus one "rest" outcome.

    teacher_idx, teacher_lp: ``[rows, top]``; student_lp: ``[rows, vocab]`` log-probabilities.
    """
    p = teacher_lp.exp()
    q_top = student_lp.gather(-1, teacher_idx)
    p_rest = (1.0 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1.0 - q_top.exp().sum(-1)).clamp_min(1e-8)
    return (p * (teacher_lp - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
