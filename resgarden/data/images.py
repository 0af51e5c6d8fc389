"""Image files -> RGB uint8 arrays: libjpeg-turbo (simplejpeg, which releases the interpreter lock
while it decodes, so threads decode in parallel) for JPEGs, Pillow for everything else and for the
JPEGs libjpeg-turbo will not convert (CMYK, YCCK). Any file that cannot be read in full raises
:class:`UnreadableImage` with the reason; the data pipeline logs it and takes the next sample.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:  # a requirement; the Pillow path below is complete without it
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8"
TURBO_COLORSPACES = ("RGB", "YCbCr", "Gray")  # libjpeg-turbo converts these to RGB; CMYK / YCCK go to Pillow


class UnreadableImage(ValueError):
    """A file that is not a complete, decodable image."""


def _pillow_rgb(data: bytes) -> np.ndarray:
    """Any format Pillow reads, as RGB: 16-bit and 32-bit grey scaled to 8 bits, alpha dropped."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # raises on truncated files (Pillow's default: no partial images)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            grey = np.asarray(image, dtype=np.uint32)
            top = 65535 if image.mode.startswith("I;16") or grey.max() > 255 else 255
            grey = (grey * 255 // max(top, 1)).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if image.mode == "F":
            grey = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header of a JPEG that libjpeg-turbo decodes to RGB; None for any
    other file (Pillow decodes those)."""
    if simplejpeg is None or not data.startswith(JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise UnreadableImage(f"corrupt JPEG: {exc}") from None
    return (height, width) if colorspace in TURBO_COLORSPACES else None


def decode_rgb(data: bytes, fast: bool = False, reduce: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an encoded image. ``fast``: libjpeg-turbo's fast integer IDCT and
    upsampling (training; a few per cent faster, differences of a few grey levels). ``reduce``
    (2, 4, 8): a JPEG is decoded at that fraction of its size in the DCT domain."""
    if not data:
        raise UnreadableImage("empty file")
    size = jpeg_size(data)
    if size is not None:
        try:  # the smallest scale at least 1/reduce of the size: exactly 1/reduce
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast, strict=True,
                                          min_height=-(-size[0] // reduce), min_width=-(-size[1] // reduce),
                                          min_factor=reduce)
        except ValueError as exc:  # corrupt or truncated: strict mode refuses partial images
            raise UnreadableImage(f"corrupt JPEG: {exc}") from None
    try:
        return _pillow_rgb(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(str(exc) or type(exc).__name__) from None


def read_rgb(path: str, fast: bool = False) -> np.ndarray:
    """The image file at ``path`` as (H, W, 3) uint8 RGB; :class:`UnreadableImage` if it is not one."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise UnreadableImage(exc.strerror or str(exc)) from None
    return decode_rgb(data, fast)
