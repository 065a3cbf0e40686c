"""Build a Wan2.1 T2V pipeline at real size with random weights (no download), for GPU benchmarks.

    python scripts/make_random_model.py OUT_DIR --arch 1.3B     # then: generate.py --model OUT_DIR ...

The transformer and VAE use the published Wan2.1 configs; the text encoder keeps UMT5-XXL's width
(4096, what the transformer reads) but only `--text-layers` layers, and the tokenizer is the tiny
offline one: text encoding is a negligible share of a video's time, and its weights would be noise.
Random weights give random attention structure: use `max_density` to set a benchmark's density.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wan.loading import keep_fp32_modules
from wan.tiny import build_tokenizer

# From Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer/config.json.
ARCHS = {
    "1.3B": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14B": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
COMMON = {
    "patch_size": (1, 2, 2), "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}


def build_random_transformer(arch: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> WanTransformer3DModel:
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes on the CPU
        model = WanTransformer3DModel(**COMMON, **ARCHS[arch]).to(dtype).eval()
    return keep_fp32_modules(model)  # as from_pretrained does


def build_random_pipeline(
    arch: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, text_layers: int = 2, seed: int = 0
) -> WanPipeline:
    if arch not in ARCHS:
        raise ValueError(f"arch: {arch!r} is not known; allowed: {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    transformer = build_random_transformer(arch, device, dtype)
    with torch.device(device):
        text_encoder = UMT5EncoderModel(
            UMT5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=text_layers,
                       num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
        ).to(dtype)
        vae = AutoencoderKLWan().float()  # diffusers' defaults are Wan2.1's VAE
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0 if arch == "1.3B" else 5.0
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                       transformer=transformer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline to (diffusers layout)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="1.3B", help="Wan2.1 architecture (default: 1.3B)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to build")
    parser.add_argument("--text-layers", type=int, default=2, help="UMT5 layers of the text encoder (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args()
    build_random_pipeline(args.arch, args.device, text_layers=args.text_layers, seed=args.seed).save_pretrained(args.out_dir)
    print(f"wrote a random-weight Wan2.1-{args.arch} T2V pipeline to {args.out_dir}")


if __name__ == "__main__":
    main()
