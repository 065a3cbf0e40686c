"""The `nabla-wan` command: `generate`, `finetune` and `make-tiny-model`, each loaded only when it runs."""

from __future__ import annotations

import sys


def _generate(argv: list[str], prog: str) -> int:
    from wan.generate.cli import main

    return main(argv, prog)


def _finetune(argv: list[str], prog: str) -> int:
    from wan.train.cli import main

    return main(argv, prog)


def _make_tiny_model(argv: list[str], prog: str) -> int:
    from wan.models.make_tiny import main as tiny_main  # diffusers and transformers load only for this command

    tiny_main(argv, prog)
    return 0


COMMANDS = {"generate": _generate, "finetune": _finetune, "make-tiny-model": _make_tiny_model}


def console(argv: list[str] | None = None) -> int:
    """`nabla-wan generate ...` (the flags of generate.py), `nabla-wan finetune precompute|train ...` (finetune.py's),
    `nabla-wan make-tiny-model DIR`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nabla-wan {generate,finetune,make-tiny-model} ... (--help after a command for its flags)\n\n"
              "  generate         text- or image-to-video with NABLA sparse attention (the flags of generate.py)\n"
              "  finetune         precompute | train: fine-tune a LoRA or the whole model under NABLA (the flags of\n"
              "                   finetune.py)\n"
              "  make-tiny-model  write a tiny random Wan pipeline (--family wan2.1-t2v, wan2.2-a14b, wan2.1-i2v,\n"
              "                   wan2.1-flf2v, wan2.2-ti2v or wan2.2-i2v-a14b) to a folder: an offline demo model\n"
              "  --version        print the version", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from wan import __version__

        print(f"nabla-wan {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return command(argv[1:], prog=f"nabla-wan {argv[0]}")
