"""Every file the project writes appears whole or not at all: a temporary file beside the target,
renamed over it only when complete, and removed on any failure."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from resgarden.base.errors import WriteError


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary path beside ``path`` for the caller to write; renamed to ``path`` when the block
    ends normally, deleted when it raises (an OSError becomes a one-line :class:`WriteError`).
    Temporary names start with ``.<name>.`` (see :func:`remove_stale`). ``suffix`` keeps writers
    that insist on an extension (``.ckpt``, ``.png``) happy. The parent folder is created if needed."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix or ".partial", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, permissions: the earlier file at ``path`` is untouched
        raise WriteError(path, exc) from None
    finally:
        _remove_with_derived(tmp)


def _remove_with_derived(tmp: str) -> None:
    """Remove ``tmp`` and the files a writer derived from its name (MindSpore's ``save_checkpoint``
    writes ``<tmp stem>.tmp`` first and leaves it when the disk fills): the random stem is ours alone."""
    directory, stem = os.path.split(os.path.splitext(tmp)[0])
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(stem):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


def write_text(path: str, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """A staging folder beside ``path`` for the caller to fill; renamed to ``path`` when the block
    ends normally, deleted with its contents when it raises."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale(directory: str) -> list[str]:
    """Remove temporary files a killed process left in ``directory`` (``.<name>.*`` beside a
    writer's target, MindSpore's ``.tmp`` of one, and the ``.tmp-*`` ones of earlier versions);
    returns their names."""
    if not os.path.isdir(directory):
        return []
    stale = [f for f in os.listdir(directory) if f.startswith(".") and (f.startswith(".tmp-") or f.endswith(
        (".partial", ".part", ".ckpt", ".png", ".so", ".tmp"))) and os.path.isfile(os.path.join(directory, f))]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return stale
