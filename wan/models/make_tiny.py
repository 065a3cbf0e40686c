"""The `nabla-wan make-tiny-model OUT_DIR [--family F] [--clips DIR]` command: a tiny random Wan (wan.models.tiny) or
Kandinsky 5 (wan.models.tiny_kandinsky5) pipeline saved in diffusers' layout, and optionally clips to fine-tune on."""

from __future__ import annotations

import argparse
from pathlib import Path

from wan.models import tiny, tiny_kandinsky5


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=tiny.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline to (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: 0)")
    families = {**tiny.FAMILIES, **{name: what for name, (what, _) in tiny_kandinsky5.TINY.items()}}
    parser.add_argument("--family", choices=families, default="wan2.1-t2v", help="which architecture: "
                        + "; ".join(f"{name}: {what}" for name, what in families.items()) + " (default: wan2.1-t2v)")
    parser.add_argument("--clips", type=Path, metavar="DIR", help="also write a few short captioned clips to DIR, data "
                        "to try fine-tuning on: nabla-wan finetune train --model OUT_DIR --data DIR --config "
                        "finetune-tiny --output runs/tiny")
    args = parser.parse_args(argv)
    save = tiny_kandinsky5.save_tiny_model if args.family in tiny_kandinsky5.TINY else tiny.save_tiny_model
    out = save(args.out_dir, args.seed, args.family)
    print(f"wrote a tiny {families[args.family]} pipeline to {out}")
    if args.clips is not None:
        print(f"wrote {len(tiny.CLIP_CAPTIONS)} captioned clips to {tiny.write_demo_clips(args.clips)}")


if __name__ == "__main__":
    main()
