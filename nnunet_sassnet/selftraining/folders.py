"""nnU-Net's three folders, its datasets in them, and the names and IDs of the students' datasets."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from nnunet_sassnet.errors import UserInputError

__all__ = ["NnunetFolders", "dataset_id_of", "student_dataset_name", "link_file"]

#: nnU-Net's dataset folder names: ``DatasetXXX_Name`` with a three-digit ID
DATASET_NAME = re.compile(r"Dataset(\d{3})_(.+)")


def link_file(source: str | Path, target: Path) -> None:
    """``target`` as a hard link of ``source`` (a copy across file systems), put in place by one rename; one that
    is a link of ``source`` already is kept."""
    if target.exists() and os.path.samefile(source, target):
        return
    tmp = target.with_name(f".{target.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def dataset_id_of(name: str) -> int:
    return int(DATASET_NAME.fullmatch(name).group(1))


def student_dataset_name(dataset_id: int, base: str, round_number: int) -> str:
    """``DatasetXXX_<base>`` for round 1, ``DatasetXXX_<base>_round<k>`` for the later rounds."""
    return f"Dataset{dataset_id:03d}_{base}" + (f"_round{round_number}" if round_number > 1 else "")


@dataclass(frozen=True)
class NnunetFolders:
    """``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` as this process's environment sets them."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def from_environment(cls) -> "NnunetFolders":
        missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
        if missing:
            raise UserInputError(f"{', '.join(missing)} not set: nnU-Net's folders must be set as for nnUNetv2_train "
                                 f"(export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...)")
        return cls(*(Path(os.environ[v]).resolve() for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")))

    def holders(self, dataset_id: int) -> list[Path]:
        """The folders named ``DatasetXXX_*`` for this ID in any of the three folders."""
        prefix = f"Dataset{dataset_id:03d}_"
        return [p for base in (self.raw, self.preprocessed, self.results) if base.is_dir()
                for p in sorted(base.iterdir()) if p.name.startswith(prefix) and p.is_dir()]

    def dataset_name(self, name_or_id: str) -> str:
        """nnU-Net's name of a dataset given by ID or name (nnU-Net's own lookup), which must be in nnUNet_raw."""
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        try:
            name = maybe_convert_to_dataset_name(name_or_id)
        except (RuntimeError, ValueError) as e:
            raise UserInputError(f"-d {name_or_id}: {' '.join(str(e).split()[:16])}...; give the ID or name of a "
                                 f"dataset in {self.raw}") from None
        if not (self.raw / name / "dataset.json").is_file():
            raise UserInputError(f"{self.raw / name / 'dataset.json'} not found: self-training reads the labeled "
                                 f"and the unlabeled scans of the dataset's raw folder; put it there")
        return name

    def next_free_id(self, after: int) -> int:
        """The first ID above ``after`` (wrapping round to 1) that no dataset in the three folders uses."""
        for candidate in [*range(after + 1, 1000), *range(1, after)]:
            if not self.holders(candidate):
                return candidate
        raise UserInputError("every dataset ID from 1 to 999 is taken; pass --student-dataset with one to reuse")

    def remove_dataset(self, name: str) -> None:
        """Delete a student's dataset from the three folders (``--force``); its raw folder, which holds the
        round's record, last."""
        for base in (self.results, self.preprocessed, self.raw):
            if (base / name).is_dir():
                shutil.rmtree(base / name)
