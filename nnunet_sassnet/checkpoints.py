"""Reading nnU-Net checkpoints without running code from them (``torch.load(weights_only=True)``).

nnU-Net itself loads checkpoints with ``weights_only=False``: unpickling such a file can run any code it names.
Where this package reads a checkpoint itself, it reads it with :func:`load_weights_only`.
"""
from __future__ import annotations

from pathlib import Path

from nnunet_sassnet.errors import UserInputError


def load_weights_only(path: str | Path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of an nnU-Net checkpoint: tensors and plain values, no code.

    nnU-Net's checkpoints hold numpy scalars in their logs; those numpy types are allowed as well, nothing else.
    A file that needs anything more is refused with a :class:`UserInputError`.
    """
    import numpy as np
    import torch

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 renamed np.core
    numpy_types = [np.dtype, multiarray.scalar,
                   *{type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "b1")}]
    try:
        with torch.serialization.safe_globals(numpy_types):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable or unsafe file is the user's input
        reason = " ".join(str(e).split())[:200]
        raise UserInputError(f"{path}: cannot be read as a checkpoint of tensors and plain values ({reason}); "
                             f"load only checkpoints you trained yourself or got from someone you trust") from e
