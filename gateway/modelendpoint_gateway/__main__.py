"""``python -m modelendpoint_gateway``: the same as the console script."""

import sys

from .main import main

sys.exit(main())
