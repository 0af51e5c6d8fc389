"""Native CPU kernels for MindSpore, compiled on first use into one library and cached.

``onednn_conv.cc`` runs 2-D convolutions (forward and both gradients) through the oneDNN library
that MindSpore itself bundles, but lets oneDNN pick blocked memory layouts, which MindSpore's own
CPU convolution does not: on AVX-512 CPUs that is the difference between oneDNN's direct AVX-512
kernels and, with MindSpore 2.9/2.10, a reference path ~150x slower (see README, "CPU speed").
The library is built with the system C++ compiler against the oneDNN headers from the
``onednn-devel-cpu-gomp`` wheel and linked to MindSpore's own ``libdnnl.so.3``. Beside it, on the
same thread pool (``runtime.h``): training-mode BatchNorm with its ReLU (``batchnorm.cc``),
ResNeSt's radix reductions (``split_attention.cc``), the 3x3 max pool (``max_pool.cc``) and the
average pools of the blocked layout (``avg_pool.cc``).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from resgarden.base.atomic import atomic_path

SOURCES = tuple(Path(__file__).with_name(name) for name in
                ("onednn_conv.cc", "batchnorm.cc", "split_attention.cc", "max_pool.cc", "avg_pool.cc"))
HEADERS = (Path(__file__).with_name("runtime.h"),)
SWITCH_VARIABLE = "RESGARDEN_NATIVE_CONV"  # "0" turns the native convolutions off
CACHE_VARIABLE = "RESGARDEN_CACHE"  # shared with the downloaded weights
BUILD_TIMEOUT_S = 300
FLAGS = ("-O2", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


class NativeUnavailable(RuntimeError):
    """The native library cannot be used here; the message says why, for the log."""


def mindspore_lib_dir() -> Path:
    """MindSpore's bundled library folder (found without importing MindSpore)."""
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        raise NativeUnavailable("MindSpore is not installed")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not (lib_dir / "libdnnl.so.3").is_file():
        raise NativeUnavailable(f"this MindSpore build has no oneDNN 3 library ({lib_dir}/libdnnl.so.3)")
    return lib_dir


def onednn_include_dir() -> Path:
    """A folder holding ``oneapi/dnnl/dnnl.hpp`` (the requirements install one into the environment)."""
    candidates = [Path(sysconfig.get_path("data")) / "include", Path(sys.prefix) / "include",
                  Path("/usr/local/include"), Path("/usr/include")]
    for folder in candidates:
        if (folder / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
            return folder
    raise NativeUnavailable("no oneDNN headers found (pip install -r requirements.txt installs them)")


def cache_dir() -> Path:
    root = os.environ.get(CACHE_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache", "resgarden")
    return Path(root) / "native"


def _compiler() -> str:
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise NativeUnavailable(f"C++ compiler {wanted!r} (CXX) not found" if wanted
                                else "no C++ compiler found (install g++ or set CXX)")
    return compiler


def _names() -> str:
    return ", ".join(path.name for path in SOURCES)


def build_conv_library() -> Path:
    """Path of the compiled native library, building it if this setup has none cached yet.

    The cache key covers the sources, the compiler, the headers and MindSpore's version, so an
    upgrade of any of them rebuilds. Concurrent builds (every rank of a job) are safe: each
    compiles to its own temporary file and renames it into place.
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise NativeUnavailable(f"native kernels are built for Linux x86-64 only, not {sys.platform} {platform.machine()}")
    lib_dir, include_dir, compiler = mindspore_lib_dir(), onednn_include_dir(), _compiler()
    version_header = include_dir / "oneapi" / "dnnl" / "dnnl_version.h"
    key = hashlib.sha256()
    for part in (*(path.read_bytes() for path in SOURCES + HEADERS), " ".join(FLAGS).encode(),
                 compiler.encode(), str(lib_dir).encode(),
                 importlib.metadata.version("mindspore").encode(), version_header.read_bytes()):
        key.update(part)
    target = cache_dir() / f"resgarden_native-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        with atomic_path(str(target), suffix=".so") as partial:
            command = [compiler, *FLAGS, f"-I{include_dir}", *map(str, SOURCES), "-o",
                       partial, f"-L{lib_dir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib_dir}", "-pthread"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
            if result.returncode != 0:
                first_error = next((line for line in result.stderr.splitlines() if "error" in line),
                                   result.stderr.strip())
                raise NativeUnavailable(f"compiling {_names()} failed: {first_error[:300]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeUnavailable(f"compiling {_names()} failed: {exc}") from None
    return target


_conv_library: tuple[Path | None, str] | None = None


def conv_library() -> tuple[Path | None, str]:
    """(library path or None, why not), decided once per process; ``RESGARDEN_NATIVE_CONV=0`` opts out."""
    global _conv_library
    if _conv_library is None:
        if os.environ.get(SWITCH_VARIABLE, "1") == "0":
            _conv_library = (None, f"{SWITCH_VARIABLE}=0")
        else:
            try:
                _conv_library = (build_conv_library(), "")
            except NativeUnavailable as exc:
                _conv_library = (None, str(exc))
    return _conv_library
