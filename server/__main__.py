"""`python -m server` is `tova-serve`."""

from server.cli import main

main()
