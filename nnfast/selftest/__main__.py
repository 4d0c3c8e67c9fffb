"""``python -m nnfast.selftest``: the same as ``nnfast selftest``."""

import sys

from . import main

sys.exit(main())
