"""Shared fixtures: the CPU speed guard first, each test's data workers and compiled graphs released
when it ends, and the execution modes."""
from __future__ import annotations

import ctypes
import gc
import os

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

from resgarden.data import batches  # noqa: E402

try:
    _LIBC = ctypes.CDLL("libc.so.6")  # glibc: malloc_trim
except OSError:
    _LIBC = None


def _resident_mb() -> str:
    with open("/proc/self/status", encoding="ascii") as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return " ".join(f"{k} {int(fields[k].split()[0]) // 1024} MB" for k in ("VmRSS", "VmHWM"))


@pytest.fixture(autouse=True)
def release_memory(request):
    """After each test its data workers, compiled graphs and their memory go, and the freed heap
    goes back to the system: one pytest process would otherwise keep every graph the suite compiled
    (21 GB at the peak) and every data-worker pool it forked (each started test sees fresh workers).
    RESGARDEN_TEST_MEMORY_LOG=FILE appends each test's resident memory before and after."""
    yield
    log = os.environ.get("RESGARDEN_TEST_MEMORY_LOG")
    before = _resident_mb() if log else ""
    batches.shutdown_workers()  # forked from this process, a kept pool would hold its memory of then
    gc.collect()  # cells in reference cycles: their compiled graphs go with them
    ms.ms_memory_recycle()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # hand the freed heap back to the system (glibc keeps it otherwise)
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{request.node.nodeid}: {before} -> {_resident_mb()}\n")


@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def exec_mode(request):
    """Run the test once in graph mode and once in PyNative mode."""
    previous = ms.get_context("mode")
    ms.set_context(mode=request.param)
    yield request.param
    ms.set_context(mode=previous)


@pytest.fixture
def graph_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


@pytest.fixture
def pynative_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=previous)
