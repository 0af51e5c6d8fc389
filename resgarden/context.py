"""MindSpore's process context as every entry point sets it: mode, device, seed, compile level."""
from __future__ import annotations

import logging
import os

import mindspore as ms

import models
from config import ConfigError
from models.pretrained import CACHE_ENV

from .distributed import Cluster, place_device
from .platform import default_data_workers, select_device_target

logger = logging.getLogger("resgarden")
GRAPH_RECURSION_LIMIT = 4000


def set_context(cfg) -> None:
    """Execution mode, compile level, seed; the device of a single process (``cfg.device_target``
    resolved in place: ``auto`` becomes what this MindSpore runs on). A data-parallel job's device
    is placed per rank by :func:`resgarden.distributed.init_cluster`."""
    cfg.device_target = select_device_target(cfg.device_target)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == 0 else ms.PYNATIVE_MODE)
    jit_level = getattr(cfg, "jit_level", "auto")
    if jit_level != "auto":  # else MindSpore's own default for the target
        ms.set_context(jit_config={"jit_level": jit_level})
    if not cfg.distribute:
        place_device(cfg.device_target, getattr(cfg, "device_id", None))
    ms.set_seed(cfg.seed)
    # graph compilation of a 100-layer net's optimizer over grouped parameters nests deeper than
    # MindSpore's default limit of 1000 calls (res2net101 reaches it)
    ms.set_recursion_limit(GRAPH_RECURSION_LIMIT)
    if cfg.weights_cache:
        os.environ[CACHE_ENV] = cfg.weights_cache


def set_data_workers(cfg, cluster: Cluster) -> None:
    """``--num_parallel_workers`` when not given: this rank's share of its node's CPUs; logged."""
    if cfg.num_parallel_workers is None:
        cfg.num_parallel_workers, why = default_data_workers(cluster.local_size)
        logger.info("data loading: %d worker process(es) (%s; --num_parallel_workers sets it)",
                    cfg.num_parallel_workers, why)


def check_model(cfg) -> None:
    """``cfg.model`` must be registered; else a ConfigError naming the closest models."""
    try:
        models.check_model_name(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
