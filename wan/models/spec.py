"""What a Wan or Kandinsky 5 pipeline is, read once: from a pipeline folder's files (before anything loads) or from a loaded pipeline.

Generation, training, the tiny and random model builders and every check ask a `ModelSpec`, never the files:
- the pipeline class (`WanPipeline`: text to video; `WanImageToVideoPipeline`: image to video; `WanVACEPipeline`:
  video from control inputs, a video, its mask and reference images, or from text alone; `WanAnimatePipeline`: a
  character image moved by a pose video and a face video, or put into a background video);
- its experts: `transformer`, and Wan2.2 A14B's low-noise `transformer_2`, switched at `boundary_ratio`;
- TI2V (`expand_timesteps`: Wan2.2 TI2V-5B's per-token timesteps; with an image, diffusers' image mode);
- the image conditioning: Wan2.1 I2V reads one image's CLIP tokens (`image_dim`), FLF2V two (`pos_embed_seq_len`),
  Wan2.2 I2V none (only the VAE's latents of the frames);
- the patch size and the VAE's spatial scale, so the pixels of a token (16 for Wan2.1, 32 for TI2V's 16x VAE);
- a Kandinsky 5 pipeline (`Kandinsky5T2VPipeline`, `Kandinsky5I2VPipeline`: one transformer, the first frame for I2V)
  with its pipelines' default video and, for a checkpoint trained with NABLA, the sparsity it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nabla.config import SparsityConfig
from wan.models import kandinsky5_facts

T2V_PIPELINE, I2V_PIPELINE, VACE_PIPELINE = "WanPipeline", "WanImageToVideoPipeline", "WanVACEPipeline"
ANIMATE_PIPELINE = "WanAnimatePipeline"
#: the pipeline attributes that hold experts, in the order of the steps they run
EXPERT_NAMES = ("transformer", "transformer_2")
#: the prompt tokens Wan's text encoder reads (WanPipeline's max_sequence_length; the embeddings it was trained on)
MAX_TEXT_TOKENS = 512
#: the VAE's temporal compression (Wan2.1's and Wan2.2's): 4k+1 frames make k+1 latent frames
VAE_TEMPORAL_SCALE = 4
#: Wan2.2 TI2V-5B's own defaults (its published runs: 1280x704, 121 frames at 24 fps) where no flag or config gives one
TI2V_DEFAULTS = {"height": 704, "width": 1280, "frames": 121, "fps": 24}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    model: str  # the hub id or folder, for messages
    pipeline: str  # the diffusers pipeline class that runs it
    experts: tuple[str, ...] = EXPERT_NAMES[:1]
    boundary_ratio: float | None = None
    ti2v: bool = False  # expand_timesteps: per-token timesteps
    #: the CLIP image encoder's images the transformer reads: 0 (none), 1 (Wan2.1 I2V), 2 (Wan2.1 FLF2V)
    clip_images: int = 0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    vae_scale: int = 8  # the VAE's spatial compression
    #: the sparsity the checkpoint was trained with (a Kandinsky 5 of `attention_type: nabla`), else None
    trained_sparsity: SparsityConfig | None = None
    #: Kandinsky 5's `visual_cond`: its transformer reads a first frame's latents and their mask beside the noisy
    #: latents (zeros for text to video)
    visual_cond: bool = False
    #: Wan2.2 Animate's face frames' side in pixels (its motion encoder's `motion_encoder_size`), else None
    face_size: int | None = None

    @property
    def name(self) -> str:
        """What it is, for messages: "Wan2.1 T2V", "Wan2.2 I2V-A14B", "Wan2.2 TI2V-5B", "Kandinsky 5 I2V", ..."""
        if self.kandinsky5:
            return "Kandinsky 5 " + ("I2V" if self.pipeline == kandinsky5_facts.I2V_PIPELINE else "T2V")
        if self.ti2v:
            return "Wan2.2 TI2V-5B"
        if self.clip_images == 2:
            return "Wan2.1 FLF2V"
        if self.animate:
            return "Wan2.2 Animate"
        kind = "I2V" if self.pipeline == I2V_PIPELINE else "VACE" if self.vace else "T2V"
        return f"Wan2.2 {kind}-A14B" if len(self.experts) > 1 else f"Wan2.1 {kind}"

    @property
    def vace(self) -> bool:
        """A Wan VACE model: its transformer also runs VACE blocks on the control latents (video, mask, references)."""
        return self.pipeline == VACE_PIPELINE

    @property
    def animate(self) -> bool:
        """A Wan2.2 Animate model: its character image is --image, its controls a pose and a face video."""
        return self.pipeline == ANIMATE_PIPELINE

    @property
    def kandinsky5(self) -> bool:
        """A Kandinsky 5 model (wan.models.kandinsky5): channels-last latents, its own text encoders and pipelines."""
        return self.pipeline in kandinsky5_facts.PIPELINES

    @property
    def generation_defaults(self) -> Mapping[str, Any]:
        """The video the model's own pipeline makes where no flag or config says otherwise (size, frames, fps), where
        it differs from Wan2.1's."""
        if self.kandinsky5:
            return kandinsky5_facts.GENERATION_DEFAULTS
        return TI2V_DEFAULTS if self.ti2v else {}

    @property
    def image_embeds(self) -> bool:
        """The transformer reads CLIP image tokens (`image_dim`: Wan2.1 I2V and FLF2V)."""
        return self.clip_images > 0

    def timestep_range(self, expert: str) -> tuple[float, float] | None:
        """The timesteps [low, high) that `expert` runs at sampling time; None: all of them."""
        if self.boundary_ratio is None:
            return None
        boundary = self.boundary_ratio * 1000  # the scheduler's num_train_timesteps, as WanPipeline computes it
        return (boundary, math.inf) if expert == "transformer" else (0.0, boundary)

    @property
    def image_frames(self) -> int:
        """The frames a run takes as images: 0 (text to video), 1 (the first: Wan2.1 I2V) or 2 (the first and the
        last: Wan2.1 FLF2V, Wan2.2 I2V). A TI2V model takes an optional first frame (its image mode): 0 here."""
        if self.pipeline in (kandinsky5_facts.I2V_PIPELINE, ANIMATE_PIPELINE):
            return 1
        if self.pipeline != I2V_PIPELINE or self.ti2v:
            return 0
        return 1 if self.clip_images == 1 else 2

    @property
    def image_condition(self) -> bool:
        """The noisy latents go in with the first frame's condition concatenated (WanImageToVideoPipeline's
        `torch.cat([latents, condition], dim=1)`; under expand_timesteps the condition replaces frame 0 instead)."""
        return self.pipeline == I2V_PIPELINE and not self.ti2v

    @property
    def pixels_per_token(self) -> int:
        """A token's side in pixels: the VAE's spatial compression times the transformer's patch."""
        return self.vae_scale * self.patch_size[1]

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The transformer's tokens (frames, rows, columns) of a video of that size."""
        side = self.pixels_per_token
        return (frames - 1) // VAE_TEMPORAL_SCALE + 1, height // side, width // side

    @classmethod
    def from_configs(cls, model: str, index: Mapping[str, Any], transformer: Mapping[str, Any],
                     vae: Mapping[str, Any] | None = None) -> ModelSpec:
        """The spec of a pipeline whose model_index.json is `index`, transformer config `transformer` and VAE config
        `vae` (diffusers' default scale 8 where it has none)."""
        if index.get("_class_name") in kandinsky5_facts.PIPELINES:
            return cls(model, index["_class_name"], patch_size=tuple(transformer.get("patch_size") or (1, 2, 2)),
                       vae_scale=_vae_scale(vae), trained_sparsity=kandinsky5_facts.trained_config(transformer),
                       visual_cond=bool(transformer.get("visual_cond")))
        two = (index.get("transformer_2") or [None])[0] is not None
        clip = 0 if transformer.get("image_dim") is None else 2 if transformer.get("pos_embed_seq_len") else 1
        face = transformer.get("motion_encoder_size") if index.get("_class_name") == ANIMATE_PIPELINE else None
        return cls(model, index.get("_class_name", ""), EXPERT_NAMES[:1 + two],
                   index.get("boundary_ratio") if two else None, bool(index.get("expand_timesteps")), clip,
                   tuple(transformer.get("patch_size") or (1, 2, 2)), _vae_scale(vae), face_size=face)

    @classmethod
    def from_folder(cls, model: str) -> ModelSpec | None:
        """The spec of a local pipeline folder from its files (no diffusers import); None for a hub id or a folder
        without a model_index.json (loading then says what is wrong)."""
        index = _read_json(model, "model_index.json")
        if index is None:
            return None
        return cls.from_configs(model, index, _read_json(model, "transformer/config.json") or {},
                                _read_json(model, "vae/config.json"))

    @classmethod
    def read(cls, model: str) -> ModelSpec:
        """The spec of `model`, a local folder or a hub id, from its configs alone (a hub id's are downloaded, no
        weights); OSError where they cannot be had."""
        from diffusers import DiffusionPipeline, WanTransformer3DModel

        index = DiffusionPipeline.load_config(model)
        # any config.json reader: the component's class only names the file
        parts = {name: WanTransformer3DModel.load_config(model, subfolder=name) for name in ("transformer", "vae")
                 if name in index}
        return cls.from_configs(model, index, parts.get("transformer", {}), parts.get("vae"))

    @classmethod
    def from_pipeline(cls, pipe: Any, model: str) -> ModelSpec:
        """The spec of a loaded pipeline (a hub id's facts are known only now)."""
        index = {**dict(pipe.config), "_class_name": type(pipe).__name__}
        index["transformer_2"] = [None] if getattr(pipe, "transformer_2", None) is None else ["diffusers", "x"]
        vae = {"scale_factor_spatial": getattr(pipe, "vae_scale_factor_spatial", 8)}  # Wan's and Kandinsky 5's
        return cls.from_configs(model, index, dict(pipe.transformer.config), vae)


def scheduler_shift(scheduler_config: Any) -> float:
    """The flow shift a Wan scheduler config samples with: UniPC's and DPM++'s `flow_shift`, FlowMatchEuler's
    `shift`, else 1."""
    return float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0)


def _vae_scale(vae: Mapping[str, Any] | None) -> int:
    """The VAE's spatial compression from its config: Wan's `scale_factor_spatial`, HunyuanVideo's (Kandinsky 5's)
    `spatial_compression_ratio`, else diffusers' default 8."""
    vae = vae or {}
    return vae.get("scale_factor_spatial") or vae.get("spatial_compression_ratio") or 8


def _read_json(model: str, part: str) -> dict[str, Any] | None:
    path = Path(model).expanduser() / part
    return json.loads(path.read_text()) if path.is_file() else None


#: Wan2.1 T2V's facts, where no model is at hand (a benchmark's batches)
T2V = ModelSpec("Wan2.1 T2V", T2V_PIPELINE)
