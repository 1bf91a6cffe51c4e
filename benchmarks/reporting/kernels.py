"""docs/kernels.md's blocks: ``kernel-gpu`` (the fused kernel per call on a GPU,
``benchmarks/gpu_check.sh``) and ``kernel-cpu-ttft`` (the packed CPU path's TTFT against the dense
path, ``benchmarks/kernel_bench.py --ttft --json``)."""

from __future__ import annotations

from pathlib import Path

from .shared import files, load, model_name, source_line, table


def _split_speed(row: dict) -> str:
    """Prefill with one split per passage against the default plan's one split ("–" for decode,
    which the default plan splits already; runs before the column existed did not time it)."""
    if row["phase"] == "decode":
        return "–"
    return f"{row['fused_split-K_vs_fused']:.2f}x" if "fused_split-K_vs_fused" in row else "not timed"


def render_kernel_gpu(results: Path) -> str:
    """The fused kernel's GPU timing (``benchmarks/gpu_check.sh``'s ``kernel_bench.json``, kept in
    ``gpu_check_<gpu>.json``): ms per attention call and its speed against the two baselines."""
    paths = files(results, "gpu_check_*.json")  # raises when there is none
    rows = []
    for path in paths:
        bench = load(path)["kernel_bench"]
        for row in bench["rows"]:
            rows.append(
                [
                    bench["device"]["name"],
                    f"{row['context']} ({row['passages']} x {bench['args']['passage_len']})",
                    row["scheme"],
                    f"{row['phase']} ({row['q_len']})",
                    f"{row['fused_ms']:.3f}",
                    f"{row['deq+sdpa_ms']:.3f}",
                    f"{row['fp16 sdpa_ms']:.3f}",
                    f"{row['fused_vs_deq+sdpa']:.2f}x",
                    f"{row['fused_vs_fp16_sdpa']:.2f}x",
                    _split_speed(row),
                ]
            )
    header = [
        "GPU",
        "context tokens (passages x tokens)",
        "segments",
        "phase (query tokens)",
        "fused ms",
        "dequantize + SDPA ms",
        "fp16 SDPA ms",
        "fused speed vs dequantize + SDPA",
        "fused speed vs fp16 SDPA",
        "prefill split-K speed vs one split",
    ]
    return "\n\n".join([table(header, rows), source_line(paths)])


def render_kernel_cpu_ttft(results: Path) -> str:
    """TTFT of the packed CPU path (the kernel's PyTorch reference) against the dense path
    (``benchmarks/kernel_bench.py --ttft --json``, ``kernel_cpu_ttft_*.json``): medians per
    question over alternating repeats, then the median across questions."""
    paths = files(results, "kernel_cpu_ttft_*.json")  # raises when there is none
    rows = []
    for path in paths:
        data = load(path)
        store, load_avg = data["store"], data["load_average_1min"]
        compression = store["compression"]
        rows.append(
            [
                model_name(store["model"]),
                f"`{compression['method']}` / {compression['quant']}, {store['passages']} passages",
                str(data["top_k"]),
                f"{data['questions']} x {data['repeats']}",
                f"`{data['packed_backend']}`",
                f"{1000 * data['assembled_ttft_s']:.0f}",
                f"{1000 * data['packed_ttft_s']:.0f}",
                f"{data['ratio']:.2f}",
                f"{100 * data['same_first_token']:.0f} %",
                f"{load_avg['before']:.1f} / {load_avg['after']:.1f}",
            ]
        )
    header = [
        "model",
        "store",
        "top-k",
        "questions x repeats",
        "packed backend",
        "dense TTFT ms",
        "packed TTFT ms",
        "median ratio packed / dense",
        "same first token",
        "load average before / after",
    ]
    return "\n\n".join([table(header, rows), source_line(paths)])
