"""docs/llamaindex.md's ``text-compression`` block: every text compressor of one
``benchmarks/text_compression.py --out`` run, answered by the same reader with a full prefill."""

from __future__ import annotations

from pathlib import Path

from .shared import load, model_name, source_line, table

TEXT_COMPRESSION = "text_compression_smollm2.json"
# the last run with llmlingua installed (this machine has it no more): its llmlingua rows are shown
# beside the current run's, in a table of their own with that run's baseline
TEXT_COMPRESSION_LLMLINGUA = "text_compression_smollm2_2026-12-04.json"


def text_compression_label(method: str) -> str:
    """The table's name for a ``benchmarks/text_compression.py`` method key (``NAME@RATE``)."""
    name, _, rate = method.partition("@")
    labels = {
        "uncompressed": "uncompressed (baseline)",
        "extractive": f"`TextCompressionPostprocessor` extractive, rate {rate}",
        "sentence-optimizer": f"core `SentenceEmbeddingOptimizer`, percentile {rate}",
        "selfinfo": f"`TextCompressionPostprocessor` selfinfo (words), rate {rate}",
        "selfinfo-token": f'`TextCompressionPostprocessor` selfinfo (tokens, `unit="token"`), rate {rate}',
        "llmlingua": f"`llmlingua.PromptCompressor` (SmolLM2 scorer), rate {rate}",
    }
    return labels.get(name, f"`{method}`")


def render_text_compression(results: Path) -> str:
    """Text compression for LLMs without a KV-cache interface (docs/llamaindex.md): every method
    of one ``benchmarks/text_compression.py --out`` run on the same questions, answered by the
    same reader with a full prefill; rows in the order the run measured them."""
    path = results / TEXT_COMPRESSION
    data = load(path)
    parts = [_text_compression_table(data, data["methods"]), _text_compression_run(data), source_line([path])]
    if data["llmlingua"] != "run" and (results / TEXT_COMPRESSION_LLMLINGUA).is_file():
        earlier_path = results / TEXT_COMPRESSION_LLMLINGUA
        earlier = load(earlier_path)
        rows = {m: item for m, item in earlier["methods"].items() if m == "uncompressed" or m.startswith("llmlingua@")}
        parts += [
            "llmlingua was not installed for that run; its rows from the last run that had it, beside that "
            "run's own baseline (the other methods' rows of that run came before fixes to them):",
            _text_compression_table(earlier, rows),
            _text_compression_run(earlier),
            source_line([earlier_path]),
        ]
    return "\n\n".join(parts)


def _text_compression_table(data: dict, methods: dict) -> str:
    """One table of ``benchmarks/text_compression.py`` rows, in the order the run measured them."""
    rows = [
        [
            text_compression_label(method),
            f"{item['sub_em']:.3f}",
            f"{item['agreement']:.3f}",
            f"{item['tokens_per_question']:.0f}",
            f"{item['token_ratio']:.3f}",
            f"{item['compress_s_median']:.2f}",
        ]
        for method, item in methods.items()
    ]
    header = [
        "method",
        "sub-EM",
        "agreement with uncompressed",
        "passage tokens / question",
        "tokens vs uncompressed",
        "compression latency, median s / question",
    ]
    return table(header, rows)


def _text_compression_run(data: dict) -> str:
    """What one ``benchmarks/text_compression.py`` run measured on, and how loaded the CPU was."""
    meta = data["meta"]
    llmlingua = "run" if data["llmlingua"] == "run" else "not installed"
    return (
        f"{data['n']} questions, top-{data['top_k']}, reader {model_name(data['reader'])}, "
        f"{meta['threads']} torch thread(s), load average {meta['load_at_start'][0]:.1f} at the start "
        f"and {meta['load_at_end'][0]:.1f} at the end, {meta['date'][:10]} (code {meta['git']}); llmlingua: {llmlingua}."
    )
