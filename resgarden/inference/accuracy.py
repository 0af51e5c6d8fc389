"""Top-1 / top-5 accuracy and mean cross-entropy of a model over a data split."""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from mindspore import nn

from resgarden.base.specs import LoaderSpec
from resgarden.data.batches import batches
from resgarden.data.datasets import Split, make_loader
from resgarden.data.real_labels import real_hits
from resgarden.runtime.distributed import Cluster


def accumulate(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int, float]:
    """(top-1 hits, top-5 hits, summed cross-entropy) of one batch of logits."""
    top5 = np.argsort(-logits, axis=1)[:, :5]
    hits1 = int((top5[:, 0] == labels).sum())
    hits5 = int((top5 == labels[:, None]).any(axis=1).sum())
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return hits1, hits5, float(-log_probs[np.arange(len(labels)), labels].sum())


def evaluate(model: nn.Cell, split: Split, loader: LoaderSpec, cluster: Cluster | None = None,
             real_labels: Sequence[tuple[int, ...]] | None = None) -> dict[str, float]:
    """Score ``model`` on ``split`` with ``loader``'s eval transform; restores the model's train flag.
    In a data-parallel job each rank scores its shard and the counts are summed over ranks.
    ``real_labels`` (one label set per image of ``split``, :mod:`resgarden.data.real_labels`) adds the
    ReaL top-1 / top-5 over the images that have labels there."""
    cluster = cluster or Cluster()
    was_training = model.training
    model.set_train(False)
    dataset, source = make_loader(split, loader, training=False, shard=cluster.shard)
    hits1 = hits5 = count = real_count = real1 = real5 = 0
    loss_sum = 0.0
    start = time.perf_counter()
    try:
        for images, labels in batches(dataset, source):
            logits = model(images).asnumpy().astype(np.float64)
            y = labels.asnumpy()
            h1, h5, loss = accumulate(logits, y)
            if real_labels is not None:  # the batch holds the next len(y) samples of this rank's order
                samples = source.order[count:count + len(y)]
                top5 = np.argsort(-logits, axis=1)[:, :5]
                n, r1, r5 = real_hits(top5, [real_labels[int(i)] for i in samples])
                real_count, real1, real5 = real_count + n, real1 + r1, real5 + r5
            hits1, hits5, loss_sum, count = hits1 + h1, hits5 + h5, loss_sum + loss, count + len(y)
    finally:
        model.set_train(was_training)
    seconds = time.perf_counter() - start
    hits1, hits5, loss_sum, count, unreadable, real_count, real1, real5 = cluster.all_reduce_sum(
        [hits1, hits5, loss_sum, count, len(source.bad_files), real_count, real1, real5])
    result = dict(top1=100.0 * hits1 / max(count, 1), top5=100.0 * hits5 / max(count, 1),
                  loss=loss_sum / max(count, 1), count=int(count), img_s=count / max(seconds, 1e-9),
                  unreadable=int(unreadable))
    if real_labels is not None:
        result.update(real_top1=100.0 * real1 / max(real_count, 1), real_top5=100.0 * real5 / max(real_count, 1),
                      real_count=int(real_count))
    return result
