"""`python generate.py ...` in a checkout: the same command as `nabla-wan generate ...` (wan/generate/cli.py)."""

import sys

from wan.generate.cli import main

if __name__ == "__main__":
    sys.exit(main())
