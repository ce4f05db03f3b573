"""Reading image files: orientation, bit depth and channels as a viewer shows them, and a pixel limit
checked before any pixel is decoded (a few kilobytes of PNG can declare billions of pixels)."""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segkit.errors import DatasetError, UserError

__all__ = ["load_image", "open_image", "max_image_pixels", "check_pixel_count", "MAX_IMAGE_PIXELS_ENV"]


def load_image(path: str, *, image_id: int | None = None) -> np.ndarray:
    """Read an image file as a uint8 ``[H, W, 3]`` RGB array, as a viewer shows it.

    Every mode becomes RGB: grayscale is repeated over the channels, palette images are expanded,
    an alpha channel is dropped (not composited), 16-bit images (PNG ``I;16`` and 32-bit integer
    ``I`` holding 16-bit values) are scaled to 8 bits (``value / 257``, rounded) rather than clipped
    at 255. A JPEG's EXIF orientation is applied (as cameras and viewers do), so the height and
    width are those of the upright image; annotations must be made on the upright image too.

    An image larger than :func:`max_image_pixels` is refused before it is decoded (a small file
    can declare a huge image); ``SEGKIT_MAX_IMAGE_PIXELS`` raises the limit.

    Raises:
        DatasetError: the file does not exist, cannot be decoded, is larger than the pixel limit,
            or has a mode with no RGB meaning (floating point); the message names the path and the
            image id.
    """
    which = f"image file '{path}'" + (f" (image id {image_id})" if image_id is not None else "")
    with open_image(path, which) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            wide = np.asarray(im, dtype=np.int64)
            gray = np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        if im.mode == "F":
            raise DatasetError(f"{which} holds floating-point pixels (PIL mode 'F'), which have no fixed "
                               f"mapping to RGB; convert it to an 8-bit RGB or grayscale image.")
        return np.asarray(im.convert("RGB"))


#: Environment variable holding the largest image, in pixels (height x width), that segkit reads;
#: ``none`` for no limit. Unset: Pillow's limit, ``2 * PIL.Image.MAX_IMAGE_PIXELS``.
MAX_IMAGE_PIXELS_ENV = "SEGKIT_MAX_IMAGE_PIXELS"
# What a decoder raises for a file that is not a valid image (Pillow's plugins do not all map
# their parsing errors to OSError).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError, IndexError, struct.error,
                  ZeroDivisionError)


def max_image_pixels() -> int | None:
    """The largest image, in pixels, that segkit decodes or accepts as an annotated size; ``None``: no limit.

    A few kilobytes of PNG or JPEG can declare an image of billions of pixels (a "decompression
    bomb"), which would take all memory to decode. The default is Pillow's own limit
    (``2 * PIL.Image.MAX_IMAGE_PIXELS``, 178,956,970 pixels, e.g. 13,377 x 13,377); the environment
    variable ``SEGKIT_MAX_IMAGE_PIXELS`` sets another (an integer, or ``none`` for no limit) for the
    command line and the Python API alike, DataLoader workers included.

    Raises:
        UserError: ``SEGKIT_MAX_IMAGE_PIXELS`` is neither a positive integer nor ``none``.
    """
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not value:
        return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)
    if value.lower() == "none":
        return None
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"the environment variable {MAX_IMAGE_PIXELS_ENV}={value!r} must be a positive number of "
                        f"pixels (height x width), or 'none' for no limit.")
    return limit


def _pixel_limit_message(what: str, size: str, limit: int | None) -> str:
    limit_text = f"{limit:,} pixels" if limit is not None else "its limit"
    return (f"{what} is {size}, more than segkit decodes ({limit_text}; a small file can declare a huge image "
            f"and exhaust memory). If the image really is that large, set the environment variable "
            f"{MAX_IMAGE_PIXELS_ENV} to a larger number of pixels (or 'none' for no limit); otherwise the file "
            f"is corrupt or hostile: replace it.")


def check_pixel_count(what: str, height: int, width: int) -> None:
    """Raise a :class:`DatasetError` if a ``height x width`` image is over :func:`max_image_pixels`."""
    limit = max_image_pixels()
    if limit is not None and height * width > limit:
        raise DatasetError(_pixel_limit_message(what, f"{height}x{width} (HxW) = {height * width:,} pixels", limit))


@contextlib.contextmanager
def open_image(path: str, which: str) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)``, refusing images over :func:`max_image_pixels` before they are decoded.

    Decoding inside the block is covered too: every failure becomes a :class:`DatasetError` whose
    message starts with ``which`` (``"image file 'a.png' (image id 3)"``).

    Raises:
        DatasetError: the path holds a NUL character, the file does not exist, is not a readable
            image, or is larger than the pixel limit.
    """
    if "\0" in path:
        raise DatasetError(f"{_printable(which)} has a NUL character in its name, which no file name can hold; "
                           f"fix the name where it is listed.")
    limit = max_image_pixels()
    pillow = Image.MAX_IMAGE_PIXELS
    if os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip() and pillow is not None and (limit is None or limit > pillow):
        # Pillow refuses more than twice its own limit before segkit sees the size: a user who lifts
        # segkit's limit lifts Pillow's with it (only then is Pillow's global changed).
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with Image.open(path) as im:
            check_pixel_count(which, im.height, im.width)
            yield im
    except FileNotFoundError as exc:
        raise DatasetError(f"{which} does not exist. Check the dataset's img_dir and the file_name in the "
                           f"annotation file.") from exc
    except Image.DecompressionBombError as exc:  # Pillow's check, made while opening, before segkit sees the size
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too large"
        raise DatasetError(_pixel_limit_message(which, size, limit)) from None
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"cannot decode {which}: {exc}. The file is corrupt or not an image; "
                           f"replace it or remove the image from the annotation file.") from exc


def _printable(text: str) -> str:
    """``text`` with control characters (a NUL in a file name) shown as escapes, for messages."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
