"""``python -m nnfast.bench``: the same as ``nnfast bench``."""

import sys

from .command import main

sys.exit(main())
