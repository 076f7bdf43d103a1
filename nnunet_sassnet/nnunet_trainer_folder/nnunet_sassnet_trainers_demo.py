"""The demo's trainers for nnU-Net's external trainer lookup (``nnUNet_extTrainer``); see
``nnunet_sassnet_trainers.py`` beside this file."""
from nnunet_sassnet.demo.trainers import *  # noqa: F401,F403
