"""Fine-tune Wan under NABLA in a checkout: `python finetune.py precompute|train ...` is `nabla-wan finetune ...`."""

import sys

from wan.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
