"""`python -m lmclean` runs the CLI."""

from lmclean.cli.main import app

app()
