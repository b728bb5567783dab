"""Decoder fuzzing: mutated JPEG/PNG/TIFF/WebP/GIF/BMP bytes never crash the decode path.

A seeded mutational fuzzer of our own (no extra dependency; a failure names its seed and
case so it replays exactly): bit flips, byte overwrites, truncations, duplicated and
deleted spans, and headers patched to huge or zero dimensions (PNG with a valid CRC, so the
patched size reaches the decoder). The contract checked:

* ``decode_image`` returns a well-formed image or raises ``DecodeError`` -- no other
  exception type, for any input;
* the device path's header parser (``device_header``, run in the I/O pool before any GPU
  work) returns a header or None, never raises;
* memory stays bounded: ``max_pixels`` stops declared sizes before pixels are allocated;
* through the engine, every mutated file of a shard gets exactly one row, ``ok`` or
  ``error`` with a reason.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from varlide.imaging.decode import DecodeError, decode_image
from varlide.imaging.gpu import device_header

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

SEED = 20261202
MAX_PIXELS = 4_000_000  # small, so a header claiming more is refused before any pixel
CASES_PER_FORMAT = 150


def _seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arr = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    out: dict[str, bytes] = {}
    for fmt, kwargs in (("JPEG", {"quality": 85}), ("PNG", {}), ("TIFF", {}),
                        ("WEBP", {"quality": 80}), ("GIF", {}), ("BMP", {})):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **kwargs)
        out[fmt] = buf.getvalue()
    grey = io.BytesIO()
    Image.fromarray(arr[..., 0]).save(grey, format="PNG")
    out["PNG-L"] = grey.getvalue()
    rgba = io.BytesIO()
    Image.fromarray(np.dstack([arr, arr[..., :1]])).save(rgba, format="PNG")
    out["PNG-RGBA"] = rgba.getvalue()
    return out


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """IHDR with another size and a correct CRC (so Pillow believes it)."""
    ihdr = bytearray(data[12:29])  # type (4) + data (13)
    ihdr[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return data[:12] + bytes(ihdr) + crc + data[33:]


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The SOF0 marker's height and width replaced."""
    i = data.find(b"\xff\xc0")
    if i < 0:
        return data
    return data[:i + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[i + 9:]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        n = len(buf)
        if n == 0:
            break
        if kind == 0:  # flip bits
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif kind == 1:  # overwrite a span with random bytes, often in the header
            at = rng.randrange(min(n, 64)) if rng.random() < 0.6 else rng.randrange(n)
            span = rng.randint(1, 16)
            buf[at:at + span] = bytes(rng.randrange(256) for _ in range(span))
        elif kind == 2:  # truncate
            del buf[rng.randrange(n):]
        elif kind == 3:  # duplicate a span
            at, span = rng.randrange(n), rng.randint(1, 256)
            buf[at:at] = buf[at:at + span]
        elif kind == 4:  # delete a span
            at = rng.randrange(n)
            del buf[at:at + rng.randint(1, 64)]
        else:  # interesting values at a random offset
            at = rng.randrange(n)
            buf[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                         b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"])
    return bytes(buf)


def _cases() -> list[tuple[str, int, bytes]]:
    rng = random.Random(SEED)
    seeds = _seed_images()
    cases: list[tuple[str, int, bytes]] = []
    for fmt, data in seeds.items():
        for i in range(CASES_PER_FORMAT):
            cases.append((fmt, i, _mutate(data, rng)))
    for w, h in ((100_000, 100_000), (65_535, 65_535), (0, 48), (64, 0), (1, 3_999_999),
                 (2**31 - 1, 1), (4_000, 1_001)):
        cases.append((f"PNG {w}x{h}", 0, _patch_png_size(seeds["PNG"], w, h)))
        cases.append((f"JPEG {w}x{h}", 0, _patch_jpeg_size(seeds["JPEG"], w, h)))
    cases += [("empty", 0, b""), ("one byte", 0, b"\xff"), ("JPEG SOI only", 0, b"\xff\xd8"),
              ("PNG magic only", 0, b"\x89PNG\r\n\x1a\n"), ("text", 0, b"BM not a bitmap")]
    return cases


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def test_mutated_images_decode_or_raise_decode_error():
    before = _peak_rss()
    outcomes = {"ok": 0, "error": 0}
    for fmt, i, data in _cases():
        where = f"{fmt} case {i} (seed {SEED})"
        try:
            img = decode_image(data, max_pixels=MAX_PIXELS, keep_uint8=True)
        except DecodeError as exc:
            assert str(exc), where
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{where}: {type(exc).__name__} escaped decode_image: {exc}")
        else:
            assert img.pixels.ndim == 3 and img.pixels.shape[2] == 3, where
            assert img.pixels.shape[:2] == (img.height, img.width), where
            assert img.pixels.dtype in (np.uint8, np.float32), where
            assert 0 < img.width * img.height <= MAX_PIXELS, where
            outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes  # the fuzzer reaches both
    grown = _peak_rss() - before
    if before:  # Linux: what the whole fuzz run added to the peak
        assert grown < 512 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def test_device_header_never_raises_on_mutated_jpegs():
    for fmt, i, data in _cases():
        try:
            header = device_header(data, MAX_PIXELS, False)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{fmt} case {i}: device_header raised {type(exc).__name__}: {exc}")
        if header is not None:
            assert 0 < header.width * header.height <= MAX_PIXELS, (fmt, i)


def test_every_mutated_file_of_a_shard_gets_one_row(tmp_path, mlflow_sqlite):
    """Through the engine (the CPU decoder, then the device-I/O path on CPU): one row per
    file, ``ok`` or ``error`` with a reason, never a failed shard."""
    from varlide.config import Config
    from varlide.engine import process_shard
    from varlide.run import prepare_run
    from varlide.storage.results import read_table

    suffix = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "WEBP": "webp", "GIF": "gif",
              "BMP": "bmp", "PNG-L": "png", "PNG-RGBA": "png"}
    inp = tmp_path / "in"
    inp.mkdir()
    names = []
    for fmt, _i, data in _cases()[::9]:  # ~1 in 9: a shard's worth, every format
        name = f"{fmt.split()[0].lower()}-{len(names):04d}.{suffix.get(fmt.split()[0], 'jpg')}"
        (inp / name).write_bytes(data)
        names.append(name)
    for device_io in ("0", "1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VARLIDE_DEVICE_IO", device_io)
            cfg = Config(enhancer="classic-curve", metrics=["brightness"], progress=False,
                         max_pixels=MAX_PIXELS, shard_size=len(names) + 1,
                         run_id=f"fuzz-io{device_io}")
            plan = prepare_run(str(inp), str(tmp_path / "out"), cfg)
            for shard in plan.pending:
                process_shard(plan.job(shard))
            table = read_table(str(tmp_path / "out" / "scores" / plan.dataset / plan.run_id))
        rows = table.to_pylist()
        assert sorted(r["rel_path"] for r in rows) == sorted(names), device_io
        assert {r["status"] for r in rows} <= {"ok", "error"}
        assert all(r["error"] for r in rows if r["status"] == "error")
        assert any(r["status"] == "ok" for r in rows) and \
            any(r["status"] == "error" for r in rows)
