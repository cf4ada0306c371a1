"""`python -m server` is `tova-serve`."""

from server.cli import main

# The engine core process is spawned: it imports this module again as `__mp_main__`.
if __name__ == "__main__":
    main()
