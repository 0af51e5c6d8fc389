"""Shared fixtures: the CPU speed guard first, then one cache of built models for all tests."""
from __future__ import annotations

from resgarden.platform import apply_cpu_speed_guard

apply_cpu_speed_guard()

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

import models  # noqa: E402


@pytest.fixture(scope="session")
def model_zoo():
    """name -> model with default arguments, built once per session (building costs ~1 s)."""
    cache: dict[str, ms.nn.Cell] = {}

    def get(name: str) -> ms.nn.Cell:
        if name not in cache:
            cache[name] = models.create_model(name)
        return cache[name]

    return get


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
