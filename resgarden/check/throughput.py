"""Would a training job be input-bound? The input pipeline's img/s per rank (every rank of the node
decoding and augmenting JPEGs at once, with the workers training would give it) against the
model's training img/s per rank on the device, in graph mode as training runs."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .report import Result


@dataclass(frozen=True)
class ThroughputSpec:
    """The job to size: the model, its input size and per-rank batch, its AMP level."""
    model: str = "resnet50"
    image_size: int = 224
    batch_size: int = 32
    level: str = "O0"
    steps: int = 5
    images: int = 256  # JPEGs the pipeline decodes (ImageNet-sized photos)


def write_photos(root: str, count: int, seed: int = 0) -> str:
    """``count`` JPEGs of ImageNet's typical size (about 500 x 375), re-cut from the photos that ship
    with scikit-learn, in an ImageNet ``train/`` layout of 4 classes; returns ``root``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rs = np.random.RandomState(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = rs.randint(photo.shape[0] // 2, photo.shape[0] + 1), rs.randint(photo.shape[1] // 2, photo.shape[1] + 1)
        top, left = rs.randint(0, photo.shape[0] - h + 1), rs.randint(0, photo.shape[1] - w + 1)
        crop = Image.fromarray(photo[top:top + h, left:left + w]).resize((500, 375))
        folder = os.path.join(root, "train", f"n0000000{i % 4}")
        os.makedirs(folder, exist_ok=True)
        crop.save(os.path.join(folder, f"photo_{i}.JPEG"), quality=90)
    return root


def pipeline_rate(root: str, spec: ThroughputSpec, cluster) -> tuple[float, int]:
    """(img/s of one epoch of training batches after the first, the workers used): this rank's
    share of its node's CPUs as training would take it, all ranks at once."""
    from resgarden.base.specs import EvalTransform, LoaderSpec
    from resgarden.data.datasets import load_imagenet_split, make_loader
    from resgarden.runtime.context import with_data_workers

    split = load_imagenet_split(root, "train")
    loader = with_data_workers(LoaderSpec(batch_size=spec.batch_size, seed=cluster.rank,
                                          eval_transform=EvalTransform(image_size=spec.image_size)), cluster)
    dataset, _ = make_loader(split, loader, training=True, num_classes=len(split.classes))
    cluster.barrier()
    start, seen = None, 0
    for images, _labels in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        if start is None:  # the first batch pays for starting the workers
            start = time.perf_counter()
            continue
        seen += len(images)
    return seen / max(time.perf_counter() - (start or 0.0), 1e-9), loader.workers


def step_rate(spec: ThroughputSpec) -> float:
    """Training img/s of ``spec.model`` on this device (graph mode, after its compile)."""
    import mindspore as ms
    from mindspore import nn

    import models
    from resgarden.training.amp import Float32Loss, apply_amp
    from resgarden.training.train_step import TrainStep

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        model = apply_amp(models.create_model(spec.model, num_classes=1000), spec.level)
        cell = TrainStep(nn.WithLossCell(model, Float32Loss(nn.CrossEntropyLoss())),
                         nn.Momentum(model.trainable_params(), 0.01, 0.9),
                         loss_scale=1.0 if spec.level == "O0" else 1024.0)
        cell.set_train(True)
        rs = np.random.RandomState(0)
        images = ms.Tensor(rs.normal(0, 1, (spec.batch_size, 3, spec.image_size, spec.image_size)).astype(np.float32))
        labels = ms.Tensor(rs.randint(0, 1000, spec.batch_size).astype(np.int32))
        cell(images, labels).asnumpy()  # compile
        start = time.perf_counter()
        for _ in range(spec.steps):
            loss = cell(images, labels)
        loss.asnumpy()
        return spec.steps * spec.batch_size / (time.perf_counter() - start)
    finally:
        ms.set_context(mode=previous)


def check_input_bound(spec: ThroughputSpec, work_dir: str, cluster) -> Result:
    """The pipeline's img/s per rank against the model's; a warning (not a failure) when the
    pipeline is the slower of the two."""
    root = write_photos(os.path.join(work_dir, "photos"), spec.images, seed=cluster.rank)
    model = step_rate(spec)
    pipeline, workers = pipeline_rate(root, spec, cluster)
    numbers = {"pipeline img/s": pipeline, "model img/s": model, "workers": workers, "ratio": pipeline / model}
    title = f"input pipeline vs {spec.model} at {spec.image_size} px, batch {spec.batch_size}, {spec.level}"
    if pipeline < model:
        return Result(title, "warn", f"input-bound: the pipeline makes {pipeline:.0f} img/s per rank, the model "
                                     f"trains {model:.0f}; give the job more CPUs per rank or a smaller "
                                     "--image_size / lighter --auto_augment", numbers)
    return Result(title, "pass", f"the pipeline keeps up ({pipeline / model:.2f}x the model's rate)", numbers)
