"""``store-scale`` (README, docs/scaling.md) and ``scale-estimate`` (docs/scaling.md): stores at
1k..100k passages, Ray indexing against one process, and 10M passages on N nodes simulated from
the measured rates (``benchmarks/store_scale.py``)."""

from __future__ import annotations

from pathlib import Path

from .shared import load, source_line, table


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _range(row: dict, part: str) -> str:
    low, high = row[f"{part}_vs_smallest_range"]
    return f"{low:.2f}–{high:.2f}"


def render_store_scale(results: Path) -> str:
    """Stores at 1k..100k passages (``store_scale.json``) and Ray against one process
    (``ray_throughput.json``), both from ``benchmarks/store_scale.py``."""
    scale_path, tp_path = results / "store_scale.json", results / "ray_throughput.json"
    scale = load(scale_path)
    rows = []
    for r in scale["rows"]:
        index = r["index"]
        kind = index["type"] if index["type"] == "flat" else f"ivf ({index['nlist']:,} cells, nprobe {index['nprobe']})"
        recall = r.get("query_recall_at_10")
        built = index.get("recall_at_10")
        rows.append(
            [
                f"{r['passages']:,}",
                kind,
                "exact" if recall is None else f"{recall:.3f} / {built:.3f}",
                f"{r['search_ms']:.3f}",
                f"{r['load_ms']:.3f}",
                f"{r['total_ms']:.3f} (p90 {r['total_p90_ms']:.3f})",
                f"{r['total_vs_smallest']:.2f}x ({_range(r, 'total')})",
                f"{r['interleaved_ms']:.3f} ({r['interleaved_vs_smallest']:.2f}x)",
                f"{r['with_real_segments_vs_smallest']:.2f}x" if "with_real_segments_vs_smallest" in r else "–",
                f"{r['reload_ms']:.3f}",
                f"{r['open_s']:.2f}",
                f"{r['rss_added_mb']:.0f}",
                _mb(r["disk_bytes"]["total"]),
            ]
        )
    meta = scale["meta"]
    out = [
        table(
            [
                "passages",
                "FAISS index",
                "recall@10 (queries / at build)",
                "search (ms)",
                f"load top-{scale['top_k']} (ms)",
                "search + load (ms)",
                "vs smallest (range over processes)",
                "interleaved query by query (ms, vs smallest)",
                "with real segments, estimated (vs smallest)",
                "same segment again (ms)",
                "open (s)",
                "RSS added (MB)",
                "disk (MB)",
            ],
            rows,
        ),
        "",
        f"Medians over {meta['questions']} queries x {meta['repeats']} rounds after one untimed pass of the same "
        f"queries (page cache warm), in each of {scale['processes']} fresh processes; times and ratios are the "
        f"medians over the processes. Served: {scale['block']} queries to one store, then the next, order rotating; "
        f"target: search + load at the largest store within {scale['target_total_vs_smallest']}x of the smallest. "
        + (
            f"Real segments: each size's search plus the median load of {scale['top_k']} random segments of "
            f"`{scale['real_segment_store']}` ({scale['real_segment_load_ms']:.1f} ms, timed in the same run). "
            if scale.get("real_segment_load_ms")
            else ""
        )
        + f"Load average {meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after (2 cores, shared). "
        + source_line([scale_path]),
    ]
    if tp_path.is_file():
        tp = load(tp_path)
        med = tp["median"]
        same = all(tp["same_bytes"].values())

        def rate(key: str) -> str:
            """A marginal rate <= 0 means fixed costs varied more than the work: not a rate."""
            if key not in med:
                return "–"
            return f"{med[key]:.2f}" if med[key] > 0 else "not measurable (< 0)"

        out += [
            "",
            table(
                [
                    "indexing (SmolLM2-135M, SQuAD-dev)",
                    "one process, 2 threads",
                    "Ray, 2 actors x 1 thread",
                    "Ray / one process",
                    "control: one process, 1 thread",
                ],
                [
                    [
                        f"marginal passages/s ({tp['sizes'][0]} -> {tp['sizes'][-1]} passages)",
                        rate("single_marginal_pps"),
                        rate("ray_marginal_pps"),
                        f"{med['marginal_ratio']:.2f}x" if med["marginal_ratio"] > 0 else "–",
                        rate("single_1t_marginal_pps"),
                    ],
                    [
                        f"end to end passages/s ({tp['sizes'][-1]} passages, model loads included)",
                        f"{med['single_end_to_end_pps']:.2f}",
                        f"{med['ray_end_to_end_pps']:.2f}",
                        f"{med['end_to_end_ratio']:.2f}x",
                        f"{med['single_1t_end_to_end_pps']:.2f}" if "single_1t_end_to_end_pps" in med else "–",
                    ],
                ],
            ),
            "",
            f"Medians of {len(tp['rounds'])} rounds, order rotating; target Ray / one process >= {tp['target_ratio']}. "
            f"Same catalogue rows and segment bytes: {'yes' if same else 'NO'} (`store_digest`). "
            f"Load average {tp['meta']['load_before'][0]:.1f} before, {tp['meta']['load_after'][0]:.1f} after. "
            + source_line([tp_path]),
        ]
    return "\n".join(out)


def render_scale_estimate(results: Path) -> str:
    """10M passages on N nodes, simulated from measured rates (``scale_estimate.json``,
    ``benchmarks/store_scale.py estimate``)."""
    path = results / "scale_estimate.json"
    est = load(path)
    rows = [
        [
            str(r["nodes"]),
            str(r["workers"]),
            f"{r['encode_and_commit_h']:.1f}",
            f"{r['index_build_h']:.1f}",
            f"{r['total_h']:.1f}",
            "driver" if r["driver_bound"] else "actors",
        ]
        for r in est["rows"]
    ]
    return "\n".join(
        [
            table(
                [
                    "nodes (16 cores)",
                    "actors",
                    "encode + commit (h)",
                    "index build (h)",
                    "total (h)",
                    "bound by",
                ],
                rows,
            ),
            "",
            f"{est['passages']:,} passages; measured inputs: {est['actor_pps']:.2f} passages/s per actor "
            f"(SmolLM2-135M, int8, 1 thread: the one-process control's marginal rate in `ray_throughput.json`), "
            f"{est['driver_commit_rows_per_s']:,.0f} catalogue rows/s at the driver, "
            f"index build {est['index_build_s_measured']:.1f} s at {est['index_build_measured_at']:,} vectors "
            f"(IVF, {est['index_type_at_estimate']['nlist']:,} cells at {est['passages']:,}; scaled by N x cells). "
            f"Store: {est['segment_bytes_per_passage'] / 1e3:.0f} KB of segment and "
            f"{est['catalogue_bytes_per_passage'] / 1e3:.1f} KB of catalogue per passage (the SmolLM2 int8 SQuAD store), "
            f"{est['store_tb']:.1f} TB in all; IVF-Flat index ~{est['index_gb']:.0f} GB. " + source_line([path]),
        ]
    )
