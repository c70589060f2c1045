"""``python -m fparams.demo``."""

import sys

from . import main

sys.exit(main())
