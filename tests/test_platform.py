"""The CPU speed guard: when it caps oneDNN at AVX2, and that it never overrides the user."""
from __future__ import annotations

import os
import subprocess
import sys

from resgarden.platform import ISA_VARIABLE, cpu_has_avx512, decide_isa_cap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_affected_version_with_avx512_is_capped():
    value, reason = decide_isa_cap({}, "2.10.0", has_avx512=True)
    assert value == "AVX2" and "150x" in reason
    assert decide_isa_cap({}, "2.9.1", has_avx512=True)[0] == "AVX2"


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


def test_importing_models_applies_the_guard_but_respects_the_user():
    env = {k: v for k, v in os.environ.items() if k != ISA_VARIABLE}
    expected, _ = decide_isa_cap(env, __import__("resgarden.platform").platform.mindspore_version(),
                                 cpu_has_avx512())
    assert _isa_after_import(env) == (expected or "<unset>")
    assert _isa_after_import({**env, ISA_VARIABLE: "AVX512_CORE"}) == "AVX512_CORE"
