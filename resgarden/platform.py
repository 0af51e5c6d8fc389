"""Process-level platform setup that must happen before MindSpore builds its first kernel: the
device target (``auto``: what the installed MindSpore can run on) and the CPU speed guard.

MindSpore 2.9 and 2.10 bundle a oneDNN whose k x k convolutions (and strided 1x1 convolutions)
take a pathologically slow path when oneDNN may use AVX-512: about 150x slower than with AVX2 on
the same core. Two ways out, decided once per process by :func:`apply_cpu_speed_guard`:

* this project's models run their convolutions on resgarden's native oneDNN kernels
  (``resgarden/native``), which avoid that path and keep AVX-512: then no cap is set;
* where those kernels cannot be built (no C++ compiler, no headers, not Linux x86-64, or
  ``RESGARDEN_NATIVE_CONV=0``), oneDNN is capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``).

A value the user set is never overridden. On GPU and Ascend targets neither happens: the native
kernels are CPU-only, so they are not even compiled there.
"""
from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from resgarden.base.errors import UserError
from resgarden.native import conv_library

logger = logging.getLogger("resgarden")

DEVICE_TARGETS = ("Ascend", "GPU", "CPU")  # auto picks the first this MindSpore can run on

ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
AFFECTED_MINDSPORE = ("2.9.", "2.10.")
_decision: str | None = None


def cpu_has_avx512(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags list avx512f (Linux); False where that cannot be read."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as handle:
            return any(line.startswith("flags") and " avx512f" in line for line in handle)
    except OSError:
        return False


def mindspore_version() -> str:
    """Installed MindSpore version, read without importing MindSpore."""
    try:
        return importlib.metadata.version("mindspore")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def decide_isa_cap(environ: dict[str, str], version: str, has_avx512: bool,
                   native_conv: bool = False) -> tuple[str | None, str]:
    """Pure decision: the value to set (or None) and the reason, for the log."""
    if ISA_VARIABLE in environ:
        return None, f"{ISA_VARIABLE}={environ[ISA_VARIABLE]} was set by the user; left as is"
    if not version.startswith(AFFECTED_MINDSPORE):
        return None, f"MindSpore {version} does not have the slow AVX-512 convolution path; no cap needed"
    if not has_avx512:
        return None, "CPU has no AVX-512; oneDNN's slow AVX-512 convolution path cannot trigger"
    if native_conv:
        return None, (f"MindSpore {version}'s own k x k convolutions are ~150x too slow with AVX-512 on this CPU; "
                      "this project's models run theirs on the native kernels instead, so oneDNN keeps AVX-512 "
                      f"(for other MindSpore convolutions in the process, export {ISA_VARIABLE}=AVX2)")
    return "AVX2", (f"MindSpore {version} runs k x k convolutions ~150x too slow with AVX-512 on CPU; "
                    f"set {ISA_VARIABLE}=AVX2 (export {ISA_VARIABLE}=ALL to opt out)")


def available_device_targets() -> tuple[list[str], str]:
    """(targets whose MindSpore backend plugin loaded in this installation, in DEVICE_TARGETS order;
    MindSpore's own plugin-loading message, for the log). Imports MindSpore; runs no kernel."""
    import mindspore  # noqa: F401  (loads the device plugins)
    from mindspore._c_expression import MSContext

    context = MSContext.get_instance()
    return [t for t in DEVICE_TARGETS if context.is_pkg_support_device(t)], context.load_plugin_error()


def resolve_device_target(requested: str, available: list[str], load_error: str = "") -> str:
    """``requested`` itself if this MindSpore can run on it, the first available for ``auto``;
    else a UserError naming what this installation can run on."""
    if requested == "auto":
        return available[0] if available else "CPU"
    if requested in available:
        return requested
    why = next((line.strip() for line in load_error.splitlines() if requested.lower() in line.lower()), "")
    raise UserError(f"device_target={requested} is not available in this MindSpore installation; it can run on "
                    f"{', '.join(available) or 'nothing'} (--device_target=auto picks {available[0] if available else 'CPU'})"
                    + (f"; MindSpore: {why}" if why else ""))


_target: str | None = None  # the device target this process chose
_guarded_target: str | None = None  # the target the CPU speed guard was applied for


def select_device_target(requested: str = "auto") -> str:
    """Resolve ``requested`` (``auto``, ``CPU``, ``GPU`` or ``Ascend``) against this installation,
    apply the CPU speed guard for it and return it; call before importing the models."""
    global _target
    available, load_error = available_device_targets()
    _target = resolve_device_target(requested, available, load_error)
    apply_cpu_speed_guard(_target)
    return _target


def default_device_target() -> str:
    """The target chosen by :func:`select_device_target`, else what ``auto`` resolves to here."""
    return _target or resolve_device_target("auto", available_device_targets()[0])


MAX_DEFAULT_WORKERS = 16


def available_memory(meminfo_path: str = "/proc/meminfo") -> int | None:
    """Bytes of memory the kernel can hand out now (``MemAvailable``: free plus reclaimable page
    cache); None where that cannot be read."""
    try:
        with open(meminfo_path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fix_checkpoint_memory_check() -> None:
    """MindSpore 2.10's ``load_checkpoint`` refuses a file larger than *free* memory
    (``SC_AVPHYS_PAGES``); on a machine that has written a lot, page cache leaves a few hundred MB
    free of many GB available, and a 200 MB training checkpoint fails to load. Make the check use
    ``MemAvailable`` (where MindSpore has the check at all)."""
    from mindspore.train import serialization

    if hasattr(serialization, "_get_available_memory"):
        serialization._get_available_memory = available_memory


def quiet_cell_teardown() -> None:
    """MindSpore 2.10's ``Cell.__del__`` reads module globals that interpreter shutdown has already
    cleared, so every Cell still alive at exit prints an ``Exception ignored ... AttributeError``
    block. At exit (before that teardown) the destructor becomes a no-op: the process is ending and
    its graph caches go with it."""
    import atexit

    from mindspore import nn

    def silence() -> None:
        nn.Cell.__del__ = lambda self: None

    atexit.register(silence)


@dataclass(frozen=True)
class WorkerPlan:
    """A rank's data loading worker processes and the CPUs they run on."""
    workers: int
    cpus: tuple[int, ...] | None = None  # the workers' CPU affinity; None: the rank's own
    reason: str = ""


def parse_cpu_list(text: str) -> list[int]:
    """Linux's CPU list format (``0-3,8,10-11``) as sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return sorted(cpus)


def node_cpus(cgroup_root: str = "/sys/fs/cgroup") -> tuple[list[int], float | None]:
    """(the CPUs this node gives the job, its CPU-time quota in CPUs or None): the cgroup's cpuset
    (a container's, a Slurm job's), else every online CPU. Not this process's affinity: launchers
    narrow that per rank (OpenMPI binds each rank to a socket, or with ``--bind-to core`` a core)."""
    cpus: list[int] = []
    for name in ("cpuset.cpus.effective", "cpuset/cpuset.effective_cpus", "cpuset/cpuset.cpus"):
        try:
            with open(os.path.join(cgroup_root, name), encoding="ascii") as handle:
                cpus = parse_cpu_list(handle.read())
        except (OSError, ValueError):
            continue
        if cpus:
            break
    quota = None
    try:
        with open(os.path.join(cgroup_root, "cpu.max"), encoding="ascii") as handle:
            limit, period = handle.read().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    return cpus or list(range(os.cpu_count() or 1)), quota


def numa_cpus(cpus: Iterable[int], node_root: str = "/sys/devices/system/node") -> set[int]:
    """The CPUs of the NUMA nodes that hold any of ``cpus`` (``cpus`` themselves where the topology
    cannot be read)."""
    wanted, found = set(cpus), set()
    try:
        nodes = [n for n in os.listdir(node_root) if n.startswith("node") and n[4:].isdigit()]
    except OSError:
        return wanted
    for node in nodes:
        try:
            with open(os.path.join(node_root, node, "cpulist"), encoding="ascii") as handle:
                members = set(parse_cpu_list(handle.read()))
        except (OSError, ValueError):
            continue
        if members & wanted:
            found |= members
    return found or wanted


def plan_data_workers(local_ranks: int, affinity: Iterable[int], node: Iterable[int], quota: float | None = None,
                      numa: Callable[[Iterable[int]], set[int]] = numa_cpus) -> WorkerPlan:
    """This rank's share of its node's CPUs as worker processes (at least 1, at most
    MAX_DEFAULT_WORKERS). Where the launcher bound the rank to fewer CPUs than that share (OpenMPI
    ``--bind-to core``), its workers run on the NUMA node of the rank's CPUs, so that they do not
    all queue on the rank's own core."""
    affinity, node = sorted(set(affinity)), sorted(set(node))
    usable = min(len(node), max(1, math.floor(quota))) if quota else len(node)
    ranks = max(1, local_ranks)
    workers = max(1, min(MAX_DEFAULT_WORKERS, usable // ranks))
    reason = f"{usable} CPUs on the node / {ranks} rank(s) on it"
    if len(affinity) >= workers:
        return WorkerPlan(workers, None, reason)
    near = sorted(numa(affinity) & set(node))
    cpus = tuple(near if len(near) >= workers else node)
    return WorkerPlan(workers, cpus, f"{reason}; the rank is bound to {len(affinity)} CPU(s), so its workers run "
                                     f"on {'its NUMA node' if len(near) >= workers else 'the node'}'s {len(cpus)}")


def default_data_workers(local_ranks: int = 1, launched: bool = False) -> WorkerPlan:
    """This process's worker plan on this machine (:func:`plan_data_workers`), ``local_ranks`` ranks
    sharing the node. A process a launcher started (``launched``) shares the node's CPUs; a single
    process keeps to its own affinity (a user's ``taskset``)."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    node, quota = node_cpus() if launched else (affinity, None)
    return plan_data_workers(local_ranks, affinity, node, quota)


def native_kernels_wanted() -> bool:
    """Whether this process runs on CPU, so this project's native CPU kernels are worth building."""
    apply_cpu_speed_guard()
    return _guarded_target == "CPU"


def apply_cpu_speed_guard(device_target: str | None = None) -> str:
    """For a CPU target: build or find the native convolutions and set ``ONEDNN_MAX_CPU_ISA=AVX2``
    if still needed; on GPU / Ascend nothing is built or set. Idempotent (decided once per process;
    ``device_target`` None: :func:`default_device_target`); returns the decision (the training log states it).

    Must run before MindSpore creates its first CPU kernel; it is called by ``models`` on import
    and by every entry point (:func:`select_device_target`) before the engine is imported.
    """
    global _decision, _guarded_target
    if _decision is not None:
        return _decision
    target = _guarded_target = device_target or default_device_target()
    if target != "CPU":
        _decision = f"device target {target}: native CPU convolutions not built, oneDNN left as it is"
        logger.debug("CPU speed: %s", _decision)
        return _decision
    library, why_not = conv_library()
    value, reason = decide_isa_cap(dict(os.environ), mindspore_version(), cpu_has_avx512(),
                                   native_conv=library is not None)
    if value is not None:
        os.environ[ISA_VARIABLE] = value
    native = f"native oneDNN convolutions on CPU ({library})" if library else f"native convolutions off: {why_not}"
    _decision = f"{native}; {reason}"
    logger.debug("CPU speed: %s", _decision)
    return _decision
