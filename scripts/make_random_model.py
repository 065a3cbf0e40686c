"""Build a Wan pipeline at real size with random weights (no download), for GPU benchmarks.

    python scripts/make_random_model.py OUT_DIR --arch 1.3B       # then: generate.py --model OUT_DIR ...
    python scripts/make_random_model.py /tmp/i2v14b --arch i2v-14b
    python scripts/make_random_model.py /tmp/vace14b --arch vace-14B   # then: generate.py --model /tmp/vace14b --video ...
    python -c "from PIL import Image; Image.new('RGB', (832, 480), (200, 120, 40)).save('/tmp/first.png')"
    python generate.py --model /tmp/i2v14b --image /tmp/first.png --prompt "a fox" --config configs/nabla-0.7-fast.yaml \\
        --compare --steps 20 --output /tmp/i2v.mp4      # 832x480 x 81: generate.py's defaults

Kandinsky 5 (`--arch k5-lite`, `k5-pro`: wan.models.random_kandinsky5, its 10s checkpoints' NABLA configs) builds
on the GPU in bf16; Pro's transformer is 38 GB on disk. Architectures (`--arch`, ARCHS): Wan2.1 T2V 1.3B and 14B; Wan2.2 T2V-A14B (`a14b`: two 14B experts, `transformer`
for high noise and `transformer_2` for low noise, switched at boundary_ratio 0.875); Wan2.2 TI2V-5B (`ti2v-5b`:
per-token timesteps, `expand_timesteps`, and the 48-channel Wan2.2 VAE, 16x spatial); Wan2.1 I2V-14B 480P
(`i2v-14b`: a WanImageToVideoPipeline whose transformer reads 36 input channels and CLIP image tokens, with a
CLIPVisionModelWithProjection of ViT-H/14's size); Wan2.1 VACE-14B (`vace-14B`: a WanVACEPipeline whose transformer
adds 8 VACE blocks, beside main blocks 0, 5, ..., 35, reading 96 control channels). Transformers, VAEs, schedulers and pipeline flags are the published
ones (Wan-AI/*-Diffusers, as diffusers' scripts/convert_wan_to_diffusers.py writes them). The text encoder keeps
UMT5-XXL's width (4096, what the transformer reads) but only `--text-layers` layers, and the tokenizer is the tiny
offline one: text encoding is a negligible share of a video's time, and its weights would be noise. Random weights
give random attention structure: use `max_density` to set a benchmark's density. On disk (bf16 transformers, the rest
float32): 1.3B 4 GB, 14B 30 GB, a14b 59 GB, ti2v-5b 14 GB, i2v-14b 37 GB, vace-14B about 37 GB (14B's and
3.2B parameters of VACE blocks). The builders live in `wan.models.random`;
this is their command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from wan.models import random_kandinsky5
from wan.models.random import ARCHS, build_random_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline to (diffusers layout)")
    archs = {**ARCHS, **random_kandinsky5.ARCHS}
    parser.add_argument("--arch", choices=list(archs), default="1.3B", help="architecture: " + "; ".join(
        f"{name}: {spec.title}" for name, spec in archs.items()) + " (default: 1.3B)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to build")
    parser.add_argument("--text-layers", type=int, default=2, help="UMT5 layers of the text encoder (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args()
    if args.arch in random_kandinsky5.ARCHS:  # one-layer text encoders of the real widths (--text-layers is Wan's)
        pipe = random_kandinsky5.build_random_pipeline(args.arch, args.device, seed=args.seed)
    else:
        pipe = build_random_pipeline(args.arch, args.device, text_layers=args.text_layers, seed=args.seed)
    pipe.save_pretrained(args.out_dir)
    print(f"wrote a random-weight {archs[args.arch].title} pipeline ({type(pipe).__name__}) to {args.out_dir}")


if __name__ == "__main__":
    main()
