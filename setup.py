"""nnunet-sassnet: shape-aware semi-supervised segmentation (SASSNet) as an nnU-Net v2 trainer."""
import os
import runpy

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# discovery.py imports only os and sys: read it without importing the package (whose dependencies may be missing)
_discovery = runpy.run_path(os.path.join(HERE, "nnunet_sassnet", "discovery.py"))
STARTUP_FILE = _discovery["STARTUP_FILE"]


def _write_startup_file(folder: str, folder_expression: str) -> None:
    with open(os.path.join(folder, STARTUP_FILE), "w", encoding="utf-8") as f:
        f.write(_discovery["startup_line"](folder_expression))


class BuildPyWithStartupFile(build_py):
    """Wheels: the startup file at the top of the wheel, that is, in site-packages beside the package.

    It finds the trainer folder from ``sitedir``, the folder Python reads it from (see discovery.py).
    """

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            _write_startup_file(self.build_lib,
                                f"os.path.join(sitedir, 'nnunet_sassnet', {_discovery['TRAINER_FOLDER']!r})")


CMDCLASS = {"build_py": BuildPyWithStartupFile}

try:  # setuptools >= 64 (PEP 660); older ones install editable copies without the startup file
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithStartupFile(editable_wheel):
        """Editable installs (``pip install -e``): the startup file names this checkout's trainer folder."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            _write_startup_file(str(unpacked_wheel), repr(os.path.join(HERE, "nnunet_sassnet",
                                                                       _discovery["TRAINER_FOLDER"])))
            return result

    CMDCLASS["editable_wheel"] = EditableWheelWithStartupFile
except ImportError:
    pass

setup(
    name="nnunet-sassnet",
    version="0.1.0",
    description="SASSNet (shape-aware semi-supervised segmentation) trainers for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_sassnet", "nnunet_sassnet.*"]),
    package_data={"nnunet_sassnet": ["data/*.list", "nnunet_trainer_folder/*.py"]},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.3",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "batchgenerators>=0.25",
        "acvl-utils>=0.2",
        "h5py>=3.8",
        # exact, multi-threaded Euclidean distance transform: the SDM targets on the CPU
        "edt>=2.3",
    ],
    extras_require={
        # medpy and scikit-image are the published reference implementations the tests compare against
        # pytest-timeout: the per-test limit set in pytest.ini
        "test": ["pytest>=7", "pytest-timeout>=2.1", "medpy>=0.5", "scikit-image>=0.21"],
    },
    cmdclass=CMDCLASS,
    entry_points={
        "console_scripts": [
            "nnunet_sassnet_preprocess_unlabeled=nnunet_sassnet.unlabeled:preprocess_unlabeled_entry",
            "nnunet_sassnet_trainer_dir=nnunet_sassnet.discovery:trainer_dir_entry",
            "nnunet_sassnet_convert_la2018=nnunet_sassnet.conversion:main",
            "nnunet_sassnet_evaluate=nnunet_sassnet.evaluation.cli:main",
            "nnunet_sassnet_demo=nnunet_sassnet.demo:main",
            "nnunet_sassnet_export_plain=nnunet_sassnet.export:main",
            "nnunet_sassnet_selftrain=nnunet_sassnet.selftraining:main",
        ]
    },
)
