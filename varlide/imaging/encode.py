"""Output names and image encoding for enhanced images.

Names (DESIGN.md, "Enhanced image names"), by the run's ``format``:

- ``same``: JPEG inputs (``.jpg``/``.jpeg``, any case) stay JPEG and PNG inputs stay PNG, both
  with the name unchanged; every other input (tif, bmp, webp, gif, no extension ...) becomes
  PNG with its extension replaced by ``.png``.
- ``png``: all PNG; the extension becomes ``.png`` (unchanged when already ``.png``, any case).
- ``jpeg``: all JPEG; the extension becomes ``.jpg`` unless already ``.jpg``/``.jpeg``.

A collision that a format change would cause (``a.tif`` and ``a.png`` both -> ``a.png``, or
``a.bmp`` and ``a.tif``) is an error for each input whose name the format CHANGED and whose
output equals another input's output; an input whose name is unchanged keeps its output. Two
outputs that differ only in case count as a collision (they are one file on a case-insensitive
filesystem such as macOS or Windows), so no two inputs ever share an output.

Encoder settings (chosen because encoding is a large share of CPU time per image):

- PNG ``compress_level=1``. Measured with Pillow 13 / zlib on this 2-core dev machine, one
  640x480 RGB photo (a crop of a real night photo; a crop of skimage's ``rocket``), best of 5:

  ===== ============================ ============================
  level night crop                   rocket crop
  ===== ============================ ============================
  0     901 KiB   13.7 ms            801 KiB   11.4 ms
  1     356 KiB   25.5 ms            362 KiB   23.1 ms
  3     334 KiB   37.0 ms            341 KiB   28.9 ms
  6     297 KiB  100.5 ms (default)  305 KiB   58.7 ms (default)
  9     286 KiB  621.1 ms            295 KiB  413.5 ms
  ===== ============================ ============================

  Level 1 is 2.5-4x faster than the default 6 for ~20 % larger files; level 0 (stored) is
  only ~2x faster again but 2.5x larger. PNG is lossless at every level, so only size/time
  trade.
- JPEG: ``quality`` from the config (default 90), ``optimize=False`` (the extra Huffman pass
  roughly doubled encode time, 1.1 -> 2.0 ms, for < 2 % smaller files), 4:2:0 chroma
  subsampling below quality 95 (45 KiB / 1.1 ms vs 62 KiB / 1.6 ms for 4:4:4 at q90) and
  4:4:4 at quality >= 95, where someone asked for near-lossless output.

Pillow releases the GIL while encoding, so a thread pool encodes in parallel; this module does
no per-pixel Python work.
"""

from __future__ import annotations

import io
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["OutputName", "iter_output_names", "plan_output_names", "to_uint8", "encode_image"]

PNG_COMPRESS_LEVEL = 1
JPEG_EXTENSIONS = (".jpg", ".jpeg")
FORMATS = ("same", "png", "jpeg")


@dataclass(frozen=True)
class OutputName:
    rel_path: str | None  # relative output path, None when error
    pil_format: str | None  # 'JPEG' or 'PNG'
    error: str | None  # e.g. collision message


def _target(rel_path: str, fmt: str) -> tuple[str, str]:
    """(output relative path, Pillow format) of one input under ``fmt``."""
    stem, ext = posixpath.splitext(rel_path)
    low = ext.lower()
    if fmt == "same":
        if low in JPEG_EXTENSIONS:
            return rel_path, "JPEG"
        if low == ".png":
            return rel_path, "PNG"
        return stem + ".png", "PNG"
    if fmt == "png":
        return (rel_path if low == ".png" else stem + ".png"), "PNG"
    return (rel_path if low in JPEG_EXTENSIONS else stem + ".jpg"), "JPEG"


def plan_output_names(rel_paths: Sequence[str], fmt: str) -> dict[str, OutputName]:
    """Output name and format of every input (in input order); collisions become errors."""
    return dict(iter_output_names(rel_paths, fmt))


def iter_output_names(rel_paths: Sequence[str], fmt: str) -> Iterator[tuple[str, OutputName]]:
    """``(rel_path, OutputName)`` in input order, without a per-file table of owners: two
    passes, the first counting each output name (case-folded: a case-insensitive store must
    not see two writers either), the second naming only the colliding files' others."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    counts: Counter[str] = Counter(_target(rel, fmt)[0].casefold() for rel in rel_paths)
    owners: dict[str, list[str]] = {}
    for rel in rel_paths:  # only names claimed twice or more keep their owners
        key = _target(rel, fmt)[0].casefold()
        if counts[key] > 1:
            owners.setdefault(key, []).append(rel)
    for rel in rel_paths:
        out, pil_format = _target(rel, fmt)
        others = [o for o in owners.get(out.casefold(), ()) if o != rel]
        if out != rel and others:
            shown = ", ".join(repr(o) for o in others[:3])
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            yield rel, OutputName(
                None,
                None,
                f"output name collision: format {fmt!r} renames {rel!r} to {out!r}, "
                f"which is also the output of {shown}{more}",
            )
        else:
            yield rel, OutputName(rel if out == rel else out, pil_format, None)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float in [0, 1] -> uint8: scale by 255, round half up, clip; NaN becomes 0.

    uint8 input is returned as is. ``to_uint8(x / 255) == x`` exactly for uint8 ``x``.
    """
    if pixels.dtype == np.uint8:
        return pixels
    x = np.multiply(pixels, np.float32(255.0), dtype=np.float32)
    x += np.float32(0.5)
    np.fmax(x, np.float32(0.0), out=x)  # fmax/fmin also map NaN to the bound
    np.fmin(x, np.float32(255.0), out=x)
    return x.astype(np.uint8)  # truncation of x + 0.5: round half up


def encode_image(pixels: np.ndarray, pil_format: str, quality: int = 90) -> bytes:
    """Encode an (H, W, 3) float [0, 1] or uint8 image as 'PNG' or 'JPEG' bytes."""
    fmt = pil_format.upper()
    if fmt not in ("PNG", "JPEG"):
        raise ValueError(f"pil_format: expected 'PNG' or 'JPEG', got {pil_format!r}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels: expected shape (H, W, 3), got {pixels.shape}")
    arr = np.ascontiguousarray(to_uint8(pixels))
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if fmt == "PNG":
        im.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        quality = int(min(max(quality, 1), 100))
        im.save(
            buf,
            "JPEG",
            quality=quality,
            optimize=False,
            subsampling="4:4:4" if quality >= 95 else "4:2:0",
        )
    return buf.getvalue()
