"""Data sets and input pipelines: ImageNet layout (class folders or PaddleClas list files),
CIFAR-10 binary, and an embedded digits set written in the ImageNet layout.

Whole batches are built by :mod:`resgarden.data.batches` (decode, augment, normalise in worker
processes; a corrupt file is reported by path and replaced by the next sample instead of ending an
epoch) and handed to MindSpore through a ``GeneratorDataset``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import tarfile

import numpy as np
from PIL import Image

from resgarden.base.atomic import atomic_directory
from resgarden.base.download import download_verified
from resgarden.base.errors import DataError
from resgarden.base.specs import Augmentation, DataSpec, EvalTransform, LoaderSpec, Mixing
from resgarden.data.augment import ImageTransform
from resgarden.data.batches import BatchSource
from resgarden.data.split import Split
from resgarden.platform import default_data_workers

logger = logging.getLogger("resgarden")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
DIGITS_CLASSES = [str(digit) for digit in range(10)]  # the embedded digits' class folders
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_DIR = "cifar-10-batches-bin"


# ---------------------------------------------------------------- ImageNet layout

def scan_class_folders(split_dir: str) -> Split:
    """``split_dir/<class>/<image>``; classes in sorted order, files in sorted order. Class folders
    all named by numbers (ImageNet-V2's ``0`` .. ``999``, the class indices) sort numerically."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if classes and all(c.isdigit() for c in classes):
        classes.sort(key=int)
    paths, labels, empty = [], [], []
    for index, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        found = [f for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            empty.append(name)
        paths += [os.path.join(folder, f) for f in found]
        labels += [index] * len(found)
    if not paths:
        raise DataError(f"no images found in class folders under {split_dir}")
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"{split_dir}: class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): {shown}; "
                        "add images or remove the folder(s)")
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


def _inside_cifar_folder(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    """tarfile's "data" safety filter, with the archive's top folder stripped."""
    member = tarfile.data_filter(member, path)
    top, _, rest = member.name.partition("/")
    return member.replace(name=rest, deep=False) if top == CIFAR10_DIR and rest else None


def download_cifar10(data_dir: str) -> None:
    """Fetch the official binary archive (MD5-checked, atomic) and unpack it into ``data_dir``."""
    archive = download_verified(CIFAR10_URL, CIFAR10_MD5, data_dir, algorithm="md5")
    with atomic_directory(os.path.join(data_dir, CIFAR10_DIR)) as staging, tarfile.open(archive, "r:gz") as tar:
        tar.extractall(staging, filter=_inside_cifar_folder)


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
    with atomic_directory(root) as staging:
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


REPEAT_ROUND = 256  # repeated augmentation: the epoch's images, rounded down to a multiple of this, over the ranks


def repeated_shard(order: np.ndarray, rank: int, size: int, repeats: int) -> np.ndarray:
    """Rank ``rank``'s share of an epoch with repeated augmentation (Hoffer et al. 2020; DeiT's and
    timm's ``RepeatAugSampler``): each image of ``order`` ``repeats`` times in a row, dealt round-robin,
    so that its copies go to different ranks (or, in one process, follow each other, each with its own
    augmentation); an epoch keeps about the images' count, rounded down to 256, over the ranks."""
    count = len(order)
    positions = np.arange(rank, math.ceil(count * repeats / size) * size, size)[:_repeated_count(count, size, repeats)]
    return np.repeat(order, repeats)[positions % (count * repeats)]


def _repeated_count(count: int, size: int, repeats: int) -> int:
    """Samples per rank and epoch with repeated augmentation (see :func:`repeated_shard`)."""
    selected = (count // REPEAT_ROUND * REPEAT_ROUND // size if count >= REPEAT_ROUND else math.ceil(count / size))
    return min(selected, math.ceil(count * repeats / size))


def training_order(num_samples: int, seed: int, epoch: int, rank: int, size: int, repeats: int = 0) -> np.ndarray:
    """Rank ``rank``'s samples of training epoch ``epoch``: its share of the epoch's permutation, with
    repeated augmentation when ``repeats`` > 1."""
    order = epoch_order(num_samples, seed, epoch, shuffle=True)
    if repeats > 1:
        return repeated_shard(order, rank, size, repeats)
    return shard_order(order, rank, size, equal=True)


def samples_per_rank(num_samples: int, size: int, repeats: int = 0) -> int:
    """How many samples each rank trains on per epoch (see :func:`training_order`)."""
    return _repeated_count(num_samples, size, repeats) if repeats > 1 else num_samples // size


def _interpolation(name: str):
    from mindspore.dataset.vision import Inter

    return {"bilinear": Inter.BILINEAR, "bicubic": Inter.BICUBIC, "nearest": Inter.NEAREST}[name]


AUTO_AUGMENT_PREFIXES = ("randaug", "autoaug", "3a", "trivialaugwide")


def auto_augment_policy(augmentation: Augmentation, transform: EvalTransform):
    """mindcv's policy for ``augmentation.auto_augment`` (HWC uint8 array in and out)."""
    from mindcv.data import auto_augment as policies

    name = augmentation.auto_augment
    hparams = dict(translate_const=int((augmentation.size or transform.image_size) * 0.45),  # of the training crop
                   interpolation=_interpolation(transform.interpolation),
                   img_mean=tuple(min(255, round(m * 255)) for m in transform.mean))
    if name.startswith("randaug"):
        policy = policies.rand_augment_transform(name, hparams)
    elif name.startswith(("autoaug", "3a")):
        policy = policies.auto_augment_transform(name, hparams)
    elif name.startswith("trivialaugwide"):
        policy = policies.trivial_augment_wide_transform(name, hparams)
    else:
        raise DataError(f"unknown auto_augment policy {name!r}; use one starting with {', '.join(AUTO_AUGMENT_PREFIXES)}")
    return policy


def image_transform(loader: LoaderSpec, training: bool) -> ImageTransform:
    """Everything an image of a training or evaluation split goes through before batching."""
    transform, augmentation = loader.eval_transform, loader.augmentation
    return ImageTransform(training=training, eval=transform, augmentation=augmentation,
                          policy=auto_augment_policy(augmentation, transform)
                          if training and augmentation.auto_augment else None)


def mixing(mix: Mixing, num_classes: int, epoch: int):
    """mindcv's batch Mixup/CutMix for this epoch (targets smoothed by ``label_smoothing``);
    after ``off_epoch`` it only one-hot encodes and smooths."""
    from mindcv.data.mixup import Mixup

    mixer = Mixup(mixup_alpha=mix.mixup, cutmix_alpha=mix.cutmix, prob=mix.prob, switch_prob=mix.switch_prob,
                  label_smoothing=mix.label_smoothing, num_classes=num_classes)
    mixer.mixup_enabled = not (mix.off_epoch and epoch >= mix.off_epoch)
    return mixer


def make_loader(split: Split, loader: LoaderSpec, training: bool, epoch: int = 0, num_classes: int | None = None,
                shard: tuple[int, int] = (0, 1), epochs: int = 1, first_batch: int = 0):
    """A batched MindSpore dataset for epoch ``epoch`` of rank ``shard[0]`` of ``shard[1]`` (training
    drops the last partial batch and, with mixup/cutmix, yields soft targets), and its batch source.
    ``epochs`` > 1 (dataset sink mode) chains that many epochs' sample orders, each without its last
    partial batch, with the same per-image augmentation as epoch by epoch (auto-augment policies and
    mixup draw from one global stream seeded for ``epoch``). ``first_batch`` > 0 (a run resumed
    mid-epoch) starts at that batch of the epoch, with the order and per-image augmentation it had."""
    import mindspore.dataset as ds

    rank, size = shard
    seed = loader.seed + epoch + 1_000_003 * rank  # each rank augments differently, every epoch replayable
    ds.config.set_seed(seed)
    random.seed(seed)  # Python-side augmentations (auto-augment policies, mixup)
    np.random.seed(seed % (2**32))
    orders = [training_order(len(split), loader.seed, e, rank, size, loader.aug_repeats) if training
              else shard_order(epoch_order(len(split), loader.seed, e, shuffle=False), rank, size, equal=False)
              for e in range(epoch, epoch + epochs)]
    if epochs > 1:
        orders = [order[:len(order) // loader.batch_size * loader.batch_size] for order in orders]
    source = BatchSource(split, np.concatenate(orders), image_transform(loader, training),
                         seed_key=(loader.seed, rank, int(training)), batch_size=loader.batch_size,
                         drop_remainder=training, first_epoch=epoch,
                         workers=loader.workers or default_data_workers().workers, epoch_length=len(orders[0]),
                         first_batch=first_batch, worker_cpus=loader.worker_cpus)
    dataset = ds.GeneratorDataset(source, column_names=["image", "label"], shuffle=False)
    if training and loader.mixing.enabled:
        dataset = dataset.map(mixing(loader.mixing, num_classes or len(split.classes), epoch),
                              input_columns=["image", "label"])
    return dataset, source


def load_splits(data: DataSpec) -> tuple[Split, Split | None]:
    """(train split, validation split or None) for training on ``data``."""
    if data.kind == "cifar10":
        data_dir = data.data_dir or "./data/cifar10"
        train = load_cifar10_split(data_dir, True, data.download)
        return train, load_cifar10_split(data_dir, False)
    data_dir = imagenet_root(data) if data.kind == "imagenet" else ensure_digits(data.data_dir or "./data/digits")
    train = load_imagenet_split(data_dir, data.train_split)
    try:
        val = load_imagenet_split(data_dir, data.val_split)
    except DataError:
        logger.warning("no '%s' split next to %s: training without validation", data.val_split, data_dir)
        val = None
    if val is not None and val.classes != train.classes:
        raise DataError(f"the {data.val_split} split's classes differ from the {data.train_split} split's")
    return train, val


def load_eval_split(data: DataSpec) -> Split:
    """The split validate / eval score: ``val_split`` of the data set (with ``--data_dir`` any folder
    of class sub-folders is taken as it)."""
    if data.kind == "cifar10":
        return load_cifar10_split(data.data_dir or "./data/cifar10", False, data.download)
    if data.kind == "digits":
        return load_imagenet_split(ensure_digits(data.data_dir or "./data/digits"), data.val_split)
    return load_imagenet_split(imagenet_root(data), data.val_split, plain_folder_ok=bool(data.data_dir))


def imagenet_root(data: DataSpec) -> str:
    """``--data_dir``, or the current folder as mindcv does (its train/ and val/ are looked up there)."""
    return data.data_dir or "."
