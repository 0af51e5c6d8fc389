"""A few data-parallel training steps of a tiny BN-free net, for tests/test_distributed.py.

Every step takes the same global batch of 8 samples; with ``--distribute`` each rank trains on its
shard of it (``shard_order``), otherwise one process trains on all 8. Each process writes its final
weights and per-step losses to ``<out>/rank<r>.npz``. BN is left out on purpose: BN normalises with
per-rank batch statistics, so only a BN-free net can equal the single-process run exactly.

``--overflow_rank R`` makes rank R's overflow check report an overflow at every step (as a 910A's
float status would for saturated float16 gradients that are finite values), with a dynamic loss
scale: every rank must then skip every step.

    python tests/dist_worker.py --out DIR [--distribute --port P] [--pynative] [--overflow_rank R]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resgarden.platform import apply_cpu_speed_guard  # noqa: E402

apply_cpu_speed_guard()

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn  # noqa: E402

from resgarden.base.specs import ClusterSpec  # noqa: E402
from resgarden.data.datasets import epoch_order, shard_order  # noqa: E402
from resgarden.runtime.distributed import broadcast_parameters, init_cluster  # noqa: E402
from resgarden.training import train_step  # noqa: E402
from resgarden.training.train_step import TrainStep  # noqa: E402

GLOBAL_BATCH, SAMPLES, STEPS = 8, 24, 3


class TinyNet(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        rs = np.random.RandomState(0)
        self.conv = nn.Conv2d(3, 8, 3, pad_mode="pad", padding=1, has_bias=True,
                              weight_init=ms.Tensor(rs.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)))
        self.relu = nn.ReLU()
        self.head = nn.Dense(8, 4, weight_init=ms.Tensor(rs.normal(0, 0.3, (4, 8)).astype(np.float32)))

    def construct(self, x):
        return self.head(self.relu(self.conv(x)).mean(axis=(2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--distribute", action="store_true")
    parser.add_argument("--port", type=int, default=8118)
    parser.add_argument("--pynative", action="store_true")
    parser.add_argument("--overflow_rank", type=int, default=None)
    args = parser.parse_args()
    ms.set_context(mode=ms.PYNATIVE_MODE if args.pynative else ms.GRAPH_MODE)
    cfg = ClusterSpec(distribute=args.distribute, dist_init="auto", dist_host=None, dist_port=args.port,
                      dist_timeout=30, device_target="CPU")
    cluster = init_cluster(cfg)
    rs = np.random.RandomState(1)
    images = rs.normal(0, 1, (SAMPLES, 3, 8, 8)).astype(np.float32)
    labels = rs.randint(0, 4, SAMPLES).astype(np.int32)
    ms.set_seed(int(os.environ.get("WORKER_SEED", "0")) + cluster.rank)  # different inits per rank...
    net = TinyNet()
    broadcast_parameters(net, cluster)  # ... made equal to rank 0's, as train.py does
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=0.5, momentum=0.9, weight_decay=1e-3)
    # a small clip norm so clipping acts: it must see the global (reduced) gradient
    scaling = {}
    if args.overflow_rank is not None:
        scaling = dict(loss_scale=1024.0, dynamic_loss_scale=True)
        if cluster.rank == args.overflow_rank:
            # after the real check (which waits for every reduced gradient, keeping the collectives in
            # the same order on both ranks), always False but data-dependent: not folded away
            real = train_step.all_finite
            train_step.all_finite = lambda grads: ms.ops.logical_and(real(grads), ms.ops.abs(grads[0]).sum() < -1.0)
    step = TrainStep(nn.WithLossCell(net, nn.CrossEntropyLoss()), optimizer, clip_norm=0.5, **scaling)
    step.set_train(True)
    order = epoch_order(SAMPLES, seed=3, epoch=0, shuffle=True)
    losses = []
    for i in range(STEPS):
        batch = order[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
        mine = shard_order(batch, cluster.rank, cluster.size, equal=True)
        losses.append(float(step(ms.Tensor(images[mine]), ms.Tensor(labels[mine])).asnumpy()))
    weights = {p.name: p.asnumpy() for p in net.get_parameters()}
    np.savez(os.path.join(args.out, f"rank{cluster.rank}.npz"), losses=np.array(losses),
             skipped_steps=step.skipped_steps.asnumpy(), loss_scale=step.loss_scale.asnumpy(), **weights)


if __name__ == "__main__":
    main()
