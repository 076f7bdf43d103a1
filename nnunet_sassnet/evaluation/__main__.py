"""``python -m nnunet_sassnet.evaluation``: the same as ``nnunet_sassnet_evaluate``."""
import sys

from nnunet_sassnet.evaluation.cli import main

sys.exit(main())
