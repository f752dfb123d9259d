"""`python -m mi_prun.cli ...`: the `mi-prun` command."""

from mi_prun.cli import run

run()
