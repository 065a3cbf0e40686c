"""Image to video: the input images (read with PIL) and which Wan models take them.

A WanImageToVideoPipeline model needs a first frame (`--image`). Wan2.1 I2V's transformer also reads its CLIP image
encoder's tokens of that one image; Wan2.1 FLF2V's has position embeddings for two (`pos_embed_seq_len`), the first
and the last frame (`--last-image`); Wan2.2 I2V's reads no image tokens (`image_dim` None), only the VAE's latents of
the frames, a last one included. Text-to-video models (WanPipeline) take no image, except Wan2.2 TI2V-5B
(`expand_timesteps`): given a first frame, it runs as diffusers' WanImageToVideoPipeline over the same components (its
image mode); a last frame it does not take.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wan.model_index import local_config

if TYPE_CHECKING:
    from PIL import Image

I2V_PIPELINE = "WanImageToVideoPipeline"
_I2V_EXAMPLE = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
_FLF2V_EXAMPLE = "Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers"


def read_image(path: str | Path, flag: str) -> Image.Image:
    """The image at `path` in RGB, read whole; a file that is missing or that PIL cannot read is a one-line ValueError
    naming `flag` (--image, --last-image)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ValueError(f"{flag}: {path} {what}; give an image file (PNG, JPEG, WebP, ...)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not in the pipeline
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{flag}: {path} cannot be read as an image (PIL: {reason}); give a PNG, JPEG, WebP, ... "
                         "file") from e


def image_frames(pipeline: str, transformer: Mapping[str, Any]) -> int:
    """How many frames a pipeline of class `pipeline` whose transformer has config `transformer` takes as images:
    0 (text to video), 1 (the first: Wan2.1 I2V) or 2 (the first and the last: Wan2.1 FLF2V, Wan2.2 I2V)."""
    if pipeline != I2V_PIPELINE:
        return 0
    # Wan2.1 I2V's image embedder takes one image's CLIP tokens: two without position embeddings fail in diffusers
    one_image = transformer.get("image_dim") is not None and transformer.get("pos_embed_seq_len") is None
    return 1 if one_image else 2


def check_model_images(model: str, pipeline: str, transformer: Mapping[str, Any], image: str | None,
                       last_image: str | None, ti2v: bool = False) -> None:
    """One-line ValueError unless the images given (`image`, `last_image`: paths or None) are what `model` takes;
    `ti2v`: a Wan2.2 TI2V pipeline (per-token timesteps), text to video or, with `image`, image to video."""
    if ti2v:
        if last_image is not None:  # diffusers' TI2V image mode encodes the first frame alone
            raise ValueError(f"--last-image: {model} is a Wan2.2 TI2V model, whose image mode takes one image, the "
                             f"first frame; a first and a last frame need a FLF2V model, such as {_FLF2V_EXAMPLE}")
        return
    frames = image_frames(pipeline, transformer)
    if frames == 0 and image is not None:
        raise ValueError(f"--image: {model} is a text-to-video model ({pipeline}) and takes no image; image to video "
                         f"needs a {I2V_PIPELINE} model, such as {_I2V_EXAMPLE}, or a Wan2.2 TI2V one")
    if frames > 0 and image is None:
        raise ValueError(f"--image: {model} is an image-to-video model ({I2V_PIPELINE}); give its first frame with "
                         "--image PATH")
    if frames == 1 and last_image is not None:
        raise ValueError(f"--last-image: {model} takes one image, the first frame (Wan2.1 I2V); a first and a last "
                         f"frame need a FLF2V model, such as {_FLF2V_EXAMPLE}, or a Wan2.2 I2V one")


def check_local_model_images(model: str, image: str | None, last_image: str | None) -> None:
    """`check_model_images` for a local pipeline folder, from its files, before it loads (a hub id passes: it is
    checked once loaded)."""
    index = local_config(model)
    if index is not None:
        check_model_images(model, index.get("_class_name", ""), local_config(model, "transformer/config.json") or {},
                           image, last_image, bool(index.get("expand_timesteps")))


def pipeline_images(settings: Any) -> dict[str, Image.Image]:
    """The image arguments of a pipeline call for `settings` (its `image` and `last_image` paths): none for text to
    video."""
    images = {}
    if settings.image is not None:
        images["image"] = read_image(settings.image, "--image")
    if settings.last_image is not None:
        images["last_image"] = read_image(settings.last_image, "--last-image")
    return images
