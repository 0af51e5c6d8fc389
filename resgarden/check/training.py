"""What a data-parallel training job relies on beyond single-model numerics, on a small model:
ranks that agree on overflow, dataset sink mode that trains like the step loop, and ranks that
hold the same weights after data-parallel steps."""
from __future__ import annotations

import numpy as np

from .report import Result, relative_error

MODEL, IMAGE_SIZE, BATCH, CLASSES = "resnet18", 32, 4, 10
SINK_STEPS, SINK_SIZE = 8, 4


def _train_cell(cluster, level: str = "O0", lr: float = 0.05, **scaling):
    """resnet18 with rank 0's initial weights on every rank (seeded: the same in every call), in a
    TrainStep with SGD; returns (model, train cell)."""
    import mindspore as ms
    from mindspore import nn

    import models
    from resgarden.runtime.distributed import broadcast_parameters
    from resgarden.training.amp import Float32Loss, apply_amp
    from resgarden.training.train_step import TrainStep

    ms.set_seed(7)
    model = models.create_model(MODEL, num_classes=CLASSES)
    broadcast_parameters(model, cluster)
    model = apply_amp(model, level)
    cell = TrainStep(nn.WithLossCell(model, Float32Loss(nn.CrossEntropyLoss())), nn.SGD(model.trainable_params(), lr),
                     **scaling)
    cell.set_train(True)
    return model, cell


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    return (rs.normal(0, 1, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32),
            rs.randint(0, CLASSES, BATCH).astype(np.int32))


def _weights(model) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().astype(np.float32) for p in model.trainable_params()}


def check_overflow(cluster, level: str) -> Result:
    """An infinite pixel in the last rank's batch: every rank must skip that step and halve its
    loss scale (1024 -> 512), then apply the next step alike."""
    import mindspore as ms

    from resgarden.runtime.distributed import ranks_out_of_sync

    model, cell = _train_cell(cluster, level, loss_scale=1024.0, dynamic_loss_scale=True)
    images, labels = _batch(1)
    poisoned = images.copy()
    if cluster.rank == cluster.size - 1:
        poisoned[0, 0, 0, 0] = np.inf
    cell(ms.Tensor(poisoned), ms.Tensor(labels))
    after_overflow = [float(cell.skipped_steps.asnumpy()), float(cell.loss_scale.asnumpy())]
    cell(ms.Tensor(images), ms.Tensor(labels))
    table = cluster.gather(after_overflow + [float(cell.skipped_steps.asnumpy()), float(cell.loss_scale.asnumpy())])
    differing = ranks_out_of_sync(model.trainable_params(), cluster)
    numbers = dict(skipped=sorted({int(v) for v in table[:, 0]}), scale=sorted({float(v) for v in table[:, 1]}))
    title = f"overflow on rank {cluster.size - 1} ({level})"
    if not np.all(table == [1, 512, 1, 512]):
        bad = [r for r in range(cluster.size) if not np.array_equal(table[r], [1, 512, 1, 512])]
        return Result(title, "fail", f"ranks {bad} did not skip the overflowed step alike (skipped steps, loss "
                                     f"scale per rank: {table.tolist()}): weights and loss scales drift apart",
                      numbers)
    if differing:
        return Result(title, "fail", f"ranks {differing} hold other weights than rank 0 after the step", numbers)
    return Result(title, "pass", "every rank skipped that step and halved its loss scale", numbers)


def check_sink(device_target: str, jit_level: str, cluster) -> Result:
    """8 steps in dataset sink mode (2 calls of 4) against 8 steps of the step loop, from the same
    weights on the same batches: the same weights, and 8 optimizer steps counted on the device."""
    title = f"dataset sink mode ({SINK_STEPS} steps)"
    from resgarden.training.steps import SINK_TARGETS, SinkSteps

    if device_target not in SINK_TARGETS:
        return Result(title, "skip", f"MindSpore runs dataset sink mode on GPU and Ascend only, not on {device_target}")
    import mindspore as ms
    import mindspore.dataset as ds

    batches = [_batch(100 + cluster.rank * SINK_STEPS + i) for i in range(SINK_STEPS)]
    model, cell = _train_cell(cluster)
    start = _weights(model)
    for images, labels in batches:
        cell(ms.Tensor(images), ms.Tensor(labels))
    looped = _weights(model)
    model, cell = _train_cell(cluster)
    dataset = ds.GeneratorDataset(batches, column_names=["image", "label"], shuffle=False)
    for _ in SinkSteps(cell, dataset, SINK_SIZE, jit_level).epoch(SINK_STEPS):
        pass
    sunk, counted = _weights(model), int(cell.optimizer.global_step.asnumpy().reshape(-1)[0])
    names = sorted(start)
    error = relative_error(np.concatenate([(sunk[n] - start[n]).ravel() for n in names]),
                           np.concatenate([(looped[n] - start[n]).ravel() for n in names]))
    numbers = {"weights err": error, "device steps": counted}
    if counted != SINK_STEPS:
        return Result(title, "fail", f"the device ran {counted} optimizer steps for {SINK_STEPS} sunk: the trainer "
                                     "would stop with a step-count error; train without --dataset_sink_mode",
                      numbers)
    if error > 1e-3:
        return Result(title, "fail", f"sunk steps train other weights than the step loop ({error:.3g} > 1e-3)", numbers)
    return Result(title, "pass", "sunk steps train the same weights as the step loop", numbers)


def check_in_sync(cluster) -> Result:
    """3 data-parallel steps on each rank's own batches: every rank holds rank 0's weights."""
    import mindspore as ms

    from resgarden.runtime.distributed import ranks_out_of_sync

    title = "ranks in sync after 3 data-parallel steps"
    if not cluster.distributed:
        return Result(title, "skip", "a single process (start the check with mpirun, msrun or srun to check this)")
    model, cell = _train_cell(cluster)
    for step in range(3):
        images, labels = _batch(200 + 3 * cluster.rank + step)
        cell(ms.Tensor(images), ms.Tensor(labels))
    differing = ranks_out_of_sync(model.trainable_params(), cluster)
    if differing:
        return Result(title, "fail", f"ranks {differing} hold other weights than rank 0: gradients are not averaged "
                                     "over the ranks", dict(ranks=cluster.size))
    return Result(title, "pass", f"all {cluster.size} ranks hold identical weights", dict(ranks=cluster.size))
