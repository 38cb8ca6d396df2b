"""`python -m surgery`: the same as the `surgery` command."""

from surgery.cli import main

main()
