"""``python -m mlprune.cli``: the ``mlprune`` command."""

import sys

from mlprune.cli import main

sys.exit(main())
