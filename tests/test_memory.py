"""``ragcompress.runtime.memory``: the ``ragcompress`` command keeps freed memory for the next
request, so a request's large buffers do not fault in fresh pages every time."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from ragcompress.cli import root as cli
from ragcompress.runtime import memory

# One "request": a 64 MiB buffer written whole and freed (past glibc's largest mmap threshold, so
# by default every such buffer is a fresh mapping); prints the minor page faults of eight requests
# after a first one, as a share of the buffer's pages (kept memory: the heap settles after one or
# two requests, the first freed block having been split by small allocations in between). The
# process imports the runtime first, as every command does before its first request: on the nearly
# empty heap of a bare ``import torch`` the first eight requests' blocks still land on new pages.
REQUEST = """
import resource, sys, torch
import ragcompress.runtime.engine
from ragcompress.runtime.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_one_request():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(16 << 20)
    buffer.fill_(1.0)
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_request()  # the first request maps its memory either way
print(sum(faults_of_one_request() for _ in range(8)) / 8 / (64 << 20 >> 12))
"""


def _faulted_share(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", REQUEST, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_spares_repeated_requests_their_page_faults():
    assert _faulted_share("default") > 0.9  # every request a fresh mapping, faulted in page by page
    assert _faulted_share("keep") < 0.3  # the freed pages, reused (measured: 1 request in 8 faults)


def test_the_command_keeps_freed_memory_and_the_variable_turns_it_off(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(sys, "argv", ["ragcompress", "--version"])
    with contextlib.suppress(SystemExit):
        cli.main()
    assert calls == [True]
    monkeypatch.setenv(memory.OPT_OUT, "0")
    assert memory.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_results_files_record_whether_the_setting_applied(monkeypatch):
    """TTFT moves with the setting, and the CLI applies it where the benchmark scripts do not:
    both kinds of results file say which it was."""
    from ragcompress.bench import bench_meta

    import common

    monkeypatch.delenv(memory.OPT_OUT, raising=False)  # a run with the setting turned off would skip it
    monkeypatch.setattr(memory, "_applied", False)
    assert bench_meta(1, 1, 1, "m")["keep_freed_memory"] is False
    assert common.results_meta({})["keep_freed_memory"] is False
    assert memory.keep_freed_memory() is True  # the process keeps it from here on, as the CLI does
    assert memory.freed_memory_kept() is True
    assert (
        bench_meta(1, 1, 1, "m")["keep_freed_memory"] is True and common.results_meta({})["keep_freed_memory"] is True
    )
