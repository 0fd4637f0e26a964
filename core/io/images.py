"""Images read from a task: files opened safely and arrays turned into RGB, whatever their mode."""
from __future__ import annotations

import numpy as np

from ..errors import UserInputError

#: Largest image (in pixels) decoded; larger ones are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = 40_000_000


def array_to_pil(arr: np.ndarray):
    """A uint8 image array ``(H, W)`` or ``(H, W, C)`` as an RGB PIL image."""
    from PIL import Image

    img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] in (3, 4) else arr[..., 0])
    return img.convert("RGB")


def open_image(path: str):
    """Open an image file as RGB, refusing decompression bombs and naming unreadable files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserInputError(
                    f"image {path!r} is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; refused as a possible decompression bomb."
                )
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, img).convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserInputError(f"image {path!r} cannot be read ({exc.__class__.__name__}: {exc}); it is truncated or not an image.") from exc
