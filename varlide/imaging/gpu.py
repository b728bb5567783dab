"""Image I/O for the CUDA path: batched JPEG decode/encode on the device, CPU fallbacks, and
host<->device copies that overlap compute. Every function also runs on CPU (the tests).

Why: on a GPU the curve net does ~850 frames/s at 720p, while Pillow decodes ~110 frames/s
per CPU thread (ANCHORS.md); batched nvJPEG decodes ~11,500 frames/s, so decode must move
to the device or it is the bottleneck. Only what nvJPEG decodes like Pillow goes there.

Decode (:func:`decode_batch`). A file goes to ``torchvision.io.decode_jpeg`` (one batched
call for the list; nvJPEG on CUDA, libjpeg on CPU) only when its header, parsed here
without decoding, says: 8-bit baseline/extended Huffman JPEG, 3 components (YCbCr, not an
Adobe RGB-stored one), ends with its EOI marker (not truncated), one image (no MPF), and
within ``max_pixels``; with ``apply_exif`` also EXIF orientation 1 or none. Everything else
(PNG and other formats, grey, CMYK, progressive, 12-bit, arithmetic, truncated, over the
pixel limit, rotated) goes to ``varlide.imaging.decode.decode_image``, the CPU decoder, whose
``DecodeError`` message becomes the item's error string, exactly as a CPU run's row. If the
batched call fails, the files are tried one by one, and each one the device refuses goes to
the CPU decoder; no exception leaves :func:`decode_batch` for bad data.

Tolerance vs Pillow (``decode_image``): torchvision's CPU decoder (its bundled libjpeg-turbo,
islow DCT, fancy upsampling) gave bit-identical pixels on every 10th of the 2002 train-sice
JPEGs (201 files, max |diff| 0; ``CPU_DECODE_TOLERANCE``). nvJPEG uses its own IDCT and
chroma upsampling, so on CUDA pixels differ by a few levels, most at colour edges of 4:2:0
files; ``benchmarks/gpu_suite.py`` measures it (mean and max |diff| vs Pillow) and checks the
mean against ``CUDA_DECODE_MEAN_TOLERANCE``; not yet measured on a device.

Encode (:func:`encode_jpeg_batch`). On CUDA: nvJPEG via ``torchvision.io.encode_jpeg`` on the
list (per image inside, on its own stream). Its conventions differ from our CPU encoder
(``varlide.imaging.encode``, Pillow): nvJPEG always writes 4:4:4 chroma (torchvision sets
``NVJPEG_CSS_444``), Pillow 4:2:0 below quality 95. Both use the IJG quality scale and
standard tables, so at quality >= 95 they agree in kind; below it a device-encoded file is
larger (encode.py measured 62 vs 45 KiB at q90 for 4:4:4 vs 4:2:0) and keeps more chroma,
and its bytes never equal a CPU run's. On CPU (or when nvJPEG fails) Pillow's encoder is
used, byte-identical to the CPU engine's output; torchvision's CPU encoder (4:2:0 at every
quality) is not used.

Transfers (:class:`Transfers`). Uploads of uint8 host arrays go through pinned memory with
``non_blocking`` copies on a side CUDA stream, downloads likewise, so they overlap kernels on
the compute stream; :meth:`Transfer.get` makes the consumer wait for exactly that copy.
On CPU they are no-ops (the tensor is the array, no copy).

The engine (``varlide.engine``, "device I/O", on for CUDA or with ``VARLIDE_DEVICE_IO=1``)
keeps the bytes of the files :func:`device_header` accepts undecoded until their batch runs,
then calls :func:`decode_batch_images` and :func:`encode_jpeg_batch` once per batch.

Module-level imports: numpy, torch, torchvision only (this runs on a bare GPU machine);
the CPU decoder/encoder (Pillow) are imported when first needed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

log = logging.getLogger(__name__)

__all__ = [
    "CPU_DECODE_TOLERANCE", "CUDA_DECODE_MEAN_TOLERANCE", "DeviceImage", "JpegHeader",
    "Transfer", "Transfers", "decode_batch", "decode_batch_images", "device_decodable",
    "device_header", "encode_jpeg_batch", "host_to_device", "jpeg_header", "to_float_batch",
    "to_uint8",
]

CPU_DECODE_TOLERANCE = 0  # max |diff| in uint8 levels vs Pillow (measured, see docstring)
CUDA_DECODE_MEAN_TOLERANCE = 1.5  # mean |diff| in levels vs Pillow (provisional)
DEFAULT_MAX_PIXELS = 120_000_000  # Config.max_pixels' default

# torchvision 0.29 warns on every call that its image I/O is deprecated (TorchCodec).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision are deprecated", category=DeprecationWarning)

_SOF_DEVICE = (0xC0, 0xC1)  # baseline, extended sequential Huffman
_SOF_ANY = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length
_ORIENTATION = 0x0112
_TORCH_DTYPE = {"|u1": torch.uint8, "<f4": torch.float32}  # decode_image's pixel dtypes


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class JpegHeader:
    """What the frame header of a JPEG says, read without decoding."""

    width: int
    height: int
    components: int
    sof: int  # the SOFn marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive ...
    precision: int  # bits per sample
    adobe_transform: int | None  # APP14 'Adobe' colour transform (0: RGB/CMYK stored)
    orientation: int  # EXIF orientation (1 when absent)
    multi_picture: bool  # an APP2 'MPF' segment: more images follow the first
    complete: bool  # the data ends with EOI (trailing zero padding allowed)


def _u16(data: bytes, i: int) -> int:
    return (data[i] << 8) | data[i + 1]


def _exif_orientation(seg: bytes) -> int:
    """Orientation tag of IFD0 of an APP1 'Exif' segment's TIFF block (1 when unreadable)."""
    tiff = seg[6:]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"

    def num(i: int, n: int) -> int:
        return int.from_bytes(tiff[i:i + n], order)

    ifd = num(4, 4)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(num(ifd, 2)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if num(entry, 2) == _ORIENTATION:
            return num(entry + 8, 2)
    return 1


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of JPEG ``data``, or None (not a JPEG, or no frame header before the
    scan data). Microseconds: it walks the marker segments up to SOFn only."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return None
    i, adobe, orientation, mpf = 2, None, 1, False
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # a second SOI, EOI or scan data before a frame
            return None
        length = _u16(data, i + 2)
        seg = data[i + 4:i + 2 + length]
        if length < 2 or len(seg) < length - 2:
            return None
        if marker == 0xE1 and seg.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(seg)
        elif marker == 0xE2 and seg.startswith(b"MPF\x00"):
            mpf = True
        elif marker == 0xEE and seg.startswith(b"Adobe") and len(seg) >= 12:
            adobe = seg[11]
        elif marker in _SOF_ANY and len(seg) >= 6:
            return JpegHeader(
                width=_u16(seg, 3), height=_u16(seg, 1), components=seg[5], sof=marker,
                precision=seg[0], adobe_transform=adobe, orientation=orientation,
                multi_picture=mpf, complete=data.rstrip(b"\x00").endswith(b"\xff\xd9"))
        i += 2 + length
    return None


def device_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                  apply_exif: bool = False) -> JpegHeader | None:
    """The header of ``data`` when it goes to the batched JPEG decoder, else None: the
    engine keeps such a file undecoded with the header's size until its batch is decoded."""
    h = jpeg_header(data)
    ok = (h is not None and h.sof in _SOF_DEVICE and h.precision == 8
          and h.components == 3 and h.adobe_transform in (None, 1) and h.complete
          and not h.multi_picture and 0 < h.width * h.height <= max_pixels
          and not (apply_exif and h.orientation != 1))
    return h if ok else None


def device_decodable(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                     apply_exif: bool = False) -> bool:
    """Whether ``data`` goes to the batched JPEG decoder (else to the CPU decoder)."""
    return device_header(data, max_pixels, apply_exif) is not None


# --------------------------------------------------------------------------- decode


@dataclass
class DeviceImage:
    """One decoded file: its pixels on the device and what a row records about it."""

    pixels: torch.Tensor  # (3, H, W) uint8, or float32 in [0, 1] (see decode_batch)
    width: int
    height: int
    exif_applied: bool  # as DecodedImage.exif_applied (only the CPU decoder rotates)
    mode: str  # Pillow's mode of the file ('RGB' for the YCbCr JPEGs decoded on the device)
    on_device: bool  # decoded by the batched JPEG decoder (else by the CPU decoder)


def _cpu_decode(data: bytes, device: torch.device, max_pixels: int,
                apply_exif: bool) -> DeviceImage | str:
    """``decode_image``'s result with its pixels as (3, H, W) on ``device``, or its error."""
    from varlide.imaging.decode import DecodeError, decode_image

    try:
        image = decode_image(data, apply_exif=apply_exif, max_pixels=max_pixels,
                             keep_uint8=True)
    except DecodeError as exc:
        return str(exc)
    except Exception as exc:  # the engine's wording for a decoder bug
        return f"decode failed: {type(exc).__name__}: {exc}"
    return DeviceImage(host_to_device(image.pixels, device), image.width, image.height,
                       image.exif_applied, image.mode, on_device=False)


def host_to_device(pixels: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``(3, H, W)`` on ``device`` from a decoded ``(H, W, 3)`` host array (uint8 or
    float32), a copy: how a file the CPU decoder read joins a device-decoded batch."""
    device = torch.device(device)
    if device.type == "cuda":  # one copy into pinned memory, then (3, H, W) on the device
        host = torch.empty(pixels.shape, dtype=_TORCH_DTYPE[pixels.dtype.str],
                           pin_memory=True)
        host.numpy()[...] = pixels
        return host.to(device, non_blocking=True).permute(2, 0, 1).contiguous()
    # one copy, already (3, H, W) (Pillow's arrays are read-only: never shared)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(device)


def _device_decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Batched decode; None for each file the decoder refused (tried one by one)."""
    inputs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
    except Exception as exc:
        log.debug("batched JPEG decode of %d failed (%s); one by one", len(inputs), exc)
    out: list[torch.Tensor | None] = []
    for x in inputs:
        try:
            out.append(decode_jpeg(x, mode=ImageReadMode.RGB, device=device))
        except Exception:
            out.append(None)
    return out


def decode_batch_images(datas: Sequence[bytes], device: torch.device | str,
                        max_pixels: int = DEFAULT_MAX_PIXELS, *,
                        apply_exif: bool = False) -> list[DeviceImage | str]:
    """:func:`decode_batch` with what a row records (size, mode, exif_applied, decoder)."""
    device = torch.device(device)
    out: list[DeviceImage | str | None] = [None] * len(datas)
    eligible = [i for i, d in enumerate(datas) if device_decodable(d, max_pixels, apply_exif)]
    if eligible:
        decoded = _device_decode([datas[i] for i in eligible], device)
        for i, image in zip(eligible, decoded, strict=True):
            if image is not None and image.ndim == 3 and image.shape[0] == 3:
                h, w = image.shape[1:]  # CPU libjpeg gives a (3, H, W) view of HWC memory
                out[i] = DeviceImage(image.contiguous(), w, h, False, "RGB", on_device=True)
    for i, item in enumerate(out):
        if item is None:
            out[i] = _cpu_decode(datas[i], device, max_pixels, apply_exif)
    return out  # type: ignore[return-value]


def decode_batch(datas: Sequence[bytes], device: torch.device | str,
                 max_pixels: int = DEFAULT_MAX_PIXELS, *,
                 apply_exif: bool = False) -> list[torch.Tensor | str]:
    """Decode many files at once: per file, a ``(3, H, W)`` tensor on ``device`` or the
    error string a CPU run's row would carry (``DecodeError``'s message).

    Tensors are ``uint8`` (every 8-bit image), or ``float32`` in [0, 1] where
    ``decode_image`` gives float (16-bit, float or alpha images from the CPU fallback);
    :func:`to_float_batch` turns either into the engine's float batch. On CUDA the work is
    queued on the current stream. ``max_pixels`` and ``apply_exif`` as in ``decode_image``
    (a rotated JPEG is decoded on the CPU, which applies the rotation).
    """
    items = decode_batch_images(datas, device, max_pixels, apply_exif=apply_exif)
    return [item if isinstance(item, str) else item.pixels for item in items]


def to_float_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(B, 3, H, W)`` float32 in [0, 1] from same-size decoded tensors; uint8 are divided
    by 255, the values ``decode_image`` gives as float32 (both round x / 255 correctly)."""
    return torch.stack([x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
                        for x in images])


# --------------------------------------------------------------------------- encode


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8 on the tensor's device, rounding as
    ``varlide.imaging.encode.to_uint8`` (x 255, + 0.5, NaN -> 0, clip, truncate)."""
    if images.dtype == torch.uint8:
        return images
    x = images.float().mul(255.0).add_(0.5).nan_to_num_(0.0).clamp_(0.0, 255.0)
    return x.to(torch.uint8)


def _cpu_encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
    from varlide.imaging.encode import encode_image

    return [encode_image(x.permute(1, 2, 0).cpu().numpy(), "JPEG", quality) for x in images]


def _nvjpeg_encode(images: list[torch.Tensor], quality: int) -> list[bytes]:
    # torchvision encodes on its own stream without waiting for ours: finish our kernels
    torch.cuda.current_stream(images[0].device).synchronize()
    encoded = encode_jpeg(images, quality=quality)
    sizes = [int(t.numel()) for t in encoded]
    flat = torch.cat(encoded).cpu().numpy()  # one device -> host copy for the batch
    offsets = np.cumsum([0, *sizes])
    return [flat[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def encode_jpeg_batch(images: torch.Tensor | Sequence[torch.Tensor],
                      quality: int = 90) -> list[bytes]:
    """JPEG bytes of each image of ``(B, 3, H, W)`` (or a list of ``(3, H, W)``, sizes may
    differ), uint8 or float in [0, 1], on any device. CUDA: nvJPEG (4:4:4 at every quality,
    see the module docstring), falling back to Pillow for the batch if it fails; CPU:
    Pillow, the bytes of ``encode_image(..., 'JPEG', quality)``."""
    frames = [to_uint8(x).contiguous() for x in images]
    if not frames:
        return []
    quality = int(min(max(quality, 1), 100))
    if frames[0].is_cuda:
        try:
            return _nvjpeg_encode(frames, quality)
        except Exception as exc:
            log.warning("nvJPEG encode failed (%s: %s); encoding on the CPU",
                        type(exc).__name__, exc)
    return _cpu_encode(frames, quality)


# --------------------------------------------------------------------------- transfers


@dataclass
class Transfer:
    """A copy in flight: ``get()`` returns its tensor once it may be used."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None

    def get(self) -> torch.Tensor:
        """Device tensor: the current stream waits for the copy (the host does not); host
        tensor: the host waits for it. CPU: the tensor as is."""
        if self.event is None:
            return self.tensor
        if self.tensor.is_cuda:
            stream = torch.cuda.current_stream(self.tensor.device)
            stream.wait_event(self.event)
            self.tensor.record_stream(stream)  # its memory was allocated on the side stream
        else:
            self.event.synchronize()
        return self.tensor


class Transfers:
    """Uploads and downloads on one side CUDA stream per instance, from/to pinned memory.

    Copies queued here run while the compute stream works; ``Transfer.get`` orders them.
    On CPU nothing is copied or pinned: ``upload(a).get()`` shares ``a``'s memory.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def upload(self, host: np.ndarray | torch.Tensor) -> Transfer:
        """Copy a host array (e.g. uint8 ``(B, H, W, 3)``) to the device, non-blocking."""
        src = torch.from_numpy(np.ascontiguousarray(host)) if isinstance(host, np.ndarray) \
            else host
        if self.stream is None:
            return Transfer(src)
        pinned = src if src.is_pinned() else src.pin_memory()
        with torch.cuda.stream(self.stream):
            dst = pinned.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Transfer(dst, event)

    def download(self, tensor: torch.Tensor) -> Transfer:
        """Copy a device tensor to pinned host memory once the compute stream has made it."""
        if self.stream is None or not tensor.is_cuda:
            return Transfer(tensor)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # not reused before the copy has read it
            event = torch.cuda.Event()
            event.record(self.stream)
        return Transfer(host, event)
