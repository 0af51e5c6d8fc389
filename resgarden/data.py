"""Data sets and input pipelines: ImageNet layout (class folders or PaddleClas list files),
CIFAR-10 binary, and an embedded digits set written in the ImageNet layout.

Images are decoded in Python (PIL) so that a corrupt file is reported by path and replaced by
the next sample instead of ending an epoch; resizing, cropping, flipping and normalisation run
on MindSpore's C++ dataset ops.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import random
import shutil
import tarfile
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
from PIL import Image

from .augment import ImageTransform
from .download import download_verified
from .errors import UserError
from .images import UnreadableImage
from .platform import default_data_workers

SHARED_MEMORY_DIR = "/dev/shm"  # where multiprocessing.shared_memory puts its segments on Linux

logger = logging.getLogger("resgarden")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_DIR = "cifar-10-batches-bin"


class DataError(UserError):
    """Missing or malformed data; the message is for the user as is."""


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

class BatchSource:
    """One epoch's order of a Split as batches, for GeneratorDataset (iterable). Each image is read
    and transformed by resgarden/augment.py and written straight into its batch's array.

    ``workers`` > 1: that many forked worker processes build whole batches into shared memory
    (no interpreter lock between them, so Python steps such as auto-augment policies scale too);
    threads where processes cannot be used. Batches come out in order either way.

    Each image draws from its own random stream, keyed by ``seed_key``, its epoch and its position
    in that epoch (``order`` may chain several epochs of ``epoch_length`` samples, starting at
    ``first_epoch``); a worker process seeds Python's and NumPy's global streams per batch for the
    auto-augment policies. A file that cannot be decoded is logged with its path (once) and
    replaced by the next sample in the order; ``bad_files`` holds this epoch's.
    """

    def __init__(self, split: Split, order: np.ndarray, transform: ImageTransform, seed_key: tuple[int, ...],
                 batch_size: int, drop_remainder: bool, workers: int = 1, first_epoch: int = 0,
                 epoch_length: int | None = None) -> None:
        self.split = split
        self.order = order
        self.transform = transform
        self.seed_key = seed_key
        self.first_epoch = first_epoch
        self.epoch_length = epoch_length or max(len(order), 1)
        self.batch_size = batch_size
        self.samples = len(order) // batch_size * batch_size if drop_remainder else len(order)
        self.workers = max(1, workers)
        self.bad_files: set[str] = set()
        self.failure: DataError | None = None  # what ended the iteration, see :func:`batches`
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size)

    def batch_shape(self, batch: int) -> tuple[int, int, int, int]:
        size = self.transform.size
        return min(self.batch_size, self.samples - batch * self.batch_size), 3, size, size

    def _read(self, index: int) -> bytes | np.ndarray:
        if self.split.images is not None:
            return self.split.images[index]
        try:
            with open(self.split.paths[index], "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise UnreadableImage(exc.strerror or str(exc)) from None

    def sample(self, position: int, out: np.ndarray, bad: list[tuple[str, str]]) -> int:
        """Write the image at ``position`` of the order (or the next readable one) into ``out``;
        return its label. Unreadable files are appended to ``bad`` as (path, reason)."""
        epoch, offset = divmod(position, self.epoch_length)
        rng = np.random.default_rng((*self.seed_key, self.first_epoch + epoch, offset))
        n = len(self.order)
        for attempt in range(n):
            index = int(self.order[(position + attempt) % n])
            try:
                self.transform(self._read(index), rng, out)
                return int(self.split.labels[index])
            except UnreadableImage as exc:
                bad.append((self.split.paths[index], str(exc)))
        raise DataError("no readable image in the data set")

    def fill(self, batch: int, images: np.ndarray) -> tuple[list[int], list[tuple[str, str]]]:
        """Write batch ``batch`` into ``images``; (labels, unreadable files)."""
        bad: list[tuple[str, str]] = []
        start = batch * self.batch_size
        return [self.sample(start + i, images[i], bad) for i in range(len(images))], bad

    def _collect(self, images: np.ndarray, labels: list[int], bad: list[tuple[str, str]]):
        with self._lock:
            for path, reason in bad:
                self.bad_files.add(path)
                if path not in _LOGGED_BAD_FILES:  # once per process, not once per epoch
                    _LOGGED_BAD_FILES.add(path)
                    logger.warning("skipping unreadable image %s (%s)", path, reason)
        return images, np.asarray(labels, np.int32)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            if self.workers == 1:
                for batch in range(len(self)):
                    images = np.empty(self.batch_shape(batch), np.float32)
                    yield self._collect(images, *self.fill(batch, images))
            elif worker_processes_possible(self):
                yield from self._in_processes()
            else:
                yield from self._in_threads()
        except DataError as exc:
            self.failure = exc
            raise

    def _in_threads(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        def fill(batch: int) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
            images = np.empty(self.batch_shape(batch), np.float32)
            return (images, *self.fill(batch, images))

        with ThreadPoolExecutor(self.workers, thread_name_prefix="resgarden-data") as pool:
            yield from (self._collect(*batch) for batch in pool.map(fill, range(len(self))))

    def _in_processes(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        slots = [shared_memory.SharedMemory(create=True, size=_batch_bytes(self)) for _ in range(2 * self.workers)]
        free, queued = list(range(len(slots))), deque()
        next_batch = 0
        try:
            with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_set_worker_source, initargs=(self,)) as pool:
                while True:
                    while free and next_batch < len(self):
                        slot = free.pop()
                        queued.append((slot, next_batch, pool.submit(_fill_slot, next_batch, slots[slot].name)))
                        next_batch += 1
                    if not queued:
                        return
                    slot, batch, future = queued.popleft()
                    try:
                        labels, bad = future.result()
                    except BrokenProcessPool:
                        raise DataError("a data loading worker process died (out of memory, or a crash in an "
                                        "image library); --num_parallel_workers=1 decodes in the main process") from None
                    # copied out: MindSpore keeps referring to the arrays it is given, without a copy
                    images = np.ndarray(self.batch_shape(batch), np.float32, buffer=slots[slot].buf).copy()
                    free.append(slot)
                    yield self._collect(images, labels, bad)
        finally:
            for memory in slots:
                memory.close()
                memory.unlink()


def batches(loader, source: BatchSource, output_numpy: bool = False) -> Iterator[tuple]:
    """One epoch of ``loader``'s batches; a DataError raised in its source comes out as itself
    (MindSpore's pipeline wraps it in a RuntimeError with pages of context)."""
    try:
        yield from loader.create_tuple_iterator(num_epochs=1, output_numpy=output_numpy)
    except RuntimeError:
        if source.failure is not None:
            raise source.failure from None
        raise


def _batch_bytes(source: BatchSource) -> int:
    return int(np.prod(source.batch_shape(0))) * 4


def worker_processes_possible(source: BatchSource) -> bool:
    """Whether forked workers can be used: fork exists (Linux) and the shared-memory folder has
    room for the batches in flight (a container's default 64 MB /dev/shm may not); else threads,
    said once in the log."""
    needed = _batch_bytes(source) * 2 * source.workers
    reason = None
    if "fork" not in multiprocessing.get_all_start_methods():
        reason = "this platform cannot fork"
    else:
        try:
            stats = os.statvfs(SHARED_MEMORY_DIR)
            if stats.f_bavail * stats.f_frsize < needed:
                reason = f"{SHARED_MEMORY_DIR} has less than the {needed / 2**20:.0f} MB free that the batches in " \
                         f"flight need (docker: --shm-size)"
        except OSError as exc:
            reason = f"{SHARED_MEMORY_DIR} is not usable ({exc.strerror})"
    if reason and reason not in _THREAD_FALLBACKS:
        _THREAD_FALLBACKS.add(reason)
        logger.warning("data loading in %d threads instead of processes: %s", source.workers, reason)
    return reason is None


_THREAD_FALLBACKS: set[str] = set()
_LOGGED_BAD_FILES: set[str] = set()
_worker_source: BatchSource | None = None  # in a worker process: the source it was forked with
_worker_slots: dict[str, shared_memory.SharedMemory] = {}


def _set_worker_source(source: BatchSource) -> None:
    global _worker_source
    _worker_source = source


def _fill_slot(batch: int, slot_name: str) -> tuple[list[int], list[tuple[str, str]]]:
    """In a worker process: build batch ``batch`` into the shared-memory slot ``slot_name``."""
    source = _worker_source
    if slot_name not in _worker_slots:
        _worker_slots[slot_name] = shared_memory.SharedMemory(name=slot_name)  # unlinked by the parent
    seed = zlib.crc32(repr((*source.seed_key, source.first_epoch, batch)).encode())
    random.seed(seed)  # the auto-augment policies draw from the global streams
    np.random.seed(seed)
    images = np.ndarray(source.batch_shape(batch), np.float32, buffer=_worker_slots[slot_name].buf)
    return source.fill(batch, images)


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
