"""``python -m segkit``: the ``segkit`` command."""

import sys

from segkit.cli import main

sys.exit(main())
