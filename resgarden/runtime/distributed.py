"""Data-parallel runs: which launcher started the process, which device each rank takes, MPI ranks
-> MindSpore's dynamic cluster, ``init()``, and the few collectives the training loop needs outside
the graph.

Launchers (:data:`LAUNCHERS`, then msrun):
- ``msrun`` (or dynamic-cluster variables set by hand: ``MS_ROLE``, ``MS_WORKER_NUM``, ...):
  MindSpore's plain ``init()``. msrun also runs the script once as the scheduler, whose ``init()``
  never returns, so nothing with side effects may happen before :func:`init_cluster`.
- OpenMPI ``mpirun``, MPICH / Intel MPI ``mpiexec`` and Slurm ``srun``: their rank variables are
  turned into dynamic-cluster variables (the path msrun takes, on CPU, GPU and Ascend alike), rank 0
  starts the scheduler process and every rank waits until the scheduler accepts connections.
  ``--dist_init=native`` instead hands OpenMPI jobs to MindSpore's own MPI bootstrap, which reads
  OpenMPI's variables only.

Each rank on a GPU / Ascend node takes the device of its local rank (device 0 where the launcher
makes one device visible per rank), set once before ``init()``: MindSpore requires that, and
refuses a second ``set_device``.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from resgarden.base.errors import ConfigError, DistributedError
from resgarden.base.specs import ClusterSpec


@dataclass(frozen=True)
class Launcher:
    """A process launcher known by the variables it gives each process."""
    name: str
    rank_var: str
    size_vars: tuple[str, ...]  # the first one set counts
    local_var: str


# most specific first: mpirun inside a Slurm allocation also sees the allocation's SLURM_* variables
LAUNCHERS = (
    Launcher("OpenMPI", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK"),
    Launcher("MPICH / Intel MPI", "PMI_RANK", ("PMI_SIZE",), "MPI_LOCALRANKID"),
    Launcher("Slurm srun", "SLURM_PROCID", ("SLURM_STEP_NUM_TASKS",), "SLURM_LOCALID"),
)
MSRUN = "msrun"
SUPPORTED_LAUNCHERS = "OpenMPI mpirun, MPICH / Intel MPI mpiexec, Slurm srun or msrun"
# the variable through which each accelerator runtime makes a subset of a node's devices visible
VISIBLE_DEVICES = {"GPU": "CUDA_VISIBLE_DEVICES", "Ascend": "ASCEND_RT_VISIBLE_DEVICES"}
# how long ranks wait for each other to join (MindSpore's MS_TOPO_TIMEOUT): msrun's own default
# (--cluster_time_out); the nodes of a multi-node job rarely start within a minute of each other
JOIN_TIMEOUT_SECONDS = 600
_COLLECTIVE = re.compile(r"AllReduce|AllGather|Broadcast|ReduceScatter|timed out|[Cc]luster|[Hh]eartbeat")
_TIMED_OUT = re.compile(r"(worker|node) (\d+) is the first one timed out")


@dataclass(frozen=True)
class Cluster:
    """This process's place in the job; ``Cluster()`` is a single process."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    device_id: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce_sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks, computed in float32, returned as float64 (the values
        themselves when single)."""
        if not self.distributed:
            return np.asarray(values, dtype=np.float64)
        return _all_reduce_sum(np.asarray(values, dtype=np.float32))

    def gather(self, values) -> np.ndarray:
        """Every rank's float64 vector as one (size, n) array, on every rank."""
        values = np.asarray(values, dtype=np.float64).ravel()
        table = np.zeros((self.size, values.size))
        table[self.rank] = values
        return self.all_reduce_sum(table.ravel()).reshape(self.size, values.size)

    def barrier(self) -> None:
        """Wait until every rank got here."""
        self.all_reduce_sum(np.zeros(1))

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block (downloads, writing the embedded data set) before the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, size), as data loaders take it."""
        return self.rank, self.size


_current = Cluster()  # this process's place, once init_cluster() ran
_scheduler_log: str | None = None  # the log of the scheduler rank 0 started under mpirun


def find_launcher(environ: Mapping[str, str]) -> Launcher | str | None:
    """The MPI / Slurm launcher that started this process, :data:`MSRUN` (msrun or MindSpore's MS_*
    variables set by hand), or None; a ConfigError for a launcher's partial set of variables."""
    if environ.get("MS_ROLE"):
        return MSRUN
    for launcher in LAUNCHERS:
        if launcher.rank_var in environ:
            if launcher.local_var not in environ and _srun_with_pmi(environ):
                return LAUNCHERS[-1]
            if not any(var in environ for var in launcher.size_vars):
                raise ConfigError(f"{launcher.name}: {launcher.rank_var} is set but not {' or '.join(launcher.size_vars)}; "
                                  f"start the job with {SUPPORTED_LAUNCHERS}")
            return launcher
    if "PMIX_RANK" in environ:
        raise ConfigError("a PMIx launcher set PMIX_RANK but no rank variables known here; start the job with "
                          f"{SUPPORTED_LAUNCHERS}")
    return None


def _srun_with_pmi(environ: Mapping[str, str]) -> bool:
    """Whether Slurm's srun started this process through PMI (``srun --mpi=pmi2``): PMI_RANK is
    then Slurm's own rank and only Slurm names the local rank (MPICH's mpiexec sets
    MPI_LOCALRANKID)."""
    return ("SLURM_LOCALID" in environ and "SLURM_STEP_NUM_TASKS" in environ
            and environ.get("PMI_RANK") == environ.get("SLURM_PROCID"))


def launcher_ranks(launcher: Launcher, environ: Mapping[str, str]) -> tuple[int, int]:
    """(rank, size) from the launcher's variables."""
    size_var = next(var for var in launcher.size_vars if var in environ)
    return int(environ[launcher.rank_var]), int(environ[size_var])


def mpi_shared_memory_rank() -> int:
    """This process's rank among the ranks on its node, from MPI's shared-memory split via mpi4py
    (a collective: every rank must call it); for launchers that set no local-rank variable."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()


def launcher_local_rank(launcher: Launcher, environ: Mapping[str, str],
                        fallback: Callable[[], int] = mpi_shared_memory_rank) -> int:
    """This process's rank among the ranks on its node: the launcher's variable, else ``fallback``."""
    if launcher.local_var in environ:
        return int(environ[launcher.local_var])
    return fallback()


def local_device_id(local_rank: int, device_target: str, environ: Mapping[str, str]) -> int:
    """The device a rank takes on its node: its local rank, or 0 where the launcher makes one device
    visible per rank (``CUDA_VISIBLE_DEVICES`` / ``ASCEND_RT_VISIBLE_DEVICES``); a ConfigError where
    the node has fewer visible devices than ranks."""
    variable = VISIBLE_DEVICES.get(device_target)
    if variable is None or variable not in environ:
        return local_rank
    visible = [d for d in environ[variable].split(",") if d.strip()]
    if len(visible) == 1:
        return 0
    if local_rank < len(visible):
        return local_rank
    raise ConfigError(f"local rank {local_rank} has no {device_target} of its own: {variable}={environ[variable]!r} "
                      f"makes {len(visible)} visible; start at most {len(visible)} ranks per node")


@dataclass(frozen=True)
class ClusterPlan:
    """How this process joins the job, decided from the launcher's environment before ``init()``."""
    launcher: str  # a Launcher's name or MSRUN
    path: str  # "dynamic_cluster" or "native"
    rank: int | None = None  # known before init() under MPI / Slurm launchers
    size: int | None = None
    device_id: int | None = None  # None: CPU, msrun's scheduler, or left to MindSpore


def plan_cluster(environ: Mapping[str, str], device_target: str, dist_init: str = "auto",
                 local_rank_fallback: Callable[[], int] = mpi_shared_memory_rank) -> ClusterPlan:
    """Which launcher, which path, which rank and which device; a ConfigError for what is not supported."""
    launcher = find_launcher(environ)
    if launcher is None:
        raise ConfigError("--distribute / --run_distribute=1 needs a launcher: start with "
                          "`mpirun -n N python train.py ...`, `msrun --worker_num=N ... train.py ...` or `srun` "
                          "(or set MindSpore's MS_ROLE / MS_WORKER_NUM / MS_SCHED_HOST / MS_SCHED_PORT)")
    accelerator = device_target != "CPU"
    if launcher == MSRUN:
        # msrun exports each worker's local rank as DEVICE_ID; its scheduler process takes no device
        local = environ.get("DEVICE_ID") if environ.get("MS_ROLE") == "MS_WORKER" else None
        device_id = local_device_id(int(local), device_target, environ) if accelerator and local else None
        return ClusterPlan(MSRUN, "dynamic_cluster", device_id=device_id)
    if dist_init == "native" and launcher.name != "OpenMPI":
        raise ConfigError(f"--dist_init=native: MindSpore's own MPI bootstrap reads OpenMPI's variables only, not "
                          f"{launcher.name}'s; use --dist_init=dynamic_cluster (the default)")
    if dist_init == "native" and not accelerator:
        raise ConfigError("--dist_init=native: MindSpore cannot use MPI on CPU; use --dist_init=dynamic_cluster "
                          "(the default)")
    rank, size = launcher_ranks(launcher, environ)
    device_id = None
    if accelerator:
        device_id = local_device_id(launcher_local_rank(launcher, environ, local_rank_fallback), device_target, environ)
    return ClusterPlan(launcher.name, "native" if dist_init == "native" else "dynamic_cluster", rank, size, device_id)


def join_timeout(environ: Mapping[str, str]) -> int:
    """Seconds the ranks wait for each other to join: ``MS_TOPO_TIMEOUT`` where the user exported it,
    else :data:`JOIN_TIMEOUT_SECONDS`."""
    value = environ.get("MS_TOPO_TIMEOUT", "")
    return int(value) if re.fullmatch(r"\d+", value) else JOIN_TIMEOUT_SECONDS


def dynamic_cluster_env(rank: int, size: int, host: str, port: int, timeout: int,
                        environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MindSpore's dynamic-cluster variables for worker ``rank`` of ``size``: heartbeat timeout
    ``timeout`` (--dist_timeout), join timeout :func:`join_timeout`."""
    return {"MS_ROLE": "MS_WORKER", "MS_NODE_ID": str(rank), "MS_WORKER_NUM": str(size),
            "MS_SCHED_HOST": host, "MS_SCHED_PORT": str(port), "MS_NODE_TIMEOUT": str(timeout),
            "MS_TOPO_TIMEOUT": str(join_timeout(environ or {}))}


def check_port_free(host: str, port: int) -> None:
    """ConfigError when ``host:port`` cannot be bound (another job's scheduler, most likely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a live listener still blocks
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"the scheduler port {host}:{port} is not free ({exc.strerror}); another job "
                              f"may hold it: pick another with --dist_port") from None


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until ``host:port`` accepts a TCP connection; ConfigError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(f"no scheduler answered on {host}:{port} within {timeout:.0f} s; is rank 0 "
                                  f"running, and is --dist_host (MS_SCHED_HOST) its address?") from None
            time.sleep(0.2)


def scheduler_log_path(port: int) -> str:
    """Where rank 0's scheduler process (mpirun on CPU) writes its output."""
    return os.path.join(tempfile.gettempdir(), f"resgarden-scheduler-{port}.log")


def lost_rank(log_text: str) -> int | None:
    """The rank MindSpore's scheduler declared dead first, from its log."""
    match = _TIMED_OUT.search(log_text)
    return int(match.group(2)) if match else None


def start_scheduler(env: dict[str, str], log_path: str) -> subprocess.Popen:
    """MindSpore's scheduler as a child process that ends when its parent (rank 0) does."""
    code = ("import os, threading, time\n"
            f"parent = {os.getpid()}\n"
            "def watch():\n"
            "    while os.getppid() == parent:\n"
            "        time.sleep(0.5)\n"
            "    os._exit(0)\n"
            "threading.Thread(target=watch, daemon=True).start()\n"
            "from mindspore.communication import init\n"
            "init()\n")
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, "-c", code], env={**env, "MS_ROLE": "MS_SCHED"},
                                stdout=log, stderr=subprocess.STDOUT)


def _translate_mpi(spec: ClusterSpec, plan: ClusterPlan, environ: dict[str, str]) -> str | None:
    """Set dynamic-cluster variables from the launcher's ranks; rank 0 starts the scheduler and gets
    its log path back (the other ranks None)."""
    host = spec.dist_host or environ.get("MS_SCHED_HOST") or "127.0.0.1"
    port = int(spec.dist_port)
    environ.update(dynamic_cluster_env(plan.rank, plan.size, host, port, spec.dist_timeout, environ))
    log_path = None
    if plan.rank == 0:
        check_port_free(host, port)
        log_path = scheduler_log_path(port)
        start_scheduler(dict(environ), log_path)
    wait_for_port(host, port, join_timeout(environ))
    return log_path


def place_device(device_target: str, device_id: int | None = None) -> None:
    """``mindspore.set_device`` once per process (MindSpore refuses a second, different call, and
    requires it before ``init()`` and before any Tensor on Ascend); a ConfigError where it fails."""
    import mindspore as ms

    if device_target == "CPU" and ms.get_context("device_target") == "CPU":
        return
    try:
        ms.set_device(device_target, device_id)
    except (RuntimeError, ValueError) as exc:
        where = device_target if device_id is None else f"{device_target} device {device_id}"
        raise ConfigError(f"device_target={where} is not usable here: {str(exc).splitlines()[0]}") from None


def init_cluster(spec: ClusterSpec, environ: dict[str, str] | None = None) -> Cluster:
    """When ``spec.distribute`` is on: place this rank on its device, join the job (a clear error
    without a launcher) and set MindSpore's data-parallel context. Call before anything with side
    effects and before any Tensor or Parameter exists (see module docstring)."""
    global _current, _scheduler_log
    if not spec.distribute:  # a single process: resgarden.runtime.context.set_context placed it
        return Cluster(device_id=spec.device_id or 0)
    environ = os.environ if environ is None else environ
    plan = plan_cluster(environ, spec.device_target, spec.dist_init)
    import mindspore as ms
    from mindspore.communication import get_group_size, get_local_rank, get_rank, init

    if plan.launcher != MSRUN and plan.path == "dynamic_cluster":
        _scheduler_log = _translate_mpi(spec, plan, environ)
    elif plan.launcher == MSRUN:
        environ.setdefault("MS_NODE_TIMEOUT", str(spec.dist_timeout))
    if environ.get("MS_ROLE") != "MS_SCHED":
        place_device(spec.device_target, plan.device_id)
    try:
        init()
    except RuntimeError as exc:  # msrun's scheduler role ends here when a worker dies
        raise DistributedError(describe_failure(exc, spec.dist_timeout)) from None
    rank, size = get_rank(), get_group_size()
    try:
        local_rank = get_local_rank()
    except RuntimeError:  # not every backend knows local ranks
        local_rank = rank
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=size)
    device_id = plan.device_id if plan.device_id is not None else ms.get_current_device().device_id
    _current = Cluster(rank, size, local_rank, f"{plan.launcher}/{plan.path}", device_id)
    return _current


def host_key() -> np.ndarray:
    """This machine as two 16-bit numbers (exact in float32 collectives): CRC-32 of its host name and
    boot id, which every process of one node (one container) shares."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = ""
    crc = zlib.crc32(f"{socket.gethostname()}/{boot}".encode())
    return np.array([crc >> 16, crc & 0xFFFF], dtype=np.float64)


def group_by_host(keys: np.ndarray) -> list[list[int]]:
    """The ranks of each node, nodes in the order of their first rank, from every rank's host key."""
    groups: dict[tuple, list[int]] = {}
    for rank, key in enumerate(keys):
        groups.setdefault(tuple(key), []).append(rank)
    return list(groups.values())


def nodes(cluster: Cluster) -> list[list[int]]:
    """The ranks of each node of the job (a collective: every rank calls it). Launchers do not all
    say how many ranks share a node (msrun does not; srun only with --ntasks-per-node)."""
    if not cluster.distributed:
        return [[0]]
    return group_by_host(cluster.gather(host_key()))


def is_collective_failure(exc: BaseException) -> bool:
    """Whether MindSpore's error comes from a collective operation or the cluster's heartbeat."""
    return bool(_COLLECTIVE.search(str(exc)))


def describe_failure(exc: BaseException, timeout: int, wait: float = 0.0) -> str:
    """One line for a failed collective or a failed ``init()``: which rank was lost, when known
    (MindSpore's message, or the log of the scheduler this process started), and what to check."""
    text = str(exc)
    rank = lost_rank(text)
    deadline = time.monotonic() + wait
    while rank is None and _scheduler_log is not None:
        with contextlib.suppress(OSError), open(_scheduler_log, encoding="utf-8", errors="replace") as handle:
            rank = lost_rank(handle.read())
        if rank is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    first = next((line.strip() for line in text.splitlines() if line.strip().strip("-")), type(exc).__name__)
    who = f"rank {rank} died or stopped answering" if rank is not None else \
        "another rank died or stopped answering (the launcher's output or worker logs name it)"
    return f"data-parallel job stopped: {who}; heartbeat timeout {timeout} s (--dist_timeout). MindSpore: {first}"


def current() -> Cluster:
    """The cluster this process joined (single process until :func:`init_cluster` ran)."""
    return _current


def _flatten(params: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """``params`` as one float32 vector, and their current values (for shapes and dtypes)."""
    values = [p.asnumpy() for p in params]
    return np.concatenate([v.astype(np.float32).ravel() for v in values]), values


def _set_flat(params: list, like: list[np.ndarray], flat: np.ndarray) -> None:
    """Write consecutive slices of ``flat`` into ``params``, in the shapes and dtypes of ``like``."""
    import mindspore as ms

    offset = 0
    for param, value in zip(params, like):
        param.set_data(ms.Tensor(flat[offset:offset + value.size].reshape(value.shape).astype(value.dtype)))
        offset += value.size


def seed_random_ops(seed: int, cluster: Cluster) -> None:
    """Seed the random ops created from here on (dropout, drop path) per rank, so ranks draw their
    own masks (rank 0 those of a single process). Weights drawn afterwards differ per rank too:
    :func:`broadcast_parameters` gives every rank rank 0's."""
    import mindspore as ms

    ms.set_seed(seed + cluster.rank)


def broadcast_parameters(cell, cluster: Cluster) -> None:
    """Give every rank rank 0's parameters (whatever seed or weights file each rank started from)."""
    if not cluster.distributed:
        return
    params = list(cell.get_parameters())
    flat, values = _flatten(params)
    if not cluster.is_main:
        flat[:] = 0.0  # x + 0 is exact: the sum is rank 0's values
    _set_flat(params, values, cluster.all_reduce_sum(flat))


def average_buffers(cell, cluster: Cluster) -> int:
    """Average the BN running statistics (and their EMA copies) of ``cell`` over the ranks, so every
    rank evaluates and checkpoints the same model; returns how many tensors were averaged. Each rank
    normalises with its own batch statistics during the epoch (no synchronised BN). The statistics
    of fixed BatchNorms (``frozen_stages``) are equal on every rank and left exactly as they are."""
    fixed = {p.name for _, bn in cell.cells_and_names() if getattr(bn, "use_batch_statistics", None) is False
             for p in (bn.moving_mean, bn.moving_variance)}
    buffers = [p for p in cell.get_parameters()
               if p.name.endswith(("moving_mean", "moving_variance")) and not p.requires_grad
               and p.name not in fixed and p.name.removeprefix("ema.") not in fixed]
    if not cluster.distributed or not buffers:
        return 0
    flat, values = _flatten(buffers)
    _set_flat(buffers, values, cluster.all_reduce_sum(flat) / cluster.size)
    return len(buffers)


def fingerprint(params: Iterable) -> np.ndarray:
    """CRC-32 of ``params`` (names and values), as two 16-bit halves (exact in float32 collectives)."""
    crc = 0
    for param in params:
        crc = zlib.crc32(param.name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(param.asnumpy()).tobytes(), crc)
    return np.array([crc >> 16, crc & 0xFFFF], dtype=np.float64)


def ranks_out_of_sync(params: Iterable, cluster: Cluster) -> list[int]:
    """The ranks whose ``params`` differ from rank 0's (empty when all ranks hold the same values)."""
    table = cluster.gather(fingerprint(params))
    return [r for r in range(cluster.size) if not np.array_equal(table[r], table[0])]


def _all_reduce_sum(values: np.ndarray) -> np.ndarray:
    import mindspore as ms
    from mindspore import ops

    return ops.AllReduce()(ms.Tensor(values)).asnumpy().astype(np.float64)
