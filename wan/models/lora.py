"""LoRA adapters on Wan's and Kandinsky 5's transformers through peft, saved in diffusers' LoRA format (and Wan's in
the original Wan one too), and loaded for generation.

The saved folder holds `pytorch_lora_weights.safetensors` (peft's LoraConfig as metadata, so rank and alpha survive),
what `WanPipeline.load_lora_weights` reads in anyone's diffusers code, and `wan_lora.safetensors`, the same adapter
in the original Wan key layout (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up`, `alpha`) that
ComfyUI and the Wan repository load. A Kandinsky 5 LoRA is what `Kandinsky5T2VPipeline.load_lora_weights` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import diffusers
import torch
from diffusers import Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel, WanPipeline, WanTransformer3DModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

ADAPTER = "default"  # the name peft gives the adapter that add_adapter adds
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
WAN_WEIGHT_NAME = "wan_lora.safetensors"
#: diffusers' module names of a Wan block -> the original repository's (diffusers' converter, the other way)
_WAN_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
              "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
              "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
              "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def transformer_linear_names(model: str, subfolder: str = "transformer") -> list[str]:
    """Names of the Linear layers of the transformer in `subfolder`, from its config alone (built on the meta device:
    no weights read)."""
    config = WanTransformer3DModel.load_config(model, subfolder=subfolder)  # any config.json reader
    with torch.device("meta"):
        transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    return [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]


def add_lora(transformer: WanTransformer3DModel, rank: int, alpha: float, target_modules: tuple[str, ...],
             blocks: str | None = None) -> None:
    """Freeze the transformer and add a trainable float32 LoRA adapter (B = 0: the model is unchanged at first); with
    `blocks` (a ModuleList's name, Kandinsky 5's `visual_transformer_blocks`) on the targets inside its blocks only."""
    transformer.requires_grad_(False)
    layers = {} if blocks is None else {"layers_pattern": blocks,
                                        "layers_to_transform": list(range(len(getattr(transformer, blocks))))}
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                       init_lora_weights=True, **layers))
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # the base may be bf16; LoRA weights and their Adam state stay float32


def save_lora(folder: str | Path, transformer: WanTransformer3DModel, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write the adapter of `transformer` whose (full, unsharded) weights are `state_dict` in diffusers' format."""
    layers = get_peft_model_state_dict(transformer, state_dict=dict(state_dict), adapter_name=ADAPTER)
    metadata = transformer.peft_config[ADAPTER].to_dict()
    pipeline = Kandinsky5T2VPipeline if isinstance(transformer, Kandinsky5Transformer3DModel) else WanPipeline
    pipeline.save_lora_weights(folder, transformer_lora_layers={k: v.contiguous() for k, v in layers.items()},
                             weight_name=WEIGHT_NAME, transformer_lora_adapter_metadata=metadata)
    wan_layers = wan_format(layers, float(metadata["lora_alpha"]))
    if wan_layers is not None:
        save_file(wan_layers, str(Path(folder) / WAN_WEIGHT_NAME))
    return Path(folder) / WEIGHT_NAME


def wan_format(layers: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor] | None:
    """peft's LoRA weights (`blocks.N.attn1.to_q.lora_A.weight`, ...) in the original Wan layout, each adapted layer
    with its `alpha` (the loaders scale by alpha / rank, as peft does); None where a layer has no Wan name."""
    wan = {}
    for key, tensor in layers.items():
        module, kind = key.rsplit(".lora_", 1)
        block, _, name = module.partition(".")[2].partition(".")
        if not module.startswith("blocks.") or name not in _WAN_NAMES:
            return None
        prefix = f"diffusion_model.blocks.{block}.{_WAN_NAMES[name]}"
        wan[f"{prefix}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor.contiguous()
        wan[f"{prefix}.alpha"] = torch.tensor(alpha)
    return wan


def check_lora_path(path: str | Path) -> tuple[Path, str]:
    """(folder, weight file name) of a LoRA given as a folder holding pytorch_lora_weights.safetensors or as the
    .safetensors file itself, whose header reads whole; a one-line ValueError otherwise (checked before any model
    loads)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    folder, weight_name = (path.parent, path.name) if path.is_file() else (path, WEIGHT_NAME)
    if not (folder / weight_name).is_file() or not weight_name.endswith(".safetensors"):
        raise ValueError(f"lora: {path} is neither a LoRA .safetensors file nor a folder holding {WEIGHT_NAME} "
                         "(what finetune.py and WanPipeline.save_lora_weights write)")
    try:
        with safe_open(str(folder / weight_name), "pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as err:
        raise ValueError(f"lora: {folder / weight_name} cannot be read as safetensors "
                         f"({' '.join(str(err).split())}); is the file whole?") from None
    return folder, weight_name


def load_lora(pipe: WanPipeline, path: str | Path, scale: float = 1.0, fuse: bool = True,
              adapter: str = "lora") -> None:
    """Apply a LoRA (a folder holding pytorch_lora_weights.safetensors, or the file: diffusers' format or the original
    Wan one, `lora_down`/`lora_up`/`alpha`/`diff_b` keys, which diffusers converts) to `pipe` at `scale`.

    fuse=True merges it into the weights and drops the adapter: plain Linear layers again, so generation runs at
    the base model's speed and compiles like it (several LoRAs fuse one after another: their deltas add); fuse=False
    keeps it as a switchable peft adapter named `adapter`.
    """
    folder, weight_name = check_lora_path(path)
    pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter)
    if fuse:
        pipe.fuse_lora(components=["transformer"], lora_scale=scale, adapter_names=[adapter])
        pipe.unload_lora_weights()
    else:
        pipe.set_adapters(adapter, scale)
