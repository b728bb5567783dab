"""Robust image decode: bytes in, ``(H, W, 3)`` float32 RGB in [0, 1] out, or a ``DecodeError``.

The engine calls :func:`decode_image` from a thread pool, so nothing here touches Pillow's
process-wide settings per call: ``Image.MAX_IMAGE_PIXELS`` is left alone (our own limit,
``max_pixels``, is checked on the header size before any pixel is read) and
``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (it is Pillow's default; with it True,
Pillow silently pads a cut file with grey, which would score a broken image as a real one).

Every problem with the data raises :class:`DecodeError`, whose message is the short reason
written into the row's ``error`` column: ``empty file (0 bytes)``, ``not an image: ...``,
``truncated image: ...``, ``corrupt image: ...``, ``decompression bomb: ...``,
``unsupported pixel mode: ...``. No other exception type leaves this module for bad data.

Modes and scaling (the original mode is kept in ``DecodedImage.mode``):

- 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` ...) go
  through Pillow's conversion to RGB, then ``/ 255``. Grey is replicated to three channels.
- 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and ``I`` (32-bit int, how
  Pillow represents 16-bit TIFF/PNG grey in some versions): ``/ 65535``, clipped to [0, 1].
- ``F`` (32-bit float) is taken as already in [0, 1]: clipped, NaN becomes 0.
- 48-bit RGB PNG/TIFF: Pillow decodes these to 8-bit ``RGB`` (high byte), so they arrive
  with 8-bit precision, still correctly scaled (65535 -> 1.0, 32768 -> 128/255).
- Alpha (``LA``, ``PA``, ``RGBA``, ``RGBa``, ``P`` with a ``transparency`` entry) is
  composited on black: ``rgb * alpha``. A transparent pixel's stored colour is arbitrary (a
  palette's transparent index is often magenta), and black is the neutral background for a
  night-time corpus; an opaque image gives exactly the same values as dropping alpha.
- Multi-frame files (GIF, TIFF, APNG, MPO): the first frame.

Geometry: the stored one, unless ``apply_exif`` (then ``ImageOps.exif_transpose``;
``exif_applied`` is True only when an orientation other than 1 was actually applied).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DecodeError", "DecodedImage", "decode_image", "pixels_as_float"]

# Our own ``max_pixels`` guard replaces Pillow's warning tier (89.5 Mpx by default, below our
# default limit of 120 Mpx). ``warnings.catch_warnings`` per call is not thread safe, so the
# filter is installed once, at import, for this warning category only. Pillow's hard error
# (above 2 * MAX_IMAGE_PIXELS) still fires and is reported as a decompression bomb below.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_ORIENTATION = 0x0112
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_WITH_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}


class DecodeError(ValueError):
    """The bytes are not a decodable image; the message is the row's ``error`` reason."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) float32 in [0, 1] (or uint8 0-255: keep_uint8), C-contiguous
    width: int
    height: int
    exif_applied: bool  # True only when apply_exif and an orientation != 1 was applied
    mode: str  # the original PIL mode, e.g. 'P', 'I;16'


def _sniff(data: bytes) -> str | None:
    """The format a signature announces (also for a file cut inside its signature)."""
    for magic, name in _MAGIC:
        if data.startswith(magic) or (len(data) >= 2 and magic.startswith(data)):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _is_text(head: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def _not_an_image(data: bytes) -> DecodeError:
    head = data[:16]
    texty = _is_text(head)
    kind = None if texty and len(data) >= 16 else _sniff(data)  # 'BM...', 'GIF8...' text
    if kind is not None:
        # A known signature that Pillow cannot open: the header itself is cut or broken.
        return DecodeError(
            f"truncated image: {kind} header is incomplete or corrupt ({len(data)} bytes)"
        )
    if texty:
        return DecodeError(f"not an image: looks like text (starts with {head!r})")
    return DecodeError(f"not an image: unrecognised format (starts with {head[:8]!r})")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Best-effort (width, height) from the header without Pillow's bomb check (error path)."""
    prefix = data[:16]
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is not None and not accept(prefix):
                continue
            return factory(io.BytesIO(data), "").size
        except Exception:  # another plugin may still read it
            continue
    return None


def _bomb(width: int, height: int, limit: int, whose: str = "the limit") -> DecodeError:
    return DecodeError(
        f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
        f"{whose} of {limit}"
    )


def _pillow_bomb(data: bytes, exc: Exception, max_pixels: int) -> DecodeError:
    size = _header_size(data)
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if size is None:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        n = found.group(1) if found else "?"
        return DecodeError(f"decompression bomb: {n} pixels exceeds the limit of {max_pixels}")
    w, h = size
    if w * h > max_pixels:
        return _bomb(w, h, max_pixels)
    # Our limit allows it, but Pillow's process-wide hard limit does not.
    return _bomb(w, h, pillow_limit, "Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS * 2)")


def _riff_short(data: bytes) -> str | None:
    """For RIFF (WebP) files, which Pillow reports only as 'could not create decoder'."""
    if data[:4] == b"RIFF" and len(data) >= 8:
        declared = int.from_bytes(data[4:8], "little") + 8
        if declared > len(data):
            return f"WEBP data is {len(data)} of {declared} bytes"
    return None


def _load_error(exc: BaseException, data: bytes) -> DecodeError:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in msg.lower():
        return DecodeError(f"truncated image: {msg}")
    short = _riff_short(data)
    if short:
        return DecodeError(f"truncated image: {short}")
    return DecodeError(f"corrupt image: {msg}")


def _u8_to_float(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=np.float32)
    np.divide(arr, np.float32(255.0), out=out, casting="unsafe")
    return out


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    out = np.empty((*grey.shape, 3), dtype=np.float32)
    out[...] = grey[..., None]
    return out


def _to_float_rgb(im: Image.Image, keep_uint8: bool = False) -> np.ndarray:
    mode = im.mode
    as_float = (lambda a: a) if keep_uint8 else _u8_to_float
    if mode == "RGB":
        return as_float(np.asarray(im))
    if mode in ("L", "1"):
        grey = np.asarray(im.convert("L") if mode == "1" else im)
        if keep_uint8:
            return np.repeat(grey[..., None], 3, axis=2)
        return _grey_to_rgb(_u8_to_float(grey))
    if mode in _SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.float32)
        grey *= np.float32(1.0 / 65535.0)
        np.clip(grey, 0.0, 1.0, out=grey)
        return _grey_to_rgb(grey)
    if mode == "F":
        grey = np.array(im, dtype=np.float32)
        np.nan_to_num(grey, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        np.clip(grey, 0.0, 1.0, out=grey)
        return _grey_to_rgb(grey)
    if mode in _WITH_ALPHA or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA") if mode != "La" else im.convert("LA").convert("RGBA")
        arr = np.asarray(rgba)
        out = _u8_to_float(arr[..., :3])
        alpha = _u8_to_float(arr[..., 3:])
        out *= alpha  # composite on black
        return out
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DecodeError(f"unsupported pixel mode: {mode} ({exc})") from None
    return as_float(np.asarray(rgb))


def decode_image(
    data: bytes, *, apply_exif: bool = False, max_pixels: int = 120_000_000,
    keep_uint8: bool = False,
) -> DecodedImage:
    """Decode image bytes to RGB float32 in [0, 1] (see the module docstring for the rules).

    ``keep_uint8``: 8-bit images stay ``uint8`` (H, W, 3), a quarter of the memory while
    they wait for a batch (``pixels_as_float`` gives the float32 values exactly); 16-bit,
    float and alpha images are float32 either way."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        return _decode(bytes(data), apply_exif, max_pixels, keep_uint8)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("corrupt image: out of memory while decoding") from None
    except Exception as exc:  # never another exception type for bad data
        raise DecodeError(f"corrupt image: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes, apply_exif: bool, max_pixels: int,
            keep_uint8: bool = False) -> DecodedImage:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _not_an_image(data) from None
    except Image.DecompressionBombError as exc:
        raise _pillow_bomb(data, exc, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        if len(data) >= 16 and _is_text(data[:16]):  # e.g. text starting 'BM' (BMP magic)
            raise _not_an_image(data) from None
        raise _load_error(exc, data) from None

    with im:
        mode = im.mode
        width, height = im.size
        if width * height > max_pixels:
            raise _bomb(width, height, max_pixels)
        if width <= 0 or height <= 0:
            raise DecodeError(f"corrupt image: empty geometry {width}x{height}")
        try:
            im.load()
        except Image.DecompressionBombError as exc:
            raise _pillow_bomb(data, exc, max_pixels) from None
        except Exception as exc:  # Pillow raises many types for bad data
            raise _load_error(exc, data) from None

        exif_applied = False
        out_im: Image.Image = im
        if apply_exif:
            orientation = im.getexif().get(_ORIENTATION, 1)
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                out_im = ImageOps.exif_transpose(im)
                exif_applied = True
        pixels = _to_float_rgb(out_im, keep_uint8)

    if not pixels.flags.c_contiguous:
        pixels = np.ascontiguousarray(pixels)
    h, w = pixels.shape[:2]
    return DecodedImage(pixels=pixels, width=w, height=h, exif_applied=exif_applied, mode=mode)



def pixels_as_float(pixels: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] of decoded pixels of either dtype (uint8: ``/ 255``, as decoding)."""
    return pixels if pixels.dtype == np.float32 else _u8_to_float(pixels)
