"""The tiny offline Wan pipelines, from a checkout: `python scripts/make_tiny_model.py OUT_DIR [--seed 0] [--family F]`.

The code lives in `wan.models.make_tiny` (installed as `nabla-wan make-tiny-model OUT_DIR`); this is the checkout's command.
"""

from wan.models.make_tiny import main

if __name__ == "__main__":
    main()
