"""Dataset converters into nnU-Net v2 raw datasets with an ``imagesUnlabeled/`` folder."""
from nnunet_sassnet.conversion.la2018 import convert_la2018, load_uamt_split, main

__all__ = ["convert_la2018", "load_uamt_split", "main"]
