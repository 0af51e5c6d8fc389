"""Throughput of one (framework, model, task, mode) in its own process, served step by step.

Each side runs in its own subprocess so that compile caches, allocator pools and peak memory of
one cannot leak into the next, and MindSpore and PyTorch never share a process. The process
compiles and warms up once, then times as many rounds of steps as its parent asks for over a
line protocol on stdin/stdout, so that the parent can interleave the two frameworks' rounds:
on a machine whose speed drifts (a shared VM), adjacent rounds see the same conditions.

    parent -> worker: "RUN <steps>" (time that many steps) | "END"
    worker -> parent: "READY <json: first_call_s, note[, timm: the same model's timm name]>" | "TIME <seconds>" | "RESULT <json: peak_rss_mb>"
"""
from __future__ import annotations

import json
import resource
import sys
import time
from typing import Callable, TextIO

Step = Callable[[], None]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mindspore_step(model_name: str, task: str, mode: str, batch: int, size: int) -> tuple[Step, str]:
    """One training step (Momentum) or one inference call of our model, and a note on the build."""
    from resgarden.platform import apply_cpu_speed_guard

    guard = apply_cpu_speed_guard()
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    import models

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    net = models.create_model(model_name)
    rng = np.random.RandomState(0)
    images = ms.Tensor(rng.randn(batch, 3, size, size).astype(np.float32))
    if task == "infer":
        net.set_train(False)  # the plain Cell, as a user's script has it (no folding step)

        def step() -> None:
            net(images).asnumpy()
    else:
        labels = ms.Tensor(rng.randint(0, 1000, batch).astype(np.int32))
        loss = nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))
        train = nn.TrainOneStepCell(loss, nn.Momentum(net.trainable_params(), 0.01, 0.9))
        train.set_train(True)

        def step() -> None:
            train(images, labels).asnumpy()
    return step, guard


def timm_step(model_name: str, task: str, mode: str, batch: int, size: int) -> tuple[Step, str]:
    """timm's model ``model_name`` (the parent names it from our model's card), eager PyTorch: one
    SGD-momentum step or one inference call."""
    import timm
    import torch

    net = timm.create_model(model_name)
    images = torch.randn(batch, 3, size, size)
    if task == "infer":
        net.eval()

        def step() -> None:
            with torch.inference_mode():
                net(images)
    else:
        net.train()
        labels = torch.randint(0, 1000, (batch,))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        criterion = torch.nn.CrossEntropyLoss()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(net(images), labels).backward()
            optimizer.step()
    note = (f"torch {torch.__version__} eager, timm {timm.__version__} {model_name}, "
            f"{torch.get_num_threads()} threads")
    return step, note


def serve(framework: str, model_name: str, task: str, mode: str, batch: int, size: int,
          commands: TextIO = sys.stdin, replies: TextIO = sys.stdout) -> None:
    """Build the step, time the first call (compile + one step) and one warm-up, then serve rounds."""
    build = mindspore_step if framework == "mindspore" else timm_step
    step, note = build(model_name, task, mode, batch, size)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    ready = dict(first_call_s=first, note=note)
    if framework == "mindspore":  # the same architecture's name in timm, from the model's card
        import models

        ready["timm"] = models.model_card(model_name).timm
    print("READY " + json.dumps(ready), file=replies, flush=True)
    for line in commands:
        word, *rest = line.split()
        if word == "END":
            break
        start = time.perf_counter()
        for _ in range(int(rest[0])):
            step()
        print(f"TIME {time.perf_counter() - start:.6f}", file=replies, flush=True)
    print("RESULT " + json.dumps(dict(peak_rss_mb=_peak_rss_mb())), file=replies, flush=True)
