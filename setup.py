"""nnunet-sassnet: shape-aware semi-supervised segmentation (SASSNet) as an nnU-Net v2 trainer."""
from setuptools import find_packages, setup

setup(
    name="nnunet-sassnet",
    version="0.1.0",
    description="SASSNet (shape-aware semi-supervised segmentation) trainers for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_sassnet", "nnunet_sassnet.*"]),
    package_data={"nnunet_sassnet": ["data/*.list", "trainers_shim/*.py"]},
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
        "test": ["pytest>=7", "medpy>=0.5", "scikit-image>=0.21"],
    },
    entry_points={
        "console_scripts": [
            "nnunet_sassnet_preprocess_unlabeled=nnunet_sassnet.unlabeled:preprocess_unlabeled_entry",
            "nnunet_sassnet_trainer_dir=nnunet_sassnet.discovery:trainer_dir_entry",
            "nnunet_sassnet_convert_la2018=nnunet_sassnet.conversion:main",
            "nnunet_sassnet_evaluate=nnunet_sassnet.evaluation:main",
            "nnunet_sassnet_demo=nnunet_sassnet.demo:main",
        ]
    },
)
