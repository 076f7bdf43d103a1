"""``python -m nnunet_sassnet.demo``: the same as the ``nnunet_sassnet_demo`` command."""
import sys

from nnunet_sassnet.demo import main

sys.exit(main())
