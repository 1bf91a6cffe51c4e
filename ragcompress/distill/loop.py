"""The optimisation of a run: optimizer steps over the teacher examples until ``config.steps`` or
the time budget, with held-out validation and checkpoints along the way (:func:`run_steps`).

Everything a step depends on is a function of the step number (the learning rate, the example
order drawn from ``config.seed``), so a run resumed from a checkpoint (:class:`TrainingState`)
takes the same steps the uninterrupted run would have.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ragcompress.distill.config import TrainConfig, lr_factor
from ragcompress.distill.distiller import Distiller
from ragcompress.distill.objective import Example, Losses
from ragcompress.errors import NonFiniteError
from ragcompress.interrupts import raise_if_stopped


@dataclass
class TrainingState:
    """Where a run stands (saved in every checkpoint): optimizer steps taken, step time spent
    (seconds, over every invocation) and the loss history (``train``: one row per step, ``val``:
    one per evaluation, the first at step 0 before any training)."""

    step: int = 0
    elapsed: float = 0.0
    history: dict[str, Any] = field(default_factory=lambda: {"train": [], "val": []})


def validation_loss(distiller: Distiller, examples: list[Example]) -> dict[str, float]:
    """Mean of each of :class:`Losses` over the held-out ``examples`` (no gradient)."""
    with torch.no_grad():
        losses = [distiller.losses(e) for e in examples]
    return {name: float(np.mean([float(getattr(x, name)) for x in losses])) for name in Losses._fields}


def run_steps(
    distiller: Distiller,
    config: TrainConfig,
    train_examples: list[Example],
    val_examples: list[Example],
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    state: TrainingState,
    save: Callable[[TrainingState], None],
    progress: bool,
) -> None:
    """Train from ``state`` until ``config.steps`` or until this invocation has spent
    ``config.minutes`` of step time, updating ``state`` in place; ``save`` is called every
    ``config.checkpoint_every`` steps and once at the end (after a last validation). A step whose
    loss, gradients or updated parameters are not finite stops the run (:class:`NonFiniteError`)
    before anything more is saved: a float16 run once wrote an adaptor of NaN and exited 0."""
    from tqdm import tqdm

    history = state.history
    budget = config.minutes * 60 + state.elapsed  # --minutes is this invocation's: a resumed run does not stop early
    rng = random.Random(config.seed)
    order = [
        i
        for _ in range(math.ceil(config.steps * config.batch / len(train_examples)) + 1)
        for i in rng.sample(range(len(train_examples)), len(train_examples))
    ]
    bar = tqdm(total=config.steps, initial=state.step, desc="training", unit="step", disable=not progress)
    distiller.model.train(False)
    while state.step < config.steps and state.elapsed < budget:
        raise_if_stopped()  # a SIGTERM or Ctrl-C whose KeyboardInterrupt a finalizer swallowed
        begin = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, state.step)
        optimizer.zero_grad()
        qa_sum = cont_sum = 0.0
        for i in order[state.step * config.batch : (state.step + 1) * config.batch]:
            losses = distiller.losses(train_examples[i])
            total = losses.kl_answer + config.continuation_weight * losses.kl_cont
            if config.hard_weight:
                total = total + config.hard_weight * losses.ce_answer
            (total / config.batch).backward()
            qa_sum, cont_sum = qa_sum + float(losses.kl_answer.detach()), cont_sum + float(losses.kl_cont.detach())
        finite = math.isfinite(qa_sum + cont_sum) and all(
            p.grad is None or bool(p.grad.isfinite().all()) for p in trainable
        )
        if finite and config.clip:
            torch.nn.utils.clip_grad_norm_(trainable, config.clip)
        if finite:
            optimizer.step()
        if not finite or not all(bool(p.isfinite().all()) for p in trainable):
            raise NonFiniteError(
                f"training step {state.step + 1}: the loss or the adaptor's parameters became NaN or infinite, so "
                "nothing more is saved; train again in a new --out folder with a lower --lr, or with "
                "--dtype float32"
            )
        state.step += 1
        state.elapsed += time.perf_counter() - begin
        history["train"].append(
            {"step": state.step, "kl_answer": qa_sum / config.batch, "kl_cont": cont_sum / config.batch}
        )
        if state.step % config.eval_every == 0 or state.step == config.steps:
            history["val"].append({"step": state.step, **validation_loss(distiller, val_examples)})
        if state.step % config.checkpoint_every == 0:
            save(state)
        bar.update(1)
        bar.set_postfix(kl=f"{qa_sum / config.batch:.3f}", val=f"{history['val'][-1]['kl_answer']:.3f}")
    bar.close()
    if history["val"][-1]["step"] != state.step:
        history["val"].append({"step": state.step, **validation_loss(distiller, val_examples)})
    save(state)
