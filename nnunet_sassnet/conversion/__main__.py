"""``python -m nnunet_sassnet.conversion``: the same as ``nnunet_sassnet_convert_la2018``."""
import sys

from nnunet_sassnet.conversion import main

sys.exit(main())
