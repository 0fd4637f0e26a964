"""Images read from a task: files opened safely and turned into 8-bit RGB faithfully, whatever their mode.

Pillow's ``convert("RGB")`` clips values above 255, so a 16-bit grey PNG (mode ``I;16``, values up to 65535) would
come out white; here 16-bit images are scaled to 8 bits (``v * 255 / 65535``), 32-bit integer images are scaled by
their bit depth when their values fit 16 bits and refused otherwise, floating-point images are refused by name,
transparent images are flattened on white, and a photo's EXIF orientation is applied (a phone stores a portrait photo
as landscape pixels plus an orientation tag: read without it, the image is learned sideways).
"""
from __future__ import annotations

import numpy as np

from ..errors import UserInputError

#: Largest image (in pixels) decoded; larger ones are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = 40_000_000
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def array_to_pil(arr: np.ndarray):
    """A uint8 image array ``(H, W)`` or ``(H, W, C)`` as an RGB PIL image."""
    from PIL import Image  # PIL imported lazily: `import core` stays fast

    img = Image.fromarray(arr if arr.ndim == 2 or arr.shape[-1] in (3, 4) else arr[..., 0])
    return img.convert("RGB")


def to_rgb(img, name: str = "image"):
    """An opened PIL image as 8-bit RGB: every mode converted without clipping, or refused by name."""
    from PIL import Image

    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UserInputError(f"{name} is a 32-bit integer image with values {values.min()}..{values.max()}, beyond "
                                 "16 bits; convert it to 8- or 16-bit before use.")
        # 16-bit to 8-bit: 65535 -> 255, as image libraries scale it (a mode "I" image from a 16-bit file too).
        grey = np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("F", "I;32", "I;32B", "I;32L"):
        raise UserInputError(f"{name} is a mode-{mode} image (floating-point or 32-bit values), which has no standard "
                             "8-bit scaling; save it as an 8- or 16-bit PNG or JPEG.")
    if mode in ("RGBA", "LA", "P", "PA", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def open_image(path: str):
    """Open an image file as RGB, upright as its EXIF orientation says, refusing decompression bombs and naming
    unreadable files."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UserInputError(
                    f"image {path!r} is {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; refused as a "
                    "possible decompression bomb."
                )
            return to_rgb(ImageOps.exif_transpose(img), f"image {path!r}")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserInputError(f"image {path!r} cannot be read ({exc.__class__.__name__}: {exc}); it is truncated or not "
                             "an image.") from exc
