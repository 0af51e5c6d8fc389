"""Input-pipeline throughput, this project's loader against mindcv's, on realistic photo JPEGs.

Each figure comes from a fresh process that builds one loader and reads batches for at least
``seconds`` seconds after its first batch (so start-up is excluded, per-epoch set-up is not).
"""
from __future__ import annotations

import os
import time

import numpy as np

TRANSFORMS = ("train", "randaugment", "eval")
RANDAUGMENT = "randaug-m9-mstd0.5-inc1"
PHOTO_SIZE = (500, 375)  # the size of a typical ImageNet photo


def write_photo_folder(root: str, count: int = 384, classes: int = 4, seed: int = 0) -> str:
    """``root/train/<class>/<i>.JPEG``: ``count`` 500x375 JPEGs (quality 75-95) re-cut from the real
    photos that ship with scikit-learn, at random windows, scales and flips; returns ``root``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rs = np.random.RandomState(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        crop_w = rs.randint(int(width * 0.6), width + 1)
        crop_h = min(height, int(crop_w * PHOTO_SIZE[1] / PHOTO_SIZE[0]))
        top, left = rs.randint(0, height - crop_h + 1), rs.randint(0, width - crop_w + 1)
        image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(PHOTO_SIZE, Image.BICUBIC)
        if rs.rand() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, "train", f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i}.JPEG"), quality=int(rs.randint(75, 96)))
    return root


def _project_batches(root: str, transform: str, workers: int, batch: int, size: int, repeat: int):
    from resgarden.base.specs import Augmentation, EvalTransform, LoaderSpec
    from resgarden.data.datasets import Split, make_loader, scan_class_folders

    split = scan_class_folders(os.path.join(root, "train"))
    split = Split(paths=split.paths * repeat, labels=np.tile(split.labels, repeat), classes=split.classes)
    spec = LoaderSpec(batch_size=batch, workers=workers, eval_transform=EvalTransform(image_size=size),
                      augmentation=Augmentation(auto_augment=RANDAUGMENT if transform == "randaugment" else None))
    epoch = 0
    while True:  # one loader per epoch, as training and validation build them
        dataset, _ = make_loader(split, spec, training=transform != "eval", epoch=epoch)
        yield from dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
        epoch += 1


def _mindcv_batches(root: str, transform: str, workers: int, batch: int, size: int, repeat: int):
    from mindcv.data import create_dataset, create_loader, create_transforms

    training = transform != "eval"
    dataset = create_dataset(name="imagenet", root=root, split="train", shuffle=training,
                             num_parallel_workers=workers).repeat(repeat)  # epochs as long as the project's
    options = dict(color_jitter=None, re_prob=0.0,
                   auto_augment=RANDAUGMENT if transform == "randaugment" else None) if training else {}
    transforms = create_transforms(dataset_name="imagenet", image_resize=size, is_training=training, **options)
    loader = create_loader(dataset=dataset, batch_size=batch, drop_remainder=True, is_training=training,
                           transform=transforms, num_parallel_workers=workers)
    while True:
        yield from loader.create_tuple_iterator(num_epochs=1, output_numpy=True)


def measure(loader: str, root: str, transform: str, workers: int, seconds: float = 5.0, batch: int = 32,
            size: int = 224, repeat: int = 8) -> dict:
    """img/s of ``loader`` ('project' or 'mindcv') over ``root``'s photos (``repeat`` passes per epoch)."""
    batches = (_project_batches if loader == "project" else _mindcv_batches)(root, transform, workers, batch,
                                                                               size, repeat)
    first = next(batches)[0]
    assert first.shape[1:] == (3, size, size) and first.dtype == np.float32, first.shape
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += len(next(batches)[0])
    return dict(img_s=images / (time.perf_counter() - start), images=images)
