"""MindSpore's process context as every entry point sets it: mode, device, seed, compile level; and
the per-rank settings derived from the machine (data workers)."""
from __future__ import annotations

import dataclasses
import logging
import os

import mindspore as ms

import models
from models.pretrained import CACHE_ENV
from resgarden.base.errors import ConfigError
from resgarden.base.specs import ContextSpec, LoaderSpec
from resgarden.platform import default_data_workers
from resgarden.runtime.distributed import Cluster, nodes, place_device

logger = logging.getLogger("resgarden")
GRAPH_RECURSION_LIMIT = 4000


def set_context(spec: ContextSpec) -> None:
    """Execution mode, compile level, seed; the device of a single process (a data-parallel job's
    device is placed per rank by :func:`resgarden.runtime.distributed.init_cluster`)."""
    ms.set_context(mode=ms.GRAPH_MODE if spec.mode == 0 else ms.PYNATIVE_MODE)
    if spec.jit_level != "auto":  # else MindSpore's own default for the target
        ms.set_context(jit_config={"jit_level": spec.jit_level})
    if not spec.distribute:
        place_device(spec.device_target, spec.device_id)
    ms.set_seed(spec.seed)
    # graph compilation of a 100-layer net's optimizer over grouped parameters nests deeper than
    # MindSpore's default limit of 1000 calls (res2net101 reaches it)
    ms.set_recursion_limit(GRAPH_RECURSION_LIMIT)
    if spec.weights_cache:
        os.environ[CACHE_ENV] = spec.weights_cache


def with_data_workers(loader: LoaderSpec, cluster: Cluster) -> LoaderSpec:
    """``loader`` with its worker count decided when not given: this rank's share of its node's
    CPUs, and where its workers run (a collective in a data-parallel job; rank 0 logs each node)."""
    if loader.workers is not None:
        return loader
    groups = nodes(cluster)
    mine = next(group for group in groups if cluster.rank in group)
    plan = default_data_workers(len(mine), launched=cluster.distributed)
    counts = cluster.gather([plan.workers])[:, 0].astype(int)
    for group in groups:
        low, high = min(counts[group]), max(counts[group])
        who = "" if not cluster.distributed else f"node of rank{'s' if len(group) > 1 else ''} {_ranks(group)}: "
        why = plan.reason if cluster.rank in group else f"{len(group)} rank(s) on it"
        logger.info("data loading: %s%s worker process(es) per rank (%s; --num_parallel_workers sets it)", who,
                    low if low == high else f"{low}-{high}", why)
    return dataclasses.replace(loader, workers=plan.workers, worker_cpus=plan.cpus)


def _ranks(group: list[int]) -> str:
    """``0-7`` for consecutive ranks, else ``0,2,4``."""
    if group == list(range(group[0], group[-1] + 1)) and len(group) > 1:
        return f"{group[0]}-{group[-1]}"
    return ",".join(map(str, group))


def check_model(name: str) -> None:
    """``name`` must be registered; else a ConfigError naming the closest models."""
    try:
        models.check_model_name(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
