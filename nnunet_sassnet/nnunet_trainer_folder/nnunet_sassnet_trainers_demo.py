"""The demo's trainers for nnU-Net's external trainer lookup (``nnUNet_extTrainer``); see
``nnunet_sassnet_trainers.py`` beside this file. Importing them imports the demo's trainers and its settings
(:mod:`nnunet_sassnet.demo.config`), not its data generator, pipeline or figure (tests/test_discovery.py)."""
from nnunet_sassnet.demo.trainers import *  # noqa: F401,F403
