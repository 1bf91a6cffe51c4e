"""docs/serve.md's blocks: ``serve-load`` (``ragcompress serve`` under load and faults,
``benchmarks/load.py``) and ``serve-memory`` (a long-running service's memory and TTFT with the
allocator setting off and on, ``benchmarks/serve_memory.py``)."""

from __future__ import annotations

from pathlib import Path

from .shared import files, load, model_name, source_line, table


def _s(value: float | None) -> str:
    return "–" if value is None else (f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s")


def render_serve_load(results: Path) -> str:
    """``ragcompress serve`` under load (``serve_load.json``, ``benchmarks/load.py --serve-store``):
    throughput with 1 and 8 clients, batching on and off, then the long run with its faults."""
    path = results / "serve_load.json"
    data = load(path)
    meta, comparison = data["meta"], data["batching_comparison"]
    out = []
    if comparison:
        rows = []
        medians = comparison["median"]
        for row in medians.values():
            single = medians[f"batch{row['batch']}_clients1"]["throughput_rps"]
            rows.append(
                [
                    "off (`--batch 1`)" if row["batch"] == 1 else f"on (`--batch {row['batch']}`)",
                    str(row["clients"]),
                    f"{row['throughput_rps']:.2f}",
                    f"{row['tokens_per_s']:.1f}",
                    _s(row["latency_p50_s"]),
                    f"{row['throughput_rps'] / single:.2f}x",
                ]
            )
        out += [
            table(["batching", "clients", "answers/s", "tokens/s", "p50 latency", "vs 1 client"], rows),
            "",
            f"Medians of {len(comparison['rounds'])} rounds of {comparison['seconds_per_phase']:.0f} s per cell, "
            "the two services measured in alternation. Batched vs unbatched at "
            f"{max(r['clients'] for r in medians.values())} clients: {comparison['batched_vs_unbatched']:.2f}x.",
            "",
        ]
    single, run = data["single_client"], data["load"]
    queue = run["queue_s"]
    # runs before 2026-12-06 kept the server's TTFT over every answer only
    streamed = "ttft_server_streamed_s" in run
    server = "ttft_server_streamed_s" if streamed else "ttft_server_s"
    out += [
        table(
            [
                "phase",
                "answers",
                "failed",
                "lost",
                "429",
                "answers/s",
                "TTFT p50 / p99 (client, streamed answers)",
                "TTFT p50 / p99 (server, the same answers)" if streamed else "TTFT p50 / p99 (server, every answer)",
                "queue p50 / p99",
                "latency p50 / p99",
            ],
            [
                [
                    f"{n} client{'s' if n > 1 else ''}, {phase['seconds']:.0f} s",
                    str(phase["ok"]),
                    str(phase["failed"]),
                    str(phase["lost"]),
                    str(phase["rejected"]),
                    f"{phase['throughput_rps']:.2f}",
                    f"{_s(phase['ttft_client_s']['p50'])} / {_s(phase['ttft_client_s']['p99'])} "
                    f"(n = {phase['ttft_client_s']['n']})",
                    f"{_s(phase[server]['p50'])} / {_s(phase[server]['p99'])} (n = {phase[server]['n']})",
                    f"{_s(phase['queue_s']['p50'])} / {_s(phase['queue_s']['p99'])}",
                    f"{_s(phase['latency_s']['p50'])} / {_s(phase['latency_s']['p99'])}",
                ]
                for n, phase in ((1, single), (meta["clients"], run))
            ],
        ),
        "",
        f"Throughput with {meta['clients']} clients: {data['throughput_vs_single']:.2f}x one client's "
        f"(TTFT client side: first content chunk of a streamed answer, queue wait included; server side: "
        f"`ragcompress.ttft_s`; queue p50/p99 {_s(queue['p50'])} / {_s(queue['p99'])}).",
    ]
    faults = []
    fuzz, indexed, sigterm = data.get("fuzz"), data.get("index"), data.get("sigterm")
    if fuzz:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(fuzz["statuses"].items()))
        faults.append(
            f"fuzzed bodies: {fuzz['requests']} sent ({statuses}), {fuzz['5xx']} answered 5xx, {fuzz['lost']} dropped"
        )
    if indexed:
        faults.append(
            f"`ragcompress index` during the load: exit {indexed['exit']} after {indexed['seconds']:.0f} s, "
            f"{indexed['answerable']}/{indexed['passages']} new passages answer by id, "
            f"{indexed['retrieved_top3_by_own_text']}/{indexed['passages']} retrieved in the top 3 by their own text"
        )
    if sigterm:
        faults.append(
            f"SIGTERM with {sigterm['requests']} requests in flight "
            f"({sigterm['queue_at_signal'].get('waiting', '?')} still queued): {sigterm['ok']} finished, exit status "
            f"{sigterm['exit_code']} after {sigterm['seconds_to_exit']:.1f} s"
        )
    failed = [name for name, passed in data["checks"].items() if not passed]
    faults.append("checks: " + ("all passed" if not failed else "FAILED: " + ", ".join(failed)))
    out += ["", *[f"* {line}" for line in faults], ""]
    before, after = meta["load_before"][0], meta["load_after"][0]
    out.append(
        f"{model_name(meta['model'])} over `{meta['store']}`, `--max-tokens {meta['max_tokens']}`, "
        f"{meta['cpus']} CPUs shared with other jobs: load average {before:.1f} before the run, {after:.1f} after "
        f"(measured {meta['date']}). " + source_line([path])
    )
    return "\n".join(out)


def render_serve_memory(results: Path) -> str:
    """``benchmarks/serve_memory.py``: per model, the service's resident memory with the allocator
    setting off and on (medians over rounds), then its server TTFT, on against off paired by
    request."""
    paths = files(results, "serve_memory_*.json")
    runs = [load(path) for path in paths]
    bands = [key for key in runs[0]["ttft_on_over_off"] if key.startswith("top")]  # e.g. top1-4, in order
    memory, latency = [], []
    for data in runs:
        off, on = data["settings"]["off"], data["settings"]["on"]
        name = model_name(data["meta"]["model"])
        memory.append(
            [name]
            + [
                f"{off[key]:.0f} / {on[key]:.0f}"
                for key in ("rss_started_mib", "rss_after_warmup_mib", "rss_end_mib", "peak_rss_mib")
            ]
            + [
                f"{off[key]:+.1f} / {on[key]:+.1f}"
                for key in ("growth_second_half_mib_per_100", "anon_growth_second_half_mib_per_100")
            ]
        )
        ratios = data["ttft_on_over_off"]
        latency.append(
            [
                name,
                f"{data['requests']} x {data['rounds']}",
                f"{1000 * off['ttft_median_s']:.0f} / {1000 * on['ttft_median_s']:.0f}",
                f"{ratios['all']:.2f}",
            ]
            + [f"{ratios[band]:.2f}" for band in bands]
        )
    memory_header = ["model", "RSS started, MiB: off / on", "after warm-up", "at the end", "peak (VmHWM)"]
    memory_header += ["growth over the second half, MiB per 100 requests", "of it anonymous (heap)"]
    latency_header = ["model", "requests x rounds", "server TTFT median, ms: off / on", "on / off, paired median"]
    latency_header += ["top-" + band[3:].replace("-", "..") for band in bands]  # top1-4 -> top-1..4
    first = runs[0]
    stores = "; ".join(
        f"{model_name(data['meta']['model'])}: `{data['store']}` ({data['store_quant']}), load average "
        + " and ".join(f"{data[key]:.1f} at the {key[8:]}" for key in ("load_at_start", "load_at_end") if key in data)
        for data in runs
    )
    note = (
        f"One request at a time, `max_tokens` 1, top-k drawn from 1 to {first['max_top_k']} (seed {first['seed']}); "
        f"the first {first['warmup']} requests are left out of the TTFT figures. Stores: {stores}."
    )
    return "\n\n".join([table(memory_header, memory), table(latency_header, latency), note, source_line(paths)])
