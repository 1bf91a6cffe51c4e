"""``train``: a KV-Distill passage adaptor (docs/distill.md)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ragcompress.cli.options import (
    DTYPE_OPTION,
    path_option,
    quiet_libraries,
    show_progress,
)
from ragcompress.errors import RagCompressError, need_matplotlib


def train(
    model: str | None = typer.Option(
        None, "--model", help="embedded model name, local HF directory, or a model id already in the HF cache"
    ),
    passages: Path = path_option(..., "--passages", help="JSONL of {id, title, text} (articles split by title)"),
    questions: Path = path_option(..., "--questions", help="JSONL of {id, question, answers, passage_id}"),
    out: Path = path_option(..., "--out", help="output folder (resumes from its checkpoint.safetensors)"),
    val_articles: list[str] | None = typer.Option(
        None,
        "--val-articles",
        help="a held-out title, once per title (titles may hold commas; default: every third title, sorted)",
    ),
    steps: int = typer.Option(150, "--steps", min=1, help="optimizer steps"),
    minutes: float = typer.Option(
        40.0,
        "--minutes",
        min=0.0,
        help="stop after this many minutes of training steps (per invocation: a resumed run gets them anew; "
        "0 finishes a run from its checkpoint without new steps)",
    ),
    batch: int = typer.Option(4, "--batch", min=1, help="examples per optimizer step"),
    lr: float = typer.Option(3e-4, "--lr", help="learning rate (> 0)"),
    warmup: int = typer.Option(0, "--warmup", min=0, help="steps over which the learning rate rises to --lr"),
    decay: str = typer.Option("constant", "--decay", help="'constant' or 'cosine' (to a tenth of --lr by --steps)"),
    rank: int = typer.Option(8, "--rank", min=1),
    alpha: int | None = typer.Option(
        None,
        "--alpha",
        min=1,
        help="LoRA alpha (the factors' product is scaled by alpha / rank); default twice --rank. With Adam "
        "the product moves about alpha * lr per step whatever the rank, so a larger rank at the same "
        "step size keeps alpha (on Qwen, rank 32 at alpha 64 was unstable where rank 8 at 16 was not)",
    ),
    kind: str = typer.Option(
        "forward",
        "--kind",
        help="'forward': LoRA layers inside the passage forward (peft); 'cache': a correction of the cached "
        "keys and values only (the first, cheaper design; docs/distill.md)",
    ),
    train_questions: int = typer.Option(0, "--train-questions", min=0, help="0: all training questions"),
    val_examples: int = typer.Option(16, "--val-examples", min=1),
    views: int = typer.Option(
        1,
        "--views",
        min=1,
        help="examples per training question: its retrieved passages, then VIEWS-1 other draws of top-k from "
        "its 2*top-k nearest (the teacher answers each; more data for the same questions)",
    ),
    continuation: int = typer.Option(32, "--continuation", min=1, help="reconstruction tokens per example"),
    continuation_weight: float = typer.Option(
        0.5, "--continuation-weight", min=0.0, help="the reconstruction KL's weight (the answer KL's is 1)"
    ),
    hard_weight: float = typer.Option(
        0.0,
        "--hard-weight",
        min=0.0,
        help="weight of the cross-entropy of the teacher's greedy answer tokens beside the answer KL (0: KL only)",
    ),
    scorer_passages: int | None = typer.Option(
        None,
        "--scorer-passages",
        min=0,
        help="passages the learned retention scorer is fitted on (default: 40, or 0 when --method evicts "
        "by another scorer, so no store would read it)",
    ),
    eval_every: int = typer.Option(10, "--eval-every", min=1),
    method: str = typer.Option(
        "none", "--method", help="train for a store evicted by this method (e.g. global:kvzip; kind forward)"
    ),
    ratio: float = typer.Option(1.0, "--ratio", min=0.0, max=1.0, help="fraction of tokens that --method keeps"),
    quant: str = typer.Option("none", "--quant", help="train for a store quantized so (int8 | int4 | int2 | fp16)"),
    value_quant: str | None = typer.Option(
        None, "--value-quant", help="train for a store whose values take this width (as index --value-quant)"
    ),
    keep_first: int | None = typer.Option(None, "--keep-first", min=0, help="as index --keep-first, for --method"),
    keep_last: int | None = typer.Option(None, "--keep-last", min=0, help="as index --keep-last, for --method"),
    value_norm: bool = typer.Option(
        False, "--value-norm", help="as index --value-norm, for --method: scores weighted by each row's value norm"
    ),
    kv_rank: int | None = typer.Option(
        None, "--kv-rank", help="train for a low-rank store (index --rank R): kept rows projected to this rank"
    ),
    kv_rank_values: bool = typer.Option(
        True, "--kv-rank-values/--no-kv-rank-values", help="with --kv-rank: project values too (as index)"
    ),
    calibration_passages: int = typer.Option(
        64, "--calibration-passages", min=1, help="with --kv-rank: training passages the basis is fitted on"
    ),
    extra_passages: str | None = typer.Option(
        None,
        "--extra-passages",
        parser=os.path.expanduser,
        help="more training text (JSONL or a folder of .txt/.md, e.g. ../shared/data/pg-essays-dev): the base "
        "model writes a question about each chosen passage, and the teacher answers it",
    ),
    extra_questions: int = typer.Option(
        0, "--extra-questions", min=0, help="with --extra-passages: questions written, evenly spaced (0: one each)"
    ),
    init_adaptor: str | None = typer.Option(
        None,
        "--init-adaptor",
        parser=os.path.expanduser,
        help="start from this adaptor (folder or packaged name; same model and kind, trained without the held-out "
        "articles) instead of zeros: continues a finished run",
    ),
    threads: int = typer.Option(2, "--threads", min=1),
    dtype: str | None = DTYPE_OPTION,
) -> None:
    """Train a KV-Distill passage adaptor and its learned retention scorer (docs/distill.md)."""
    quiet_libraries()
    import torch

    from ragcompress.distill.train import TrainConfig
    from ragcompress.distill.train import train as run_train
    from ragcompress.models import load_model

    torch.set_num_threads(threads)
    try:
        config = TrainConfig(
            steps=steps,
            minutes=minutes,
            batch=batch,
            lr=lr,
            warmup=warmup,
            decay=decay,
            rank=rank,
            alpha=2 * rank if alpha is None else alpha,
            kind=kind,
            train_questions=train_questions,
            val_examples=val_examples,
            views=views,
            continuation=continuation,
            continuation_weight=continuation_weight,
            hard_weight=hard_weight,
            scorer_passages=scorer_passages,
            eval_every=eval_every,
            method=method,
            ratio=ratio,
            quant=quant,
            value_quant=value_quant,
            keep_first=keep_first,
            keep_last=keep_last,
            value_norm=value_norm,
            kv_rank=kv_rank,
            kv_rank_values=kv_rank_values,
            calibration_passages=calibration_passages,
            val_articles=list(val_articles or []),
            init_adaptor=init_adaptor,
            extra_passages=extra_passages,
            extra_questions=extra_questions,
        )
    except ValueError as exc:
        raise RagCompressError(str(exc)) from None
    need_matplotlib("train draws its loss curve", "train")  # drawn at the end, after the whole run
    adaptor = run_train(load_model(model, dtype=dtype), passages, questions, out, config, progress=show_progress(False))
    metrics = adaptor.meta["metrics"]
    typer.echo(
        f"adaptor {adaptor.hash[:16]} -> {out / 'adaptor'}; held-out KL (answer) "
        f"{metrics['held_out_start']['kl_answer']:.4f} -> {metrics['held_out_end']['kl_answer']:.4f}, answer rows "
        f"whose argmax is full prefill's {metrics['held_out_start'].get('top1_answer', float('nan')):.3f} -> "
        f"{metrics['held_out_end'].get('top1_answer', float('nan')):.3f}"
    )
    if metrics["steps"] < config.steps and config.minutes == 0:  # a run finished from its checkpoint
        typer.echo(
            f"stopped at step {metrics['steps']} of {config.steps}: --minutes 0 takes no step; run it again with "
            "--minutes above 0 to continue from the checkpoint"
        )
    elif metrics["steps"] < config.steps:  # --minutes ran out first
        typer.echo(
            f"stopped at step {metrics['steps']} of {config.steps}: --minutes {config.minutes:g} of step time ran out; "
            "run the same command again to continue from the checkpoint"
        )
