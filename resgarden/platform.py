"""Process-level platform setup that must happen before MindSpore builds its first kernel.

MindSpore 2.9 and 2.10 bundle a oneDNN whose k x k convolutions (and strided 1x1 convolutions)
take a pathologically slow path when oneDNN may use AVX-512: about 150x slower than with AVX2 on
the same core. Two ways out, decided once per process by :func:`apply_cpu_speed_guard`:

* this project's models run their convolutions on resgarden's native oneDNN kernels
  (``resgarden/native``), which avoid that path and keep AVX-512: then no cap is set;
* where those kernels cannot be built (no C++ compiler, no headers, not Linux x86-64, or
  ``RESGARDEN_NATIVE_CONV=0``), oneDNN is capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``).

A value the user set is never overridden.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import sys

from resgarden.native import conv_library

logger = logging.getLogger("resgarden")

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


def apply_cpu_speed_guard() -> str:
    """Build or find the native convolutions, set ``ONEDNN_MAX_CPU_ISA=AVX2`` if still needed
    (idempotent); return the decision, logged at INFO.

    Must run before MindSpore creates its first CPU kernel; it is called by ``models`` on import
    and by every entry point first thing.
    """
    global _decision
    if _decision is None:
        library, why_not = conv_library()
        value, reason = decide_isa_cap(dict(os.environ), mindspore_version(), cpu_has_avx512(),
                                       native_conv=library is not None)
        if value is not None:
            os.environ[ISA_VARIABLE] = value
            if "mindspore" in sys.modules:
                reason += " (MindSpore was already imported: the cap holds only if no kernel ran yet)"
        native = f"native oneDNN convolutions on CPU ({library})" if library else f"native convolutions off: {why_not}"
        _decision = f"{native}; {reason}"
        logger.info("CPU speed: %s", _decision)
    return _decision
