"""``python -m behaviorlens.cli``."""

import sys

from .main import main

sys.exit(main())
