"""What a raw image file holds, computed once per version of the file and kept beside the preprocessed data.

Two fingerprints of a raw scan, each a SHA-256:

* of the file's bytes: the unlabeled data's stamp follows it, so a scan replaced by another of the same size with
  its modification time kept (``cp -p``, ``rsync -t``) is preprocessed again;
* of its decoded voxels with their shape and type (read with the dataset's nnU-Net reader): two files holding the
  same image are found even when they are compressed or named differently (see
  :mod:`~nnunet_sassnet.unlabeled.labeled_copies`).

A file's fingerprints are recomputed only when its version changes: the version is its inode, size, modification
time and status-change time (``st_ctime``, which no copying tool can set: writing a file in place or renaming
another onto it changes it). A ``chmod`` changes it too; then the hash is computed again, and the same content
leaves the stamp as it was. The cache is a JSON file in ``nnUNet_preprocessed/DatasetXXX/`` (where that folder
exists and may be written; else nothing is kept); its cost at 1,000 scans is measured in
``benchmarks/unlabeled_check_cost.py``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

__all__ = ["FINGERPRINT_CACHE_FILE", "FingerprintCache", "fingerprint_cache_for"]

FINGERPRINT_CACHE_FILE = "sassnet_raw_fingerprints.json"
_READ_BYTES = 1024 ** 2


def fingerprint_cache_for(raw_dataset_folder: str) -> "FingerprintCache":
    """The cache of a raw dataset folder: ``$nnUNet_preprocessed/<its name>/`` + :data:`FINGERPRINT_CACHE_FILE`
    when that folder exists, else one kept in memory only."""
    preprocessed = os.environ.get("nnUNet_preprocessed")
    folder = os.path.join(preprocessed, os.path.basename(os.path.normpath(raw_dataset_folder))) \
        if preprocessed else None
    return FingerprintCache(os.path.join(folder, FINGERPRINT_CACHE_FILE)
                            if folder is not None and os.path.isdir(folder) else None)


def _version(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FingerprintCache:
    """Fingerprints of raw image files by path, valid while the file's version (see the module) is unchanged."""

    def __init__(self, cache_file: str | None):
        self.cache_file = cache_file
        self._entries: dict[str, dict] = {}
        self._changed = False
        if cache_file is not None:
            with contextlib.suppress(OSError, ValueError):
                with open(cache_file) as f:
                    loaded = json.load(f)
                if isinstance(loaded, dict):
                    self._entries = loaded

    def _entry(self, path: str) -> dict:
        path = os.path.abspath(path)
        version = _version(path)
        entry = self._entries.get(path)
        if not isinstance(entry, dict) or entry.get("version") != version:
            entry = self._entries[path] = {"version": version}
            self._changed = True
        return entry

    def content_sha256(self, path: str) -> str:
        """SHA-256 of the file's bytes."""
        entry = self._entry(path)
        if "sha256" not in entry:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(_READ_BYTES):
                    digest.update(chunk)
            entry["sha256"] = digest.hexdigest()
            self._changed = True
        return entry["sha256"]

    def image_shape(self, path: str) -> list[int] | None:
        """The voxel grid the file's header declares (SimpleITK, without reading the voxels), with the number of
        components per voxel last; None where SimpleITK cannot read the header."""
        entry = self._entry(path)
        if "shape" not in entry:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            try:
                reader.ReadImageInformation()
                entry["shape"] = [*reader.GetSize(), reader.GetNumberOfComponents()]
            except RuntimeError:
                entry["shape"] = None
            self._changed = True
        return entry["shape"]

    def voxel_sha256(self, path: str, reader) -> str:
        """SHA-256 of the voxels as ``reader`` (an nnU-Net image reader) decodes them, with their shape and type."""
        entry = self._entry(path)
        if "voxels_sha256" not in entry:
            import numpy as np

            images, _ = reader.read_images([path])
            images = np.ascontiguousarray(images)
            digest = hashlib.sha256(json.dumps([list(images.shape), str(images.dtype)]).encode())
            digest.update(memoryview(images).cast("B"))
            entry["voxels_sha256"] = digest.hexdigest()
            self._changed = True
        return entry["voxels_sha256"]

    def save(self) -> None:
        """Keep what was computed (nothing happens where the cache file may not be written)."""
        if self.cache_file is None or not self._changed:
            return
        from nnunet_sassnet.atomic_files import write_json_atomic

        with contextlib.suppress(OSError):
            write_json_atomic(self.cache_file, self._entries)
            self._changed = False
