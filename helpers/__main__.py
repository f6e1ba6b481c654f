"""``python -m helpers ...``: the command line lives in :mod:`helpers.cli.main`."""

import sys

from helpers.cli.main import main

sys.exit(main())
