"""The tiny offline Wan pipelines, from a checkout: `python scripts/make_tiny_model.py OUT_DIR [--seed 0] [--family F]`.

The code lives in `wan.tiny` (installed as `nabla-wan make-tiny-model OUT_DIR`); this is the checkout's command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/make_tiny_model.py` from anywhere

from wan.tiny import main

if __name__ == "__main__":
    main()
