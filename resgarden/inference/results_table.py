"""One row per validation run in a CSV table (``validate.py --results_csv``), as timm's results
tables: the model, its weights and eval transform, the scores, its size and speed."""
from __future__ import annotations

import csv
import io
import os
from typing import Any

from resgarden.base.atomic import write_text
from resgarden.base.errors import ConfigError

COLUMNS = ("model", "weights", "image_size", "crop_pct", "interpolation", "top1", "top5", "real_top1",
           "param_count", "img_s", "count")


def append_result(path: str, row: dict[str, Any]) -> None:
    """Append ``row`` (COLUMNS) to the table at ``path``, writing the header into a new file; the file
    is replaced whole, so an interruption leaves the old table. ConfigError when the existing file
    has other columns."""
    existing = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as handle:
            existing = handle.read()
        header = next(csv.reader(io.StringIO(existing)), None)
        if header and tuple(header) != COLUMNS:
            raise ConfigError(f"--results_csv {path} has other columns ({', '.join(header)}): "
                             "give a new file")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if not existing:
        writer.writerow(COLUMNS)
    elif not existing.endswith("\n"):
        out.write("\n")
    writer.writerow([_cell(row.get(column)) for column in COLUMNS])
    write_text(path, existing + out.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
