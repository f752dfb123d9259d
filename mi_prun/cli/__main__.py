"""`python -m mi_prun.cli ...`: the `mi-prun` command."""

import sys

from mi_prun.cli import main

sys.exit(main())
