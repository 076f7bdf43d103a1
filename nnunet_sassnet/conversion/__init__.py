"""Dataset converters into nnU-Net v2 raw datasets with an ``imagesUnlabeled/`` folder, and the readers of
split files (case lists and split JSON files) that the converter and the benchmarks share."""
from nnunet_sassnet.conversion.la2018 import (ConversionResult, PreparedConversion, convert_la2018, main,
                                              prepare_la2018)
from nnunet_sassnet.conversion.splits import load_uamt_split, read_case_list, read_split_json

__all__ = ["ConversionResult", "PreparedConversion", "convert_la2018", "prepare_la2018", "load_uamt_split",
           "read_case_list", "read_split_json", "main"]
