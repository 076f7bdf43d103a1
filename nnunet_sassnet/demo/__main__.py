import sys

from nnunet_sassnet.demo import main

sys.exit(main())
