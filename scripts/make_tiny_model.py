"""The tiny offline Wan pipelines, from a checkout: `python scripts/make_tiny_model.py OUT_DIR [--seed 0] [--family F]`.

It lives in `wan.tiny` (installed as `nabla-wan make-tiny-model OUT_DIR`); this script and its names stay for
the commands and imports that use `scripts.make_tiny_model`.
"""

from wan.tiny import build_tiny_pipeline, build_tokenizer, main, save_tiny_model

__all__ = ["build_tiny_pipeline", "build_tokenizer", "main", "save_tiny_model"]

if __name__ == "__main__":
    main()
