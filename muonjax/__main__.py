"""python -m muonjax: the same as the `muonjax` command."""

import sys

from muonjax.cli import main

sys.exit(main())
