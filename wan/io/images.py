"""Image to video's input images, read whole with PIL (which models take them: wan.models.spec, checked by
wan.generate.plan)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


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


def pipeline_images(settings: Any) -> dict[str, Image.Image]:
    """The image arguments of a pipeline call for `settings` (its `image` and `last_image` paths): none for text to
    video."""
    images = {}
    if settings.image is not None:
        images["image"] = read_image(settings.image, "--image")
    if settings.last_image is not None:
        images["last_image"] = read_image(settings.last_image, "--last-image")
    return images
