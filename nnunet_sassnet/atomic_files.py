"""Files that readers and kills see whole or not at all: written beside their place, then put there by one rename."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_text_atomic", "write_json_atomic", "partial_path", "save_torch_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through ``.NAME.tmp`` beside it and a rename: a kill leaves the old file or the
    new one, never half of one. The parent folder is made where missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """:func:`write_text_atomic` of ``value`` as indented JSON."""
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def partial_path(path: str | os.PathLike) -> str:
    """Where a file is written before the rename that puts it at ``path``: ``.NAME.partial`` beside it."""
    path = Path(path)
    return str(path.with_name(f".{path.name}.partial"))


def save_torch_atomic(value: Any, path: str | os.PathLike) -> None:
    """``torch.save(value, path)`` through :func:`partial_path` and a rename: a kill during the write (a
    checkpoint takes seconds) leaves the old checkpoint, never a truncated one."""
    import torch

    tmp = partial_path(path)
    torch.save(value, tmp)
    os.replace(tmp, path)
