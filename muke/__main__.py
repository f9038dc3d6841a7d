"""`python -m muke ...`: the muke command line (muke.cli)."""

import sys

from muke.cli import main

sys.exit(main())
