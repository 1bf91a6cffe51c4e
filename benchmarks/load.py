"""Load test of ``ragcompress serve``: N concurrent clients for D seconds, faults meanwhile.

    # against a running service
    ragcompress serve --store runs/store --queue 64 &
    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 32 --duration 120 --out load.json

    # or let the benchmark start the services itself (on a copy of the store), compare batching
    # on and off, and SIGTERM the service with requests in flight at the end
    python benchmarks/load.py --serve-store runs/store --clients 32 --duration 120 \
        --compare-rounds 3 --index-input more.jsonl --out docs/results/serve_load.json

Phases: one client alone for ``--single-duration`` seconds (the baseline), then ``--clients``
clients for ``--duration`` seconds, each asking the bundled sample questions in a loop (a share
``--stream-share`` streamed), while a fuzzing client sends malformed bodies (bad JSON, wrong
types, invalid UTF-8, lone surrogates, oversized bodies, out-of-range values) and, with
``--index-input``, ``ragcompress index`` adds passages to the served store; afterwards every
newly indexed passage is asked for by id (and looked up by its own text through /v1/retrieve).

With ``--serve-store`` the benchmark copies the store to a scratch directory and starts
``ragcompress serve`` on it in a subprocess. ``--compare-rounds R`` first measures throughput
with 1 and ``--compare-clients`` clients against two services side by side, one with
``--batch 1`` (unbatched) and one with ``--batch`` (batched), alternating between them R times so
that contention from other processes falls on both; medians over the rounds. After the main run,
``--sigterm-requests`` requests are sent and the service gets SIGTERM while they are in flight:
each must finish and the process must exit with status 0.

Checks (exit 1 when one fails): no failed request (a valid request answered other than 200,
429 counted apart), no lost request (connection error, timeout, a stream without its final chunk
and ``[DONE]``), no fuzzed body answered 5xx or dropped, ``/health`` answers after the run, every
indexed passage answers, and (with ``--serve-store``) every in-flight request finished after
SIGTERM and the exit status was 0. Reports p50/p99 TTFT (client side: first content chunk of a
streamed answer; server side: the response's ``ragcompress.ttft_s``), latency, queue wait and
throughput against the single client. Prints one JSON object; the load average before and after
is recorded (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ragcompress.data import SAMPLE_QUESTIONS
from ragcompress.provenance import git_revision
from ragcompress.store.manifest import Manifest

from common import Service, chat_body, question_texts

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    kind: str  # ok | failed | rejected | lost
    latency_s: float
    status: int | None = None
    ttft_client_s: float | None = None
    ttft_server_s: float | None = None
    queue_s: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.error:
            key = f"{outcome.kind}: {outcome.error}"[:200]
            self.errors[key] = self.errors.get(key, 0) + 1

    def summary(self, seconds: float) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.kind == "ok"]
        count = {kind: sum(o.kind == kind for o in self.outcomes) for kind in ("ok", "failed", "rejected", "lost")}
        return {
            "seconds": seconds,
            "requests": len(self.outcomes),
            **count,
            "throughput_rps": len(ok) / seconds if seconds else 0.0,
            "tokens_per_s": sum(o.tokens for o in ok) / seconds if seconds else 0.0,
            "ttft_client_s": spread([o.ttft_client_s for o in ok if o.ttft_client_s is not None]),
            "ttft_server_s": spread([o.ttft_server_s for o in ok if o.ttft_server_s is not None]),
            # the server's TTFT of the streamed answers alone: the requests the client-side TTFT covers
            "ttft_server_streamed_s": spread(
                [o.ttft_server_s for o in ok if o.ttft_client_s is not None and o.ttft_server_s is not None]
            ),
            "queue_s": spread([o.queue_s for o in ok if o.queue_s is not None]),
            "latency_s": spread([o.latency_s for o in ok]),
            "errors": dict(sorted(self.errors.items(), key=lambda item: -item[1])[:20]),
        }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


async def ask(client: httpx.AsyncClient, body: dict[str, Any], timeout: float) -> Outcome:
    """One chat completion, checked to the end (a stream must close with its final chunk and [DONE])."""
    start = time.perf_counter()
    try:
        if not body.get("stream"):
            response = await client.post("/v1/chat/completions", json=body, timeout=timeout)
            latency = time.perf_counter() - start
            if response.status_code != 200:
                return _refused(response.status_code, response.text, latency)
            data = response.json()
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                return Outcome("lost", latency, 200, error="a response without content")
            info = data.get("ragcompress", {})
            return Outcome(
                "ok",
                latency,
                200,
                ttft_server_s=info.get("ttft_s"),
                queue_s=info.get("queue_s"),
                tokens=data.get("usage", {}).get("completion_tokens", 0),
            )
        # the usage chunk gives the tokens generated (content chunks are text pieces, not tokens)
        body = {**body, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return _refused(response.status_code, text, time.perf_counter() - start)
            first = None
            final_info: dict[str, Any] | None = None
            done = False
            tokens = None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    return Outcome("failed", time.perf_counter() - start, 200, error=f"stream error {chunk['error']}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") and first is None:
                        first = time.perf_counter() - start
                    if choice.get("finish_reason"):
                        final_info = chunk.get("ragcompress")
            latency = time.perf_counter() - start
            if not done or final_info is None or tokens is None:
                return Outcome(
                    "lost", latency, 200, error="a stream that ended without its final chunk, usage and [DONE]"
                )
            return Outcome(
                "ok",
                latency,
                200,
                ttft_client_s=first,
                ttft_server_s=final_info.get("ttft_s"),
                queue_s=final_info.get("queue_s"),
                tokens=tokens,
            )
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        return Outcome("lost", time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"[:200])


def _refused(status: int, text: str, latency: float) -> Outcome:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:120]
    return Outcome("rejected" if status == 429 else "failed", latency, status, error=f"{status} {message}"[:200])


async def client_loop(
    client: httpx.AsyncClient, args: argparse.Namespace, questions: list[str], seed: int, until: float, tally: Tally
) -> None:
    rng = random.Random(seed)
    i = seed
    while time.perf_counter() < until:
        question = questions[i % len(questions)]
        i += 1
        outcome = await ask(
            client, chat_body(question, args.max_tokens, rng.random() < args.stream_share), args.timeout
        )
        tally.add(outcome)
        if outcome.kind == "rejected":
            await asyncio.sleep(1.0)


async def run_clients(
    client: httpx.AsyncClient, args: argparse.Namespace, questions: list[str], clients: int, seconds: float
) -> dict[str, Any]:
    tally = Tally()
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(client_loop(client, args, questions, n, until, tally) for n in range(clients)))
    return tally.summary(time.perf_counter() - start)


# -- fuzzing ----------------------------------------------------------------------------------------


def fuzz_bodies(rng: random.Random, max_body: int) -> tuple[str, bytes]:
    """One malformed (or odd but valid) request: the endpoint and the raw body."""
    choice = rng.randrange(12)
    endpoint = "/v1/retrieve" if rng.random() < 0.15 else "/v1/chat/completions"
    if choice == 0:
        return endpoint, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
    if choice == 1:
        valid = json.dumps(chat_body("Who won the game?", 2, False))
        return endpoint, valid[: rng.randrange(len(valid))].encode()
    if choice == 2:
        return endpoint, b"\xff\xfe" + b'{"messages": []}'
    if choice == 3:
        return endpoint, b'{"messages": [{"role": "user", "content": "\\ud800\\udfff\\ud800"}]}'
    if choice == 4:
        return endpoint, b"x" * (max_body + 1 + rng.randrange(1000))
    if choice == 5:
        wrong = rng.choice([5, "x", None, True, [1, 2], {"a": 1}, -1, 10**12, 1.5])
        field_name = rng.choice(["messages", "max_tokens", "stream", "n", "model", "ragcompress", "stream_options"])
        return endpoint, json.dumps({**chat_body("Who?", 2, False), field_name: wrong}).encode()
    if choice == 6:
        return endpoint, json.dumps(
            {"messages": [{"role": "user", "content": rng.choice([7, [], [{}], None])}]}
        ).encode()
    if choice == 7:
        rag = rng.choice(
            [{"top_k": 0}, {"top_k": 10**6}, {"passage_ids": []}, {"passage_ids": ["../../etc/passwd"]}, {"x": 1}]
        )
        return endpoint, json.dumps({**chat_body("Who?", 2, False), "ragcompress": rag}).encode()
    if choice == 8:
        return endpoint, json.dumps(chat_body("q" * 100_000, 2, False)).encode()
    if choice == 9:  # odd but valid: random Unicode (control characters, emoji, RTL) as the question
        text = "".join(
            chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD7FF), 0x1F600, 0x202E, 0]))
            for _ in range(rng.randrange(1, 80))
        )
        return endpoint, json.dumps(chat_body(text, 2, rng.random() < 0.5), ensure_ascii=rng.random() < 0.5).encode()
    if choice == 10:
        return endpoint, json.dumps([chat_body("Who?", 2, False)]).encode()
    return endpoint, json.dumps({"messages": [{"role": "system", "content": "no user here"}]}).encode()


async def fuzz_loop(client: httpx.AsyncClient, args: argparse.Namespace, until: float) -> dict[str, Any]:
    rng = random.Random(args.seed)
    statuses: dict[str, int] = {}
    server_errors = lost = 0
    examples: list[str] = []
    while time.perf_counter() < until:
        endpoint, body = fuzz_bodies(rng, args.max_body)
        try:
            response = await client.post(
                endpoint, content=body, headers={"Content-Type": "application/json"}, timeout=args.timeout
            )
            await response.aread()
            status = response.status_code
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status >= 500:
                server_errors += 1
                examples.append(f"{status} for {body[:80]!r}")
            elif status >= 400:
                json.loads(response.content)["error"]["message"]  # every refusal is an error object
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            lost += 1
            examples.append(f"{type(exc).__name__} for {body[:80]!r}")
        await asyncio.sleep(args.fuzz_interval)
    return {
        "requests": sum(statuses.values()) + lost,
        "statuses": statuses,
        "5xx": server_errors,
        "lost": lost,
        "examples": examples[:10],
    }


# -- indexing into the served store meanwhile -------------------------------------------------------


async def index_run(args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "ragcompress.cli",
        "index",
        "--input",
        str(args.index_input),
        "--store",
        str(args.store),
        "--json",
        *shlex.split(args.index_args),
    ]
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    return {
        "command": " ".join(command[2:]),
        "exit": proc.returncode,
        "seconds": time.perf_counter() - start,
        "report": json.loads(out) if proc.returncode == 0 and out.strip() else None,
        "stderr": err.decode(errors="replace")[-500:] if proc.returncode else "",
    }


async def ask_indexed(client: httpx.AsyncClient, args: argparse.Namespace) -> dict[str, Any]:
    """Every passage of ``--index-input`` asked for by id, and looked up by its own text."""
    records = [json.loads(line) for line in Path(args.index_input).read_text().splitlines() if line.strip()]
    answered = retrieved = 0
    for record in records:
        outcome = await ask(client, chat_body("What is this passage about?", 2, False, [record["id"]]), args.timeout)
        answered += outcome.kind == "ok"
        response = await client.post(
            "/v1/retrieve", json={"query": record["text"][:500], "top_k": 3}, timeout=args.timeout
        )
        retrieved += response.status_code == 200 and record["id"] in [hit["id"] for hit in response.json()["data"]]
    return {"passages": len(records), "answerable": answered, "retrieved_top3_by_own_text": retrieved}


# -- services started by the benchmark --------------------------------------------------------------


def start_service(store: Path, batch: int, args: argparse.Namespace, log: Path) -> Service:
    """The service with this run's batch, queue and answer length."""
    options = ["--batch", str(batch), "--queue", str(args.queue), "--log-level", "warning"]
    if args.max_tokens > 32:
        options += ["--max-new-tokens", str(args.max_tokens)]
    return Service(store, log, options)


def server_threads() -> int:
    """torch's thread count in this environment: what a started service computes with."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def client_for(url: str, args: argparse.Namespace, clients: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    return httpx.AsyncClient(base_url=url, headers=headers, limits=limits, trust_env=False)


async def warm(client: httpx.AsyncClient, args: argparse.Namespace, questions: list[str]) -> None:
    (await client.get("/health", timeout=10)).raise_for_status()
    first = await ask(client, chat_body(questions[0], args.max_tokens, False), args.timeout)
    if first.kind != "ok":
        raise SystemExit(f"error: the first request failed: {first.error}")


async def compare_batching(args: argparse.Namespace, questions: list[str], store: Path, scratch: Path) -> dict:
    """Throughput with 1 and ``--compare-clients`` clients, unbatched (``--batch 1``) and batched
    (``--batch``), two services measured in alternation for ``--compare-rounds`` rounds."""
    services = {b: start_service(store, b, args, scratch / f"serve-batch{b}.log") for b in (1, args.batch)}
    rounds: list[dict[str, Any]] = []
    try:
        for service in services.values():
            await service.started()
        async with contextlib.AsyncExitStack() as stack:
            clients = {
                b: await stack.enter_async_context(client_for(service.url, args, args.compare_clients))
                for b, service in services.items()
            }
            for client in clients.values():
                await warm(client, args, questions)
            for r in range(args.compare_rounds):
                row: dict[str, Any] = {"round": r, "load_before": os.getloadavg()}
                # which service goes first alternates by round, so a drift of the machine falls on both
                order = list(clients.items()) if r % 2 == 0 else list(reversed(clients.items()))
                row["order"] = [b for b, _ in order]
                for b, client in order:
                    for n in (1, args.compare_clients):
                        summary = await run_clients(client, args, questions, n, args.compare_seconds)
                        row[f"batch{b}_clients{n}"] = summary
                rounds.append(row)
    finally:
        exits = {b: await service.stop() for b, service in services.items()}

    def median(key: str, field_name: str) -> float:
        return statistics.median(row[key][field_name] for row in rounds)

    configs: dict[str, Any] = {}
    for b in services:
        for n in (1, args.compare_clients):
            key = f"batch{b}_clients{n}"
            configs[key] = {
                "batch": b,
                "clients": n,
                "throughput_rps": median(key, "throughput_rps"),
                "tokens_per_s": median(key, "tokens_per_s"),
                "latency_p50_s": statistics.median(row[key]["latency_s"]["p50"] for row in rounds),
                "failed": sum(row[key]["failed"] + row[key]["lost"] for row in rounds),
            }
    n = args.compare_clients
    return {
        "seconds_per_phase": args.compare_seconds,
        "rounds": rounds,
        "median": configs,
        "speedup_batched": configs[f"batch{args.batch}_clients{n}"]["throughput_rps"]
        / configs[f"batch{args.batch}_clients1"]["throughput_rps"],
        "speedup_unbatched": configs[f"batch1_clients{n}"]["throughput_rps"]
        / configs["batch1_clients1"]["throughput_rps"],
        "batched_vs_unbatched": configs[f"batch{args.batch}_clients{n}"]["throughput_rps"]
        / configs[f"batch1_clients{n}"]["throughput_rps"],
        "exit_codes": exits,
    }


async def sigterm_in_flight(
    client: httpx.AsyncClient, service: Service, args: argparse.Namespace, questions: list[str]
) -> dict[str, Any]:
    """``--sigterm-requests`` requests (half streamed) in flight, then SIGTERM: each must finish,
    the process must exit 0."""
    bodies = [
        chat_body(questions[i % len(questions)], args.max_tokens, i % 2 == 0) for i in range(args.sigterm_requests)
    ]
    # The signal lands once every request is inside the service: some being generated, the rest
    # queued behind them.
    tasks = [asyncio.create_task(ask(client, body, args.timeout)) for body in bodies]
    health: dict[str, Any] = {}
    while not any(task.done() for task in tasks):
        health = (await client.get("/health", timeout=10)).json()["queue"]
        if health["running"] and health["running"] + health["waiting"] >= len(bodies):
            break
        await asyncio.sleep(0.02)
    finished_before = sum(task.done() for task in tasks)
    signalled = time.perf_counter()
    exit_code = await service.stop()
    outcomes = await asyncio.gather(*tasks)
    return {
        "requests": len(bodies),
        "finished_before_signal": finished_before,
        "queue_at_signal": health,
        "ok": sum(o.kind == "ok" for o in outcomes),
        "outcomes": {kind: sum(o.kind == kind for o in outcomes) for kind in ("ok", "failed", "rejected", "lost")},
        "errors": [o.error for o in outcomes if o.error][:5],
        "exit_code": exit_code,
        "seconds_to_exit": time.perf_counter() - signalled,
    }


# -- the run ----------------------------------------------------------------------------------------


async def load_run(
    client: httpx.AsyncClient, args: argparse.Namespace, questions: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one-client baseline, then the concurrent phase with fuzzing and indexing meanwhile."""
    await warm(client, args, questions)
    models = (await client.get("/v1/models", timeout=10)).json()
    single = await run_clients(client, args, questions, 1, args.single_duration)
    start = time.perf_counter()
    until = start + args.duration
    tasks: dict[str, Any] = {"load": run_clients(client, args, questions, args.clients, args.duration)}
    if args.fuzz_interval > 0:
        tasks["fuzz"] = fuzz_loop(client, args, until)
    if args.index_input:
        tasks["index"] = index_run(args)
    results = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
    if "index" in results:
        results["index"].update(await ask_indexed(client, args))
    after = await client.get("/health", timeout=30)
    metrics = (await client.get("/metrics", timeout=30)).text
    results.update(
        single=single,
        healthy_after=after.status_code == 200,
        model=[m["id"] for m in models.get("data", [])],
        server_metrics={
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith(
                (
                    "ragcompress_requests_total",
                    "ragcompress_bytes_read_total",
                    "ragcompress_ttft_seconds_count",
                    "ragcompress_batch_size_sum",
                    "ragcompress_batch_size_count",
                )
            )
        },
    )
    return results, models


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    questions = question_texts(args.questions)
    load_before = os.getloadavg()
    revision = git_revision()  # at the start: the code that runs
    comparison = sigterm = None
    scratch_dir = None
    model_ref = threads = None
    if args.serve_store:
        model_ref = Manifest.read(Path(args.serve_store)).model_ref
        threads = server_threads()
        scratch_dir = tempfile.TemporaryDirectory(prefix="ragcompress-load-")
        scratch = Path(scratch_dir.name)
        store = scratch / "store"
        shutil.copytree(args.serve_store, store, ignore=shutil.ignore_patterns("lock", "*-shm", "*-wal"))
        args.store = store
        if args.compare_rounds:
            comparison = await compare_batching(args, questions, store, scratch)
        service = start_service(store, args.batch, args, scratch / "serve-main.log")
        args.url = await service.started()
    try:
        async with client_for(args.url, args, args.clients) as client:
            results, models = await load_run(client, args, questions)
            if args.serve_store:
                sigterm = await sigterm_in_flight(client, service, args, questions)
    finally:
        if args.serve_store and service.proc.poll() is None:
            await service.stop()
        if scratch_dir is not None:
            scratch_dir.cleanup()

    single, load = results["single"], results["load"]
    checks = {
        "no_failed_requests": load["failed"] == 0 and single["failed"] == 0,
        "no_lost_requests": load["lost"] == 0 and single["lost"] == 0,
        "fuzz_never_5xx_or_dropped": "fuzz" not in results
        or (results["fuzz"]["5xx"] == 0 and results["fuzz"]["lost"] == 0),
        "healthy_after": results["healthy_after"],
        "indexed_passages_answer": "index" not in results
        or (results["index"]["exit"] == 0 and results["index"]["answerable"] == results["index"]["passages"]),
    }
    if sigterm is not None:
        checks["sigterm_in_flight_finish_exit_0"] = sigterm["ok"] == sigterm["requests"] and sigterm["exit_code"] == 0
    if comparison is not None:
        checks["comparison_no_failed_or_lost"] = all(c["failed"] == 0 for c in comparison["median"].values())
        checks["comparison_services_exit_0"] = all(code == 0 for code in comparison["exit_codes"].values())
    return {
        "meta": {
            "url": args.url if not args.serve_store else "started by the benchmark",
            "store": str(args.serve_store) if args.serve_store else None,
            "model": model_ref,
            "served_model_ids": results["model"],
            "clients": args.clients,
            "duration_s": args.duration,
            "single_duration_s": args.single_duration,
            "max_tokens": args.max_tokens,
            "stream_share": args.stream_share,
            "questions": str(Path(args.questions).resolve().relative_to(ROOT))
            if Path(args.questions).resolve().is_relative_to(ROOT)
            else str(args.questions),
            "batch": args.batch if args.serve_store else None,
            "repeats": args.compare_rounds or None,  # rounds of the batching comparison
            "limit": len(questions),  # questions asked (in a loop)
            "threads": threads,
            "git": revision,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "batching_comparison": comparison,
        "single_client": single,
        "load": load,
        "throughput_vs_single": load["throughput_rps"] / single["throughput_rps"] if single["throughput_rps"] else None,
        "fuzz": results.get("fuzz"),
        "index": results.get("index"),
        "sigterm": sigterm,
        "server_metrics": results["server_metrics"],
        "checks": checks,
        "ok": all(checks.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running service (loopback only)")
    parser.add_argument(
        "--serve-store", type=Path, default=None, help="start `ragcompress serve` on a copy of this store instead"
    )
    parser.add_argument("--batch", type=int, default=8, help="the started service's --batch")
    parser.add_argument("--queue", type=int, default=64, help="the started service's --queue")
    parser.add_argument(
        "--compare-rounds", type=int, default=0, help="rounds of the batching comparison (needs --serve-store)"
    )
    parser.add_argument("--compare-clients", type=int, default=8, help="concurrent clients of the comparison")
    parser.add_argument("--compare-seconds", type=float, default=20.0, help="seconds of each comparison phase")
    parser.add_argument(
        "--sigterm-requests", type=int, default=16, help="requests in flight when the started service gets SIGTERM"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of the concurrent phase")
    parser.add_argument(
        "--single-duration",
        type=float,
        default=None,
        help="seconds of the one-client baseline (default: an eighth of --duration, at least 5)",
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of requests streamed")
    parser.add_argument("--questions", type=Path, default=SAMPLE_QUESTIONS, help="JSONL with a 'question' field")
    parser.add_argument(
        "--fuzz-interval", type=float, default=0.1, help="seconds between fuzzed bodies (0: no fuzzing)"
    )
    parser.add_argument("--max-body", type=int, default=1 << 20, help="the server's body limit (oversized fuzz bodies)")
    parser.add_argument("--index-input", type=Path, default=None, help="passages to index into --store during the run")
    parser.add_argument("--store", type=Path, default=None, help="the served store (with --index-input and --url)")
    parser.add_argument(
        "--index-args", default="", help="more `ragcompress index` options, e.g. '--model M --quant int8'"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.serve_store and args.api_key:
        parser.error("--api-key is for --url; a started service has no key")
    if args.compare_rounds and not args.serve_store:
        parser.error("--compare-rounds needs --serve-store (the benchmark starts both services)")
    if args.index_input and not (args.store or args.serve_store):
        parser.error("--index-input needs --store (the store the server serves) or --serve-store")
    if httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be a loopback address: this load test only targets this machine")
    if args.single_duration is None:
        args.single_duration = max(5.0, args.duration / 8)
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    if not report["ok"]:
        failed = [name for name, passed in report["checks"].items() if not passed]
        print(f"error: load test failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
