"""Load a Wan or Kandinsky 5 pipeline from the hub or a local diffusers-layout folder: the class its model_index.json
names (`WanPipeline`, `WanImageToVideoPipeline`, `WanVACEPipeline`, `Kandinsky5T2VPipeline`,
`Kandinsky5I2VPipeline`), or for Wan2.2 TI2V (`expand_timesteps`) with an image given a `WanImageToVideoPipeline` (its
image mode).

The transformer can come from elsewhere (`transformer=`): an original-format Wan2.1 checkpoint (the
layout of the Wan2.1 repository, keys such as `blocks.0.self_attn.q.weight`, as the NABLA-finetuned
14B checkpoints are published), converted by diffusers' own single-file loader, or a diffusers
transformer folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.errors import GatedRepoError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError
from safetensors.torch import load_file

from wan.defaults import DEFAULT_MODEL
from wan.models import kandinsky5_facts
from wan.models.spec import ANIMATE_PIPELINE, EXPERT_NAMES, I2V_PIPELINE, T2V_PIPELINE, VACE_PIPELINE, ModelSpec

if TYPE_CHECKING:
    from diffusers import WanImageToVideoPipeline

#: the pipeline classes this project runs, as a model_index.json names them
PIPELINES = (T2V_PIPELINE, I2V_PIPELINE, VACE_PIPELINE, ANIMATE_PIPELINE, *kandinsky5_facts.PIPELINES)
_HOW_TO_GET = (
    f"get weights with `hf download {DEFAULT_MODEL} --local-dir DIR`, "
    "or build an offline demo model with `nabla-wan make-tiny-model DIR`"
)


class ModelNotFoundError(ValueError):
    """The pipeline's files could not be found (local folder missing, or hub id not downloadable/cached)."""


def looks_local(model: str) -> bool:
    """Whether `model` names a local folder (a path, or one that exists) rather than a hub id."""
    return model.startswith((".", "/", "~")) or Path(model).expanduser().exists()


def model_id(model: str) -> str:
    """The model as a run records it (a latent cache's keys, run.json): an absolute folder, or the hub id."""
    return str(Path(model).expanduser().resolve()) if looks_local(model) else model


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def check_transformer_path(path: str | Path) -> Path:
    """Fail early (before any model loads) on a --transformer path that cannot be a checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
            raise ValueError(f"transformer: folder {path} holds neither a config.json (diffusers layout) nor "
                             "*.safetensors shards (original Wan2.1 layout)")
    elif not path.is_file():
        raise ValueError(f"transformer: {path} does not exist; give a checkpoint file or folder")
    elif path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"transformer: {path} is not a checkpoint; allowed: a folder or a file ending in "
                         f"{', '.join(CHECKPOINT_SUFFIXES)}")
    return path


def keep_fp32_modules(model: WanTransformer3DModel) -> WanTransformer3DModel:
    """Put the modules diffusers keeps in float32 (norms, modulation, time embedding, rotary tables) back in float32.

    `from_pretrained` does this; `from_single_file` and plain construction cast everything to one dtype.
    """
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    if model.rope.freqs_cos.dtype != torch.float32:  # buffers, cast down with the model: computed again, exactly
        config = model.config
        model.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len).to(
            model.rope.freqs_cos.device)
    return model


def _drop_fp32_cast_warning(record: logging.LogRecord) -> bool:
    return "should be kept in float32" not in record.getMessage()


def load_transformer(path: str | Path, config_source: str, dtype: torch.dtype) -> WanTransformer3DModel:
    """A Wan2.1 transformer from `path`: a diffusers transformer folder (with config.json), an
    original-format checkpoint file, or a folder of original-format `*.safetensors` shards.

    Original-format weights are converted by diffusers' single-file loader; the architecture comes
    from the transformer config of `config_source` (the pipeline's hub id or folder), so a 14B
    checkpoint needs a 14B pipeline. A checkpoint that does not fit it is a one-line ValueError.
    """
    path = check_transformer_path(path)
    if (path / "config.json").is_file():
        return WanTransformer3DModel.from_pretrained(str(path), dtype=dtype)
    # Shards of one state dict (the 14B comes in six): merged, then converted like a single file.
    checkpoint: str | dict = str(path)
    if path.is_dir():
        checkpoint = {}
        for shard in sorted(path.glob("*.safetensors")):
            checkpoint.update(load_file(shard))
    config = str(Path(config_source).expanduser().absolute()) if looks_local(config_source) else config_source
    # from_single_file casts every module to `dtype` and warns about the float32 ones, which
    # keep_fp32_modules below puts back (casting per weight while loading keeps a 14B's RAM at 2 bytes a
    # weight); other warnings, such as unused checkpoint weights, still reach the user.
    cast_logger = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    cast_logger.addFilter(_drop_fp32_cast_warning)
    try:
        model = WanTransformer3DModel.from_single_file(checkpoint, config=config, subfolder="transformer", dtype=dtype)
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "meta tensor" in first:  # weights the checkpoint lacks stay on the meta device, and casting them fails
            raise ValueError(f"transformer: {path} lacks weights that the transformer of {config_source} needs; "
                             "is it a Wan2.1 text-to-video checkpoint of that architecture?") from e
        raise ValueError(f"transformer: {path} does not fit the transformer of {config_source} ({first[:300]})") from e
    finally:
        cast_logger.removeFilter(_drop_fp32_cast_warning)
    return keep_fp32_modules(model)


def _drop_hub_fallback_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Couldn't connect to the Hub")


def _hub_reason(err: BaseException) -> str:
    """Why a hub model could not be had, whole, on one line. Where the hub could not be asked, diffusers falls
    back to the local cache and keeps the hub's error as the cause of its own."""
    cause = err.__cause__ or err
    if isinstance(cause, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"
    if isinstance(cause, GatedRepoError):
        return "the repository is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
    if isinstance(cause, RepositoryNotFoundError):
        return "the hub has no such repository (or it is private: log in with `hf auth login`)"
    reason = f"{type(cause).__name__}: {' '.join(str(cause).split())}"  # hub messages span lines; ours is one
    return f"the hub could not be asked ({reason}) and the model is not in the local Hugging Face cache" \
        if cause is not err else reason


def _load_local(model: str, dtypes: dict, transformer: str | Path | None, image: bool,
                device_map: str | None = None) -> DiffusionPipeline:
    """A local folder's pipeline, the class its model_index.json names (or TI2V's image mode, with `image`)."""
    path = Path(model).expanduser().absolute()
    if not (path / "model_index.json").is_file():
        what = "is not a diffusers pipeline folder (no model_index.json)" if path.exists() else "does not exist"
        raise ModelNotFoundError(f"model folder {str(path)!r} {what}; {_HOW_TO_GET}")
    components = {} if transformer is None else {"transformer": load_transformer(transformer, model, dtypes["default"])}
    spec = ModelSpec.from_folder(str(path))
    check_pipeline(spec.pipeline, model)
    # real load errors are not "not found"; a TI2V index's expand_timesteps reaches the I2V class as it does WanPipeline
    return pipeline_class(spec, image).from_pretrained(str(path), dtype=dtypes, device_map=device_map, **components)


def check_pipeline(name: str, model: str) -> None:
    """One-line ValueError unless `name` is a pipeline class this project runs."""
    if name not in PIPELINES:
        raise ValueError(f"model: {model} is a {name or 'pipeline of no class'}; allowed: a WanPipeline (text to "
                         f"video), {I2V_PIPELINE} (image to video), {VACE_PIPELINE} (control inputs), "
                         f"{ANIMATE_PIPELINE} (pose and face videos), {kandinsky5_facts.T2V_PIPELINE} or "
                         f"{kandinsky5_facts.I2V_PIPELINE} model")


def pipeline_class(spec: ModelSpec, image: bool) -> type[DiffusionPipeline]:
    """The diffusers class that loads `spec`'s pipeline: the one its index names, or for Wan2.2 TI2V with an image
    (`image`) its image mode, WanImageToVideoPipeline."""
    import diffusers  # the I2V classes only where named: without torchvision, transformers 5 warns on their import

    return getattr(diffusers, I2V_PIPELINE if image and spec.ti2v else spec.pipeline)


def _load_hub(model: str, dtypes: dict, transformer: str | Path | None, image: bool,
              device_map: str | None = None) -> DiffusionPipeline:
    """A hub id's pipeline (the class its index names, one of PIPELINES; others refused), or TI2V's image mode over
    its components, with `image`."""
    pipeline_logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
    pipeline_logger.addFilter(_drop_hub_fallback_warning)  # an error below says it in its one line
    try:
        components = {} if transformer is None else {"transformer": load_transformer(transformer, model,
                                                                                     dtypes["default"])}
        # the class its index names
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtypes, device_map=device_map, **components)
    except (OSError, HFValidationError) as e:  # hub errors (offline, no such repo, missing files) are OSErrors
        raise ModelNotFoundError(f"could not load hub model {model!r}: {_hub_reason(e)}; {_HOW_TO_GET}") from e
    finally:
        pipeline_logger.removeFilter(_drop_hub_fallback_warning)
    check_pipeline(type(pipe).__name__, model)
    if image and isinstance(pipe, WanPipeline) and ModelSpec.from_pipeline(pipe, model).ti2v:  # TI2V, known now
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline(**pipe.components, expand_timesteps=True)
    return pipe


def component_dtypes(device: str | torch.device, dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
    """The dtype of each component as `from_pretrained(dtype=...)` takes them: `dtype` (default: bf16 on CUDA, fp32
    elsewhere), and float32 for the VAE and the CLIP image encoder."""
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    # Wan's VAE is run in fp32 in the reference code and diffusers' examples; bf16 degrades decoding. The image
    # encoder (I2V) runs once a video, in fp32 as in diffusers' examples.
    return {"vae": torch.float32, "image_encoder": torch.float32, "default": dtype}


def load_pipeline(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    transformer: str | Path | None = None,
    image: bool = False,
    vae_dtype: torch.dtype = torch.float32,
) -> WanPipeline | WanImageToVideoPipeline:
    """Load `model` (hub id or local folder) in `dtype` (default: bf16 on CUDA, fp32 elsewhere), the VAE in
    `vae_dtype` (float32 as Wan's reference code runs it; bf16 decodes faster) and the CLIP image encoder in fp32. The class is the one its model_index.json names; a pipeline other than those three is refused.
    With `image` (a first frame will be given), a Wan2.2 TI2V model is a WanImageToVideoPipeline with
    `expand_timesteps`: diffusers' image mode of TI2V-5B, over the same components.

    With `transformer`, the pipeline's transformer is loaded from that checkpoint instead (see
    `load_transformer`); the stock transformer weights are then never read. With `cpu_offload`,
    components stay on the CPU and move to `device` one at a time as they run.
    """
    dtypes = {**component_dtypes(device, dtype), "vae": vae_dtype}
    load = _load_local if looks_local(model) else _load_hub
    pipe = load(model, dtypes, transformer, image, None if cpu_offload else _direct_map(device))
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def _direct_map(device: str) -> str | None:
    """diffusers' device_map for loading straight onto `device`'s GPU (safetensors to GPU memory, no CPU copy of the
    weights first), where it can: its "cuda" is the current GPU."""
    where = torch.device(device)
    if where.type != "cuda" or where.index not in (None, torch.cuda.current_device()):
        return None
    # under torchrun transformers maps "cuda" to LOCAL_RANK's GPU, which ranks sharing one GPU (gloo) do not have
    return None if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "cuda"


def load_encoders(model: str, device: torch.device, spec: ModelSpec) -> DiffusionPipeline:
    """The pipeline without its transformers: tokenizer, text encoder (bf16 on CUDA; Kandinsky 5's two), VAE (float32),
    scheduler, and for image to video the CLIP image encoder (float32, as generate runs it) and its processor where it has them."""
    import diffusers  # the I2V class only where needed: importing it warns without torchvision (transformers 5)

    experts = dict.fromkeys(("transformer",) if spec.kandinsky5 else EXPERT_NAMES)  # None: not loaded
    pipe = getattr(diffusers, spec.pipeline).from_pretrained(model, **experts, dtype=component_dtypes(device))
    return pipe.to(device)
