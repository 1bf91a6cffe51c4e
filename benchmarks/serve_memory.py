"""A long-running ``ragcompress serve`` with and without the allocator setting: memory and latency.

The ``ragcompress`` command keeps freed memory in its process (``ragcompress/runtime/memory.py``:
glibc's ``mallopt``, no per-allocation ``mmap``, no trimming of the heap top), which made cache
assembly cheaper in a one-off profile. Two things were not measured: whether a server's memory
keeps *growing* under it, when requests of varied size (top-k from 1 to 16) fragment the heap
that is no longer trimmed, and whether the cached path gains end to end over many requests
(``bench``'s three questions could not resolve it).

Each round starts the real service twice, in turn, on the same store: once with
``RAGCOMPRESS_KEEP_FREED_MEMORY=0`` (``off``) and once without (``on``, the default), the order
alternating by round so that a drift of the machine falls on both. Each gets the same seeded
sequence of requests, one at a time: a question of the list with a drawn top-k and
``max_tokens`` 1, so the response's server-side ``ragcompress.ttft_s`` is the cached path
(loading and assembling the caches, prefilling the question; a request answered alone is
retrieved before its clock starts). After every response
the service's resident set (``VmRSS`` of ``/proc/PID/status``) is read, and its peak (``VmHWM``)
at the end.

Reported per setting, medians over rounds: the resident set after the warm-up requests and at
the end, the peak, the growth over the second half of the requests (least squares, MiB per 100
requests: a heap that fragments keeps growing; also of the anonymous part alone), and the server
TTFT; ``on`` against ``off`` as
the median of per-request ratios (the same request in both: paired), overall and by top-k band.

    .venv/bin/python benchmarks/serve_memory.py --store runs/store --requests 200 --rounds 2 \\
        --out docs/results/serve_memory_smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ragcompress.data import SAMPLE_QUESTIONS
from ragcompress.store.manifest import Manifest

from common import Service, chat_body, question_texts, results_meta

SETTING_ENV = {"off": {"RAGCOMPRESS_KEEP_FREED_MEMORY": "0"}, "on": {"RAGCOMPRESS_KEEP_FREED_MEMORY": "1"}}
BANDS = ((1, 4), (5, 8), (9, 16))
MIB = 2**20


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, its anonymous part ``RssAnon`` (the heap and other private memory, where a
    fragmenting or leaking heap shows) and ``VmHWM`` of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def request_plan(questions: list[str], n: int, max_top_k: int, seed: int) -> list[tuple[str, int]]:
    """The ``n`` (question, top-k) pairs every service is asked, in order: questions in turn,
    top-k drawn uniformly from 1 to ``max_top_k`` (seeded)."""
    rng = random.Random(seed)
    return [(questions[i % len(questions)], rng.randint(1, max_top_k)) for i in range(n)]


def slope_mib_per_100(values: list[int]) -> float:
    """Least-squares slope of ``values`` (bytes, one per request) in MiB per 100 requests."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, statistics.fmean(values)
    cov = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    var = sum((i - mean_x) ** 2 for i in range(n))
    return cov / var * 100 / MIB


async def serve_and_ask(
    store: Path, setting: str, plan: list[tuple[str, int]], args: argparse.Namespace, log: Path
) -> dict[str, Any]:
    """One service, the whole plan, one request at a time; per request its server TTFT and the
    service's resident set after it."""
    service = Service(store, log, ["--batch", "1", "--log-level", "warning"], env=SETTING_ENV[setting])
    try:
        url = await service.started()
        started_rss = proc_status(service.proc.pid)["VmRSS"]
        ttft, rss, anon = [], [], []
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            for question, top_k in plan:
                body = chat_body(question, max_tokens=1, top_k=top_k)
                response = await client.post("/v1/chat/completions", json=body, timeout=args.timeout)
                if response.status_code != 200:
                    raise SystemExit(f"error: {setting}: HTTP {response.status_code}: {response.text[:300]}")
                ttft.append(response.json()["ragcompress"]["ttft_s"])
                status = proc_status(service.proc.pid)
                rss.append(status["VmRSS"])
                anon.append(status["RssAnon"])
        peak = proc_status(service.proc.pid)["VmHWM"]
    finally:
        exit_code = await service.stop()
    if exit_code != 0:
        raise SystemExit(f"error: the {setting} service exited with {exit_code}: {log.read_text()[-2000:]}")
    return {
        "setting": setting,
        "rss_started": started_rss,
        "rss": rss,
        "rss_anon": anon,
        "ttft_s": ttft,
        "peak_rss": peak,
    }


def summarise(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    rss, half = run["rss"], len(run["rss"]) // 2
    return {
        "rss_started_mib": run["rss_started"] / MIB,
        "rss_after_warmup_mib": rss[warmup - 1] / MIB,
        "rss_end_mib": rss[-1] / MIB,
        "peak_rss_mib": run["peak_rss"] / MIB,
        "growth_second_half_mib_per_100": slope_mib_per_100(rss[half:]),
        "anon_growth_second_half_mib_per_100": slope_mib_per_100(run["rss_anon"][half:]),
        "ttft_median_s": statistics.median(run["ttft_s"][warmup:]),
    }


def paired_ratios(runs: list[dict[str, Any]], plan: list[tuple[str, int]], warmup: int) -> dict[str, Any]:
    """``on`` TTFT over ``off`` TTFT, request by request within each round; medians overall and by
    top-k band."""
    ratios: list[tuple[int, float]] = []
    by_round: dict[int, dict[str, list[float]]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["setting"]] = run["ttft_s"]
    for pair in by_round.values():
        for i in range(warmup, len(plan)):
            ratios.append((plan[i][1], pair["on"][i] / pair["off"][i]))
    out: dict[str, Any] = {"all": statistics.median(r for _, r in ratios), "requests": len(ratios)}
    for low, high in BANDS:
        band = [r for k, r in ratios if low <= k <= high]
        out[f"top{low}-{high}"] = statistics.median(band) if band else None
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    questions = question_texts(args.questions)
    plan = request_plan(questions, args.requests, args.max_top_k, args.seed)
    manifest = Manifest.read(args.store)
    load_at_start = os.getloadavg()[0]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ragcompress-serve-memory-") as scratch:
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for setting in order:
                started = time.perf_counter()
                run = await serve_and_ask(args.store, setting, plan, args, Path(scratch) / f"{setting}{r}.log")
                run.update(round=r, seconds=time.perf_counter() - started, load_after=os.getloadavg()[0])
                runs.append(run)
                print(
                    f"round {r} {setting}: rss end {run['rss'][-1] / MIB:.0f} MiB, peak {run['peak_rss'] / MIB:.0f}"
                    f" MiB, median ttft {statistics.median(run['ttft_s']) * 1000:.0f} ms ({run['seconds']:.0f} s)",
                    flush=True,
                )
    per_setting: dict[str, Any] = {}
    for setting in ("off", "on"):
        rows = [summarise(run, args.warmup) for run in runs if run["setting"] == setting]
        per_setting[setting] = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        per_setting[setting]["rounds"] = rows
    return {
        "meta": results_meta({"model": manifest.model_ref, "questions": str(args.questions)}),
        "store": str(args.store),
        "store_quant": manifest.compression.get("quant"),
        "requests": args.requests,
        "warmup": args.warmup,
        "max_top_k": args.max_top_k,
        "rounds": args.rounds,
        "seed": args.seed,
        "load_at_start": load_at_start,
        "load_at_end": os.getloadavg()[0],
        "settings": per_setting,
        "ttft_on_over_off": paired_ratios(runs, plan, args.warmup),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a store with at least --max-top-k passages")
    parser.add_argument("--questions", type=Path, default=SAMPLE_QUESTIONS, help="JSONL with a 'question' field")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="first requests left out of the TTFT medians")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-top-k", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.requests < 2 * args.warmup:
        parser.error("--requests must be at least twice --warmup")
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    summary = {k: report[k] for k in ("requests", "rounds", "ttft_on_over_off")}
    summary["settings"] = {s: {k: v for k, v in row.items() if k != "rounds"} for s, row in report["settings"].items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
