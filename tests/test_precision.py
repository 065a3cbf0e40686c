"""precision: bf16 | fp8 — which Linear layers FP8 quantizes, the refusals, and (on a GPU) its error."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from wan.models.tiny import build_tiny_pipeline
from wan.speedups.precision import apply_precision, check_precision, is_block_linear


def test_filter_selects_the_block_linears_only():
    transformer = build_tiny_pipeline().transformer
    chosen = {name for name, module in transformer.named_modules() if is_block_linear(module, name)}
    layers = len(transformer.blocks)
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"}
    assert chosen == {f"blocks.{i}.{name}" for i in range(layers) for name in per_block}
    linears = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    kept = linears - chosen  # embeddings and the output projection keep their precision
    assert "proj_out" in kept and any(name.startswith("condition_embedder.time_embedder") for name in kept)
    assert any(name.startswith("condition_embedder.text_embedder") for name in kept)
    assert not is_block_linear(transformer.blocks[0].norm2, "blocks.0.norm2")


def test_filter_takes_the_vace_blocks_too(vace_model):
    from diffusers import WanVACETransformer3DModel

    transformer = WanVACETransformer3DModel.from_pretrained(vace_model / "transformer")
    chosen = {name for name, module in transformer.named_modules() if is_block_linear(module, name)}
    assert {"vace_blocks.0.attn1.to_q", "vace_blocks.0.proj_out", "blocks.0.ffn.net.2"} <= chosen
    assert not any(name.startswith(("proj_out", "condition_embedder", "vace_patch")) for name in chosen)


def test_bf16_changes_nothing():
    transformer = build_tiny_pipeline().transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    modules = [type(m) for m in transformer.modules()]
    apply_precision(transformer, "bf16")
    assert [type(m) for m in transformer.modules()] == modules
    after = transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_precision_and_fp8_without_gpu_are_refused():
    with pytest.raises(ValueError, match="bad value for 'precision': 'fp16'; allowed: bf16, fp8"):
        check_precision("fp16", "cpu")
    check_precision("bf16", "cpu")
    transformer = build_tiny_pipeline().transformer  # on the CPU
    with pytest.raises(ValueError, match=r"^precision fp8 needs a CUDA GPU of compute capability >= 8.9 .*got cpu"):
        apply_precision(transformer, "fp8")


needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 matmuls need a CUDA GPU of compute capability >= 8.9",
)


@needs_fp8_gpu
def test_fp8_block_within_5_percent_of_bf16():
    """One block of Wan's structure (dims multiples of 16, as FP8 matmuls need), same weights, bf16 vs FP8."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=512, freq_dim=256, ffn_dim=2048, num_layers=1,
    ).to("cuda", torch.bfloat16)
    block = transformer.blocks[0]
    hidden = torch.randn(1, 1024, 512, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 64, 512, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(1, 6, 512, device="cuda", dtype=torch.bfloat16) * 0.1
    rope = transformer.rope(torch.zeros(1, 16, 1, 64, 64, device="cuda"))  # 1 x 32 x 32 = 1024 tokens
    with torch.inference_mode():
        reference = block(hidden, text, temb, rope).float()
        apply_precision(transformer, "fp8")
        assert type(block.attn1.to_q.weight).__name__ == "Float8Tensor"
        assert type(transformer.proj_out.weight) is torch.nn.Parameter
        quantized = block(hidden, text, temb, rope).float()
    error = (quantized - reference).norm() / reference.norm()
    assert 0 < error < 0.05, f"relative error {error:.4f}"
