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
import os

from resgarden.errors import UserError
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


def default_data_workers(local_ranks: int = 1) -> tuple[int, str]:
    """(data loading workers for one rank, how that was decided): the CPUs this process may run on,
    shared by the ranks on its node, at least 1 and at most MAX_DEFAULT_WORKERS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(MAX_DEFAULT_WORKERS, cpus // max(1, local_ranks)))
    return workers, f"{cpus} CPUs in this process's affinity / {local_ranks} rank(s) on the node"


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
