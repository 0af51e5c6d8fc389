"""Data sets and input pipelines: ImageNet layout (class folders or PaddleClas list files),
CIFAR-10 binary, and an embedded digits set written in the ImageNet layout.

Images are decoded in Python (PIL) so that a corrupt file is reported by path and replaced by
the next sample instead of ending an epoch; resizing, cropping, flipping and normalisation run
on MindSpore's C++ dataset ops.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .augment import ImageTransform
from .batches import BatchSource
from .download import download_verified
from .errors import DataError
from .platform import default_data_workers


logger = logging.getLogger("resgarden")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_DIR = "cifar-10-batches-bin"


@dataclass
class Split:
    """One split: image files (paths) or decoded images (arrays), labels and class names."""

    classes: list[str]
    labels: np.ndarray
    paths: list[str] | None = None
    images: np.ndarray | None = None  # (N, H, W, 3) uint8 when in memory

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------- ImageNet layout

def scan_class_folders(split_dir: str) -> Split:
    """``split_dir/<class>/<image>``; classes in sorted order, files in sorted order."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    paths, labels = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(folder, file))
                labels.append(index)
    if not paths:
        raise DataError(f"no images found in class folders under {split_dir}")
    return Split(classes, np.asarray(labels, np.int32), paths=paths)


def read_list_file(root: str, list_path: str) -> Split:
    """PaddleClas list file: lines ``train/n01440764/x.JPEG 0`` relative to ``root``.

    Class names are the parent folder names of each label's files (label order).
    """
    paths, labels, names = [], [], {}
    with open(list_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{list_path}:{number}: expected '<relative path> <label>', got {line.strip()!r}")
            label = int(parts[1])
            paths.append(os.path.join(root, parts[0]))
            labels.append(label)
            names.setdefault(label, os.path.basename(os.path.dirname(parts[0])) or str(label))
    if not paths:
        raise DataError(f"{list_path} lists no images")
    if min(labels) < 0 or sorted(names) != list(range(max(labels) + 1)):
        raise DataError(f"{list_path}: labels must be 0..N-1 with every class present")
    return Split([names[i] for i in range(len(names))], np.asarray(labels, np.int32), paths=paths)


def load_imagenet_split(data_dir: str, split: str, plain_folder_ok: bool = False) -> Split:
    """A split of an ImageNet-layout root: ``<split>_list.txt`` if present, else ``<split>/``.

    ``data_dir`` may also be the split folder itself (``--data_path=/imagenet/train``) or a
    sibling of it (the val split of ``/imagenet/train`` is ``/imagenet/val``). With
    ``plain_folder_ok`` (evaluation), any folder of class sub-folders is taken as the split.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    candidates = [data_dir, os.path.dirname(os.path.abspath(data_dir))]
    for root in candidates:
        list_path = os.path.join(root, f"{split}_list.txt")
        if os.path.isfile(list_path):
            return read_list_file(root, list_path)
        if os.path.isdir(os.path.join(root, split)):
            return scan_class_folders(os.path.join(root, split))
    if os.path.basename(os.path.abspath(data_dir)) == split or (
            plain_folder_ok and any(os.path.isdir(os.path.join(data_dir, d)) for d in os.listdir(data_dir))):
        return scan_class_folders(data_dir)
    raise DataError(f"no '{split}' split in {os.path.abspath(data_dir)}: expected {split}_list.txt or a {split}/ "
                    "folder of class sub-folders (set --data_dir)")


# ---------------------------------------------------------------- CIFAR-10

def _cifar_root(data_dir: str) -> str:
    return data_dir if os.path.basename(os.path.normpath(data_dir)) == CIFAR10_DIR else os.path.join(data_dir, CIFAR10_DIR)


def download_cifar10(data_dir: str) -> None:
    """Fetch the official binary archive (MD5-checked, atomic) and unpack it into ``data_dir``."""
    archive = download_verified(CIFAR10_URL, CIFAR10_MD5, data_dir, algorithm="md5")
    staging = tempfile.mkdtemp(prefix=".cifar10.", dir=data_dir)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        os.replace(os.path.join(staging, CIFAR10_DIR), os.path.join(data_dir, CIFAR10_DIR))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_cifar10_split(data_dir: str, train: bool, download: bool = False) -> Split:
    """CIFAR-10 binary batches (``cifar-10-batches-bin``) under ``data_dir``."""
    root = _cifar_root(data_dir)
    if not os.path.isdir(root):
        if not download:
            raise DataError(f"CIFAR-10 not found at {root}; add --dataset_download, or place the unpacked "
                            f"{os.path.basename(CIFAR10_URL)} ({CIFAR10_URL}) there")
        os.makedirs(data_dir, exist_ok=True)
        download_cifar10(data_dir)
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    images, labels = [], []
    for name in files:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise DataError(f"CIFAR-10 file missing: {path}")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % 3073:
            raise DataError(f"{path} is truncated: {raw.size} bytes is not a whole number of 3073-byte records")
        records = raw.reshape(-1, 3073)
        labels.append(records[:, 0].astype(np.int32))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Split(list(CIFAR10_CLASSES), np.concatenate(labels), images=np.concatenate(images))


# ---------------------------------------------------------------- embedded digits

def ensure_digits(root: str, image_size: int = 32, val_fraction: float = 0.2) -> str:
    """Write scikit-learn's 1,797 handwritten digits once as ``root/{train,val}/<digit>/*.png``.

    The 8x8 scans are scaled to ``image_size`` px RGB; 20 % per class (fixed order) go to val.
    Returns ``root``. Written into a temporary folder and renamed, so a half-written set never exists.
    """
    if os.path.isdir(os.path.join(root, "val")):
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".digits.", dir=parent)
    try:
        for label in range(10):
            indices = np.flatnonzero(digits.target == label)
            n_val = int(round(len(indices) * val_fraction))
            for position, index in enumerate(indices):
                split = "val" if position < n_val else "train"
                folder = os.path.join(staging, split, str(label))
                os.makedirs(folder, exist_ok=True)
                pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BILINEAR)
                image.convert("RGB").save(os.path.join(folder, f"{index:04d}.png"))
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


# ---------------------------------------------------------------- pipeline

def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), so resumes replay it."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.RandomState((seed * 1_000_003 + epoch) % (2**32)).permutation(num_samples)


def shard_order(order: np.ndarray, rank: int, size: int, equal: bool) -> np.ndarray:
    """Rank ``rank``'s share of an epoch's order: every ``size``-th sample from ``rank``. ``equal``
    (training) first trims the order to a multiple of ``size``, so all ranks take the same number of
    steps; the fewer than ``size`` samples left out change every epoch with the shuffle."""
    if size == 1:
        return order
    if equal:
        order = order[:len(order) // size * size]
    return order[rank::size]


def _interpolation(name: str):
    from mindspore.dataset.vision import Inter

    return {"bilinear": Inter.BILINEAR, "bicubic": Inter.BICUBIC, "nearest": Inter.NEAREST}[name]


AUTO_AUGMENT_PREFIXES = ("randaug", "autoaug", "3a", "trivialaugwide")


def auto_augment_policy(cfg):
    """mindcv's policy for ``cfg.auto_augment`` (HWC uint8 array in and out)."""
    from mindcv.data import auto_augment as policies

    name = cfg.auto_augment
    hparams = dict(translate_const=int(cfg.image_size * 0.45), interpolation=_interpolation(cfg.interpolation),
                   img_mean=tuple(min(255, round(m * 255)) for m in cfg.mean))
    if name.startswith("randaug"):
        policy = policies.rand_augment_transform(name, hparams)
    elif name.startswith(("autoaug", "3a")):
        policy = policies.auto_augment_transform(name, hparams)
    elif name.startswith("trivialaugwide"):
        policy = policies.trivial_augment_wide_transform(name, hparams)
    else:
        raise DataError(f"unknown auto_augment policy {name!r}; use one starting with {', '.join(AUTO_AUGMENT_PREFIXES)}")
    return policy


def image_transform(cfg, training: bool) -> ImageTransform:
    """Everything an image of ``cfg``'s training or evaluation split goes through before batching."""
    return ImageTransform(size=cfg.image_size, training=training, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                          hflip=cfg.hflip, resize=int(round(cfg.image_size / cfg.crop_pct)),
                          interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std),
                          color_jitter=cfg.color_jitter or 0.0, re_prob=cfg.re_prob,
                          policy=auto_augment_policy(cfg) if training and cfg.auto_augment else None)


def uses_soft_targets(cfg) -> bool:
    """Mixup/cutmix produce soft (N, classes) targets for the whole run."""
    return cfg.mixup > 0 or cfg.cutmix > 0


def mixing(cfg, num_classes: int, epoch: int):
    """mindcv's batch Mixup/CutMix for this epoch (targets smoothed by ``label_smoothing``);
    after ``mixup_off_epoch`` it only one-hot encodes and smooths."""
    from mindcv.data.mixup import Mixup

    mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing, num_classes=num_classes)
    mix.mixup_enabled = not (cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch)
    return mix


def make_loader(split: Split, cfg, training: bool, epoch: int = 0, num_classes: int | None = None,
                shard: tuple[int, int] = (0, 1), epochs: int = 1):
    """A batched MindSpore dataset for epoch ``epoch`` of rank ``shard[0]`` of ``shard[1]`` (training
    drops the last partial batch and, with mixup/cutmix, yields soft targets). ``epochs`` > 1 (dataset
    sink mode) chains that many epochs' sample orders, each without its last partial batch, with the
    same per-image augmentation as epoch by epoch (auto-augment policies and mixup draw from one
    global stream seeded for ``epoch``)."""
    import mindspore.dataset as ds

    rank, size = shard
    seed = cfg.seed + epoch + 1_000_003 * rank  # each rank augments differently, every epoch replayable
    ds.config.set_seed(seed)
    random.seed(seed)  # Python-side augmentations (auto-augment policies, mixup)
    np.random.seed(seed % (2**32))
    orders = [shard_order(epoch_order(len(split), cfg.seed, e, shuffle=training), rank, size, equal=training)
              for e in range(epoch, epoch + epochs)]
    if epochs > 1:
        orders = [order[:len(order) // cfg.batch_size * cfg.batch_size] for order in orders]
    source = BatchSource(split, np.concatenate(orders), image_transform(cfg, training),
                         seed_key=(cfg.seed, rank, int(training)), batch_size=cfg.batch_size,
                         drop_remainder=training, first_epoch=epoch,
                         workers=cfg.num_parallel_workers or default_data_workers()[0],
                         epoch_length=len(orders[0]))
    dataset = ds.GeneratorDataset(source, column_names=["image", "label"], shuffle=False)
    if training and uses_soft_targets(cfg):
        dataset = dataset.map(mixing(cfg, num_classes or len(split.classes), epoch), input_columns=["image", "label"])
    return dataset, source


def load_splits(cfg) -> tuple[Split, Split | None]:
    """(train split, validation split or None) for the configured data set."""
    dataset = resolve_dataset(cfg)
    if dataset == "cifar10":
        data_dir = cfg.data_dir or "./data/cifar10"
        train = load_cifar10_split(data_dir, True, cfg.dataset_download)
        return train, load_cifar10_split(data_dir, False)
    data_dir = imagenet_root(cfg) if dataset == "imagenet" else ensure_digits(cfg.data_dir or "./data/digits")
    train = load_imagenet_split(data_dir, cfg.train_split)
    try:
        val = load_imagenet_split(data_dir, cfg.val_split)
    except DataError:
        logger.warning("no '%s' split next to %s: training without validation", cfg.val_split, data_dir)
        val = None
    if val is not None and val.classes != train.classes:
        raise DataError(f"the {cfg.val_split} split's classes differ from the {cfg.train_split} split's")
    return train, val


def imagenet_root(cfg) -> str:
    """``--data_dir``, or the current folder as mindcv does (its train/ and val/ are looked up there)."""
    return cfg.data_dir or "."


def resolve_dataset(cfg) -> str:
    if cfg.dataset != "auto":
        return cfg.dataset
    return "imagenet" if cfg.data_dir else "digits"
