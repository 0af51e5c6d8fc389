"""The check's results and its report: Markdown to paste into an issue, and JSON for scripts."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATUSES = ("pass", "warn", "skip", "fail")  # gathered over ranks as their index


@dataclass
class Result:
    """One check: its status (one of STATUSES), what it measured and one line saying what it means."""
    name: str
    status: str
    note: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    ranks: list[str] = field(default_factory=list)  # every rank's status (a data-parallel job)

    @property
    def code(self) -> int:
        return STATUSES.index(self.status)


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """||value - reference|| / ||reference|| (inf where ``value`` is not finite)."""
    value, reference = np.asarray(value, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
    if not np.all(np.isfinite(value)):
        return float("inf")
    return float(np.linalg.norm(value - reference) / max(np.linalg.norm(reference), 1e-30))


def cpu_model_name(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device_target: str, device_id: int) -> str:
    """The accelerator's name as MindSpore reports it (the Ascend SoC version, the GPU's name), or
    the CPU's model name."""
    if device_target == "CPU":
        return cpu_model_name()
    try:
        if device_target == "Ascend":
            from mindspore._c_expression import MSContext

            return str(MSContext.get_instance().get_ascend_soc_version())
        import mindspore as ms

        return str(ms.hal.get_device_name(device_id, device_target))
    except Exception as exc:  # noqa: BLE001 - a name is nice to have, never a reason to fail
        return f"unknown ({type(exc).__name__})"


def versions(repo_root: str) -> dict[str, str]:
    """resgarden's commit, MindSpore's, NumPy's and Python's versions, and the OS."""
    import mindspore as ms

    try:
        commit = subprocess.run(["git", "-C", repo_root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(resgarden=commit, mindspore=ms.__version__, numpy=np.__version__,
                python=sys.version.split()[0], os=f"{platform.system()} {platform.release()}")


def markdown(results: list[Result], facts: dict[str, Any]) -> str:
    """The report as Markdown: the facts, one table row per check, per-rank statuses when several."""
    lines = ["## resgarden device check", ""]
    lines += [f"- **{key}**: {value}" for key, value in facts.items()]
    lines += ["", "| check | result | numbers | what it means |", "|---|---|---|---|"]
    for result in results:
        numbers = ", ".join(f"{k} {_number(v)}" for k, v in result.numbers.items())
        status = result.status if len(set(result.ranks)) <= 1 else \
            f"{result.status} (ranks: {' '.join(result.ranks)})"
        lines.append(f"| {result.name} | {status} | {numbers} | {result.note} |")
    failed = [r.name for r in results if r.status == "fail"]
    lines += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}**"]
    return "\n".join(lines)


def as_json(results: list[Result], facts: dict[str, Any]) -> str:
    """The report as JSON: the facts, the checks and whether all passed."""
    checks = [dict(name=r.name, status=r.status, note=r.note, numbers=r.numbers, ranks=r.ranks) for r in results]
    return json.dumps(dict(facts, checks=checks, passed=not any(r.status == "fail" for r in results)), indent=2,
                      default=float)


def write(path: str, text: str) -> None:
    """``text`` to ``path`` (its folder created), atomically."""
    from resgarden.base.atomic import write_text

    write_text(path, text + "\n")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
