"""A prepared work folder made small enough to carry to the GPU machine, and whole again there.

The semi-supervised dataset of a smaller label budget holds the same scans as the protocol's (a subset, byte for
byte: the same converter wrote them), so carrying both would carry ~15 MiB twice. ``pack`` removes every file of
``nnUNet_raw`` whose bytes another file there already has and lists it in ``prepared/carried_duplicates.json``;
``unpack`` links (or copies) each back from the file that was kept::

    python -m benchmarks.la_semisup.carry pack .gpu/la_work      # here, before carrying
    python -m benchmarks.la_semisup.carry unpack /tmp/la_work    # on the GPU machine, before the queue call
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from nnunet_sassnet.errors import UserInputError, run_cli

MANIFEST = Path("prepared") / "carried_duplicates.json"
PACKED = Path("nnUNet_raw")


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pack(workdir: Path) -> int:
    """Remove the duplicate files under ``workdir/nnUNet_raw`` (listed in the manifest); the bytes saved."""
    manifest = workdir / MANIFEST
    listed = json.loads(manifest.read_text()) if manifest.is_file() else {}
    kept: dict[tuple[int, str], str] = {}
    saved = 0
    for path in sorted(p for p in (workdir / PACKED).rglob("*") if p.is_file()):
        key = (path.stat().st_size, _digest(path))
        relative = str(path.relative_to(workdir))
        if key not in kept:
            kept[key] = relative
            continue
        listed[relative] = kept[key]
        saved += key[0]
        path.unlink()
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(listed, indent=1, sort_keys=True) + "\n")
    return saved


def unpack(workdir: Path) -> int:
    """Put back every file the manifest lists (a hard link to the kept file, else a copy); the number restored."""
    manifest = workdir / MANIFEST
    if not manifest.is_file():
        return 0
    listed = json.loads(manifest.read_text())
    for relative, source in listed.items():
        target, origin = workdir / relative, workdir / source
        if not origin.is_file():
            raise UserInputError(f"{manifest}: {source} is missing, so {relative} cannot be restored; prepare the "
                                 f"work folder again (bash benchmarks/lent_gpu.sh prepare)")
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(origin, target)
        except OSError:
            shutil.copy2(origin, target)
    manifest.unlink()
    return len(listed)


def main(argv: list[str] | None = None) -> int:
    """``pack DIR`` or ``unpack DIR``."""
    args = sys.argv[1:] if argv is None else argv

    def body() -> int:
        if len(args) != 2 or args[0] not in ("pack", "unpack") or not Path(args[1]).is_dir():
            raise UserInputError("usage: python -m benchmarks.la_semisup.carry pack|unpack WORKDIR (a work folder "
                                 "that python -m benchmarks.la_semisup --prepare-only made)")
        workdir = Path(args[1])
        if args[0] == "pack":
            print(f"{workdir}: {pack(workdir) / 2 ** 20:.1f} MiB of duplicate files left out (listed in {MANIFEST})")
        else:
            print(f"{workdir}: {unpack(workdir)} files restored from the files they duplicate")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
