"""`python -m tunery` runs the CLI."""

from tunery.cli import main

main()
