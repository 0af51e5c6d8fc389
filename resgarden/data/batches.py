"""Batches for MindSpore's GeneratorDataset, built by the main process, forked worker processes
(shared memory) or threads: every image read, transformed (resgarden/data/augment.py) and written
straight into its batch's array."""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import random
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

import numpy as np

from resgarden.base.errors import DataError
from resgarden.data.augment import ImageTransform
from resgarden.data.images import UnreadableImage
from resgarden.data.split import Split

logger = logging.getLogger("resgarden")
SHARED_MEMORY_DIR = "/dev/shm"  # where multiprocessing.shared_memory puts its segments on Linux


class BatchSource:
    """One epoch's order of a Split as batches, for GeneratorDataset (iterable). Each image is read
    and transformed by resgarden/data/augment.py and written straight into its batch's array.

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
                 epoch_length: int | None = None, first_batch: int = 0,
                 worker_cpus: tuple[int, ...] | None = None) -> None:
        self.split = split
        self.order = order
        self.transform = transform
        self.seed_key = seed_key
        self.first_epoch = first_epoch
        self.epoch_length = epoch_length or max(len(order), 1)
        self.batch_size = batch_size
        self.samples = len(order) // batch_size * batch_size if drop_remainder else len(order)
        self.first_batch = first_batch  # a run resumed mid-epoch starts at its next batch
        self.workers = max(1, workers)
        self.worker_cpus = worker_cpus  # the worker processes' CPU affinity (None: this process's)
        self.bad_files: set[str] = set()
        self.failure: DataError | None = None  # what ended the iteration, see :func:`batches`
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return -(-self.samples // self.batch_size) - self.first_batch

    def batch_numbers(self) -> range:
        """The batches this source yields, numbered within the whole order."""
        return range(self.first_batch, self.first_batch + len(self))

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
                for batch in self.batch_numbers():
                    images = np.empty(self.batch_shape(batch), np.float32)
                    if self.transform.policy is not None:  # else leave them to mixup, in another thread
                        seed_global_streams(self, batch)
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
            yield from (self._collect(*batch) for batch in pool.map(fill, self.batch_numbers()))

    def _in_processes(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches built by forked workers into shared-memory slots, in order. The workers live
        across epochs (:func:`_workers_for`); each iteration publishes its plan (the sample order
        and the transform) in shared memory. A worker that dies (the OOM killer's usual victim)
        breaks the pool: a new one makes the unfinished batches again (the same batches: each is
        seeded by its number), up to MAX_WORKER_RESTARTS times."""
        slots = [shared_memory.SharedMemory(create=True, size=_batch_bytes(self)) for _ in range(2 * self.workers)]
        plan = _publish_plan(self)
        free, waiting = list(range(len(slots))), deque()  # waiting: (slot, batch) submitted, not yet taken
        next_batch, end, restarts, queued = self.first_batch, self.first_batch + len(self), 0, deque()
        try:
            while True:
                pool = _workers_for(self)
                try:
                    queued = deque((slot, batch, pool.submit(_fill_slot, plan.name, batch, slots[slot].name))
                                   for slot, batch in waiting)
                    while True:
                        while free and next_batch < end:
                            future = pool.submit(_fill_slot, plan.name, next_batch, slots[free[-1]].name)
                            slot = free.pop()
                            queued.append((slot, next_batch, future))
                            waiting.append((slot, next_batch))
                            next_batch += 1
                        if not queued:
                            return
                        slot, batch, future = queued[0]
                        labels, bad = future.result()
                        queued.popleft()
                        waiting.popleft()
                        # copied out: MindSpore keeps referring to the arrays it is given, without a copy
                        images = np.ndarray(self.batch_shape(batch), np.float32, buffer=slots[slot].buf).copy()
                        free.append(slot)
                        yield self._collect(images, labels, bad)
                except BrokenProcessPool:
                    restarts += 1
                    dead = _dead_workers(pool)
                    _retire(pool)
                    if restarts > MAX_WORKER_RESTARTS:
                        raise DataError(f"a data loading worker process died ({dead}; {restarts} times this epoch): "
                                        "out of memory, or a crash in an image library? Fewer --num_parallel_workers, "
                                        "or --num_parallel_workers=1 to decode in the main process") from None
                    logger.warning("data loading worker %s: new workers make batches %d-%d again", dead,
                                   waiting[0][1] if waiting else next_batch, next_batch - 1)
        finally:
            for _, _, future in queued:  # stopped early: what was not started yet is not made
                future.cancel()
            for memory in (*slots, plan):
                memory.close()
                memory.unlink()


MAX_WORKER_RESTARTS = 3  # per epoch: a worker that dies again and again is not bad luck


def _dead_workers(pool: ProcessPoolExecutor) -> str:
    """Which worker processes of a broken pool died, and how: ``1234 killed by SIGKILL``."""
    processes = dict(getattr(pool, "_processes", None) or {})
    deadline = time.monotonic() + 2.0  # the pool's own thread may be reaping them right now
    while True:
        codes = {pid: process.exitcode for pid, process in processes.items() if process.exitcode not in (None, 0)}
        if codes or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    first = {pid: code for pid, code in codes.items() if code != -signal.SIGTERM} or codes  # the pool SIGTERMs the rest
    said = [f"{pid} {f'killed by {signal.Signals(-code).name}' if code < 0 else f'exited with code {code}'}"
            for pid, code in first.items()]
    return ", ".join(said) or "process died"


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
KEPT_POOLS = 2  # the training and the validation split's workers
_pools: list[tuple[Split, int, tuple[int, ...] | None, ProcessPoolExecutor]] = []  # newest last
pools_started = 0  # worker pools this process started (each forks ``workers`` processes)
_worker_split: Split | None = None  # in a worker process: the split it was forked with
_worker_plans: dict[str, tuple[shared_memory.SharedMemory, BatchSource]] = {}
_worker_slots: dict[str, shared_memory.SharedMemory] = {}


def _workers_for(source: BatchSource) -> ProcessPoolExecutor:
    """The worker pool of ``source``'s split, worker count and CPUs: the one started for an earlier
    epoch (persistent workers: forking a large process every epoch costs more than short epochs
    take), else a new one; the least recently used beyond KEPT_POOLS is shut down."""
    global pools_started
    for entry in _pools:
        split, workers, cpus, pool = entry
        if split is source.split and workers == source.workers and cpus == source.worker_cpus:
            _pools.remove(entry)
            _pools.append(entry)
            return pool
    pool = ProcessPoolExecutor(source.workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(source.split, source.worker_cpus, os.getpid()))
    pools_started += 1
    _pools.append((source.split, source.workers, source.worker_cpus, pool))
    while len(_pools) > KEPT_POOLS:
        _retire(_pools[0][3])
    return pool


def _retire(pool: ProcessPoolExecutor) -> None:
    """Shut ``pool`` down (a broken one, or the least recently used) without waiting for it."""
    _pools[:] = [entry for entry in _pools if entry[3] is not pool]
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown_workers() -> None:
    """Shut every persistent worker pool down (at exit, and for tests)."""
    for *_, pool in list(_pools):
        _retire(pool)


atexit.register(shutdown_workers)


def _publish_plan(source: BatchSource) -> shared_memory.SharedMemory:
    """What a worker needs of this iteration besides its split, in shared memory: the sample
    order (int64) and the pickled rest of ``source`` (transform, seeds, geometry)."""
    order = np.ascontiguousarray(source.order, dtype=np.int64)
    rest = pickle.dumps(dict(transform=source.transform, seed_key=source.seed_key, batch_size=source.batch_size,
                             first_epoch=source.first_epoch, epoch_length=source.epoch_length, samples=source.samples))
    memory = shared_memory.SharedMemory(create=True, size=16 + len(rest) + order.nbytes)
    np.ndarray(2, np.int64, buffer=memory.buf)[:] = (len(rest), len(order))
    memory.buf[16:16 + len(rest)] = rest
    np.ndarray(len(order), np.int64, buffer=memory.buf, offset=16 + len(rest))[:] = order
    return memory


def _worker_source(plan_name: str) -> BatchSource:
    """In a worker process: the BatchSource of the plan ``plan_name`` (read once; the memory of
    earlier iterations' plans and slots let go)."""
    if plan_name not in _worker_plans:  # a new iteration: the last one's plan and slots are unlinked
        for old in list(_worker_plans):
            _worker_plans.pop(old)[0].close()
        for old in list(_worker_slots):
            _worker_slots.pop(old).close()
        memory = shared_memory.SharedMemory(name=plan_name)  # unlinked by the parent
        rest_size, count = (int(v) for v in np.ndarray(2, np.int64, buffer=memory.buf))
        rest = pickle.loads(bytes(memory.buf[16:16 + rest_size]))
        order = np.ndarray(count, np.int64, buffer=memory.buf, offset=16 + rest_size)
        source = BatchSource(_worker_split, order, rest["transform"], rest["seed_key"], rest["batch_size"],
                             drop_remainder=False, first_epoch=rest["first_epoch"], epoch_length=rest["epoch_length"])
        source.samples = rest["samples"]
        _worker_plans[plan_name] = (memory, source)
    return _worker_plans[plan_name][1]


def seed_global_streams(source: BatchSource, batch: int) -> None:
    """Seed Python's and NumPy's global streams, which the auto-augment policies draw from, for
    batch ``batch``: the same batch gets the same draws in any worker and after a resume."""
    seed = zlib.crc32(repr((*source.seed_key, source.first_epoch, batch)).encode())
    random.seed(seed)
    np.random.seed(seed)


def _start_worker(split: Split, cpus: tuple[int, ...] | None, parent: int) -> None:
    """A worker process's start: its split, its CPUs, and a watch on its parent."""
    global _worker_split
    _worker_split = split
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    threading.Thread(target=_exit_with, args=(parent,), name="resgarden-parent-watch", daemon=True).start()


PARENT_POLL_SECONDS = 0.5


def _exit_with(parent: int) -> None:
    """Exit this worker once ``parent`` is gone (killed with SIGKILL by the OOM killer or a
    scheduler, it cannot shut its pool down): an orphan would hold its memory and, through the
    resource tracker's pipe, the run's shared-memory segments in /dev/shm."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _fill_slot(plan_name: str, batch: int, slot_name: str) -> tuple[list[int], list[tuple[str, str]]]:
    """In a worker process: build batch ``batch`` of plan ``plan_name`` into the shared-memory slot
    ``slot_name``."""
    source = _worker_source(plan_name)
    if slot_name not in _worker_slots:
        _worker_slots[slot_name] = shared_memory.SharedMemory(name=slot_name)  # unlinked by the parent
    seed_global_streams(source, batch)
    images = np.ndarray(source.batch_shape(batch), np.float32, buffer=_worker_slots[slot_name].buf)
    return source.fill(batch, images)
