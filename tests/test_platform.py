"""The CPU speed guard: native convolutions or an AVX2 cap on oneDNN, never overriding the user."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from resgarden import native
from resgarden.platform import (
    ISA_VARIABLE,
    cpu_has_avx512,
    decide_isa_cap,
    mindspore_version,
    node_cpus,
    parse_cpu_list,
    plan_data_workers,
)
from resgarden.runtime.distributed import group_by_host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_affected_version_with_avx512_is_capped():
    value, reason = decide_isa_cap({}, "2.10.0", has_avx512=True)
    assert value == "AVX2" and "150x" in reason
    assert decide_isa_cap({}, "2.9.1", has_avx512=True)[0] == "AVX2"


def test_native_convolutions_make_the_cap_unnecessary():
    value, reason = decide_isa_cap({}, "2.10.0", has_avx512=True, native_conv=True)
    assert value is None and "native kernels" in reason


def test_unaffected_cases_are_left_alone():
    assert decide_isa_cap({}, "2.8.0", has_avx512=True)[0] is None
    assert decide_isa_cap({}, "2.10.0", has_avx512=False)[0] is None
    value, reason = decide_isa_cap({ISA_VARIABLE: "ALL"}, "2.10.0", has_avx512=True)
    assert value is None and "set by the user" in reason


def test_cpuinfo_parsing(tmp_path):
    with_avx512 = tmp_path / "a"
    with_avx512.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    without = tmp_path / "b"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_has_avx512(str(with_avx512)) and not cpu_has_avx512(str(without))
    assert not cpu_has_avx512(str(tmp_path / "missing"))


def _isa_after_import(env: dict[str, str]) -> str:
    code = "import os, models; print(os.environ.get('ONEDNN_MAX_CPU_ISA', '<unset>'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_importing_models_applies_the_guard_but_respects_the_user():
    env = {k: v for k, v in os.environ.items() if k != ISA_VARIABLE}
    with_native, _ = decide_isa_cap(env, mindspore_version(), cpu_has_avx512(),
                                    native_conv=native.conv_library()[0] is not None)
    assert _isa_after_import(env) == (with_native or "<unset>")
    without_native, _ = decide_isa_cap(env, mindspore_version(), cpu_has_avx512(), native_conv=False)
    assert _isa_after_import({**env, native.SWITCH_VARIABLE: "0"}) == (without_native or "<unset>")
    assert _isa_after_import({**env, ISA_VARIABLE: "AVX512_CORE"}) == "AVX512_CORE"


def test_native_build_failures_are_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeUnavailable, match="no-such-compiler"):
        native.build_conv_library()
    if shutil.which("g++") is None:
        return
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    with pytest.raises(native.NativeUnavailable, match="compiling broken.cc failed: .*error"):
        native.build_conv_library()
    assert list(tmp_path.glob("native/*")) == []  # no partial library left behind


@pytest.mark.slow
def test_native_library_is_cached_per_setup(tmp_path, monkeypatch):
    if native.conv_library()[0] is None:
        pytest.skip(f"native convolutions unavailable here: {native.conv_library()[1]}")
    monkeypatch.setenv(native.CACHE_VARIABLE, str(tmp_path))
    built = native.build_conv_library()
    assert built.parent == tmp_path / "native" and built.is_file()
    mtime = built.stat().st_mtime_ns
    assert native.build_conv_library() == built and built.stat().st_mtime_ns == mtime


def test_checkpoints_load_when_page_cache_leaves_little_free_memory(tmp_path, monkeypatch):
    """MindSpore 2.10 compares a checkpoint with *free* memory; a busy machine's page cache keeps
    that near zero although many GB are available (seen failing a 224 MB resume in CI)."""
    import mindspore as ms
    import numpy as np

    import models  # noqa: F401  (applies the fix)
    from resgarden.platform import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          200000 kB\nMemAvailable:   22000000 kB\n")
    assert available_memory(str(meminfo)) == 22000000 * 1024 and available_memory(str(tmp_path / "none")) is None
    path = str(tmp_path / "w.ckpt")
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones((512, 1024), np.float32))}], path)  # 2 MB
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 16 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    assert ms.load_checkpoint(path)["w"].shape == (512, 1024)  # 16 free pages: MindSpore's own check refuses


# ---------------------------------------------------------------- data workers on a node of 8 ranks

SOCKETS = [set(range(0, 48)), set(range(48, 96))]  # a 2 x 48-core node


def _numa(cpus):
    return set().union(*(socket for socket in SOCKETS if socket & set(cpus)))


@pytest.mark.parametrize("binding,affinity,cpus", [
    ("OpenMPI default (> 2 ranks: a socket each)", SOCKETS[0], None),
    ("OpenMPI --bind-to none / MPICH / msrun", range(96), None),
    ("srun --cpus-per-task=12", range(12, 24), None),
    ("OpenMPI --bind-to core", {3}, tuple(range(48))),  # workers on the rank's socket, not its one core
])
def test_eight_ranks_share_out_the_nodes_cpus(binding, affinity, cpus):
    plan = plan_data_workers(8, affinity, range(96), numa=_numa)
    assert (plan.workers, plan.cpus) == (12, cpus), binding
    assert plan.reason.startswith("96 CPUs on the node / 8 rank(s) on it")


def test_a_cpu_quota_and_small_nodes():
    assert plan_data_workers(8, range(96), range(96), quota=16.0, numa=_numa).workers == 2
    assert plan_data_workers(8, range(4), range(4), numa=_numa).workers == 1  # at least one each
    assert plan_data_workers(1, range(64), range(64), numa=_numa).workers == 16  # at most 16


def test_cgroup_cpuset_and_quota_are_the_node(tmp_path):
    (tmp_path / "cpuset.cpus.effective").write_text("0-3,8,10-11\n")
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert node_cpus(str(tmp_path)) == ([0, 1, 2, 3, 8, 10, 11], 4.0)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert node_cpus(str(tmp_path))[1] is None
    assert parse_cpu_list("5") == [5] and node_cpus(str(tmp_path / "none"))[0] == list(range(os.cpu_count()))


def test_ranks_are_grouped_by_the_node_they_run_on():
    keys = [[1, 2], [1, 2], [3, 4], [1, 2], [3, 4]]
    assert group_by_host(keys) == [[0, 1, 3], [2, 4]]
