"""Precision of the transformer's matmuls: bf16 (as loaded) or FP8 through torchao.

FP8 is torchao's dynamic per-row activation and weight quantization
(`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`), applied with
`torchao.quantization.quantize_` to the Linear layers inside the transformer's blocks only (Wan's `blocks`, Kandinsky
5's `visual_transformer_blocks` but their float32 modulations): the patch
embedding, the time and text embeddings, the modulation tables (`scale_shift_table`, plain
parameters), the norms and `proj_out` keep their precision, as they are small and sensitive.
It needs float8 tensor cores: CUDA compute capability >= 8.9 (Ada, Hopper and later).
"""

from __future__ import annotations

import importlib.util

import torch

PRECISIONS = ("bf16", "fp8")
FP8_CAPABILITY = (8, 9)


def is_block_linear(module: torch.nn.Module, name: str) -> bool:
    """quantize_'s filter: a Linear inside `blocks.N`, Wan VACE's `vace_blocks.N` or Kandinsky 5's
    `visual_transformer_blocks.N` (names are relative to the transformer), but not Kandinsky 5's modulations, which
    diffusers keeps in float32: the repeated blocks hold nearly all the GEMM time; embeddings and the output
    projection stay."""
    blocks = ("blocks.", "vace_blocks.", "visual_transformer_blocks.")
    return isinstance(module, torch.nn.Linear) and name.startswith(blocks) and not name.endswith("modulation.out_layer")


def check_precision(precision: str, device: torch.device | str) -> None:
    """Reject an unknown precision, and FP8 where it cannot run (before any model loads)."""
    if precision not in PRECISIONS:
        raise ValueError(f"config: bad value for 'precision': {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "bf16":
        return
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
        cuda = device.type == "cuda"
        found = f"compute capability {torch.cuda.get_device_capability(device)}" if cuda else device.type
        raise ValueError(f"precision fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada/Hopper), got {found}; "
                         "use precision bf16")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("precision fp8 needs torchao: pip install torchao (or this project's `gpu` extra)")


def apply_precision(transformer: torch.nn.Module, precision: str) -> None:
    """Quantize `transformer`'s block Linear layers to FP8 in place for "fp8"; "bf16" changes nothing."""
    check_precision(precision, next(transformer.parameters()).device)
    if precision == "bf16":
        return
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # set_inductor_config=False: by default torchao turns on inductor's coordinate_descent_tuning (all
    # directions) for the whole process, which benchmarks config variants of every Triton kernel compiled
    # afterwards (per-row amax/quantize reductions, NABLA's mask kernels, ...): the suspected cause of FP8 blocks'
    # long compiles (docs/GPU-FACTS.md).
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=is_block_linear)
