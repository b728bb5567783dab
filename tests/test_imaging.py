"""varlide.imaging: decode every mode to RGB float, refuse bad data clearly, name and encode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import make_rgb
from PIL import Image, ImageFile

from varlide.imaging.decode import DecodedImage, DecodeError, decode_image
from varlide.imaging.encode import encode_image, plan_output_names, to_uint8


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray, color_type: int, bit_depth: int, size: tuple[int, int] | None = None):
    """A minimal PNG writer (Pillow cannot write 48-bit RGB); ``size`` may lie in the header."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    hw, hh = size or (w, h)
    ihdr = struct.pack(">IIBBBBB", hw, hh, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _check(img: DecodedImage, h: int, w: int, mode: str) -> np.ndarray:
    assert isinstance(img, DecodedImage)
    p = img.pixels
    assert p.shape == (h, w, 3) and p.dtype == np.float32 and p.flags.c_contiguous
    assert (img.width, img.height, img.mode) == (w, h, mode)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert img.exif_applied is False
    return p


# ---------------------------------------------------------------- modes


def test_rgb_exact_and_grey_modes():
    rgb = make_rgb(6, 8)
    p = _check(decode_image(_save(Image.fromarray(rgb), "PNG")), 6, 8, "RGB")
    np.testing.assert_array_equal(p, rgb.astype(np.float32) / 255)

    grey = np.array([[0, 128, 255]], dtype=np.uint8)
    p = _check(decode_image(_save(Image.fromarray(grey), "PNG")), 1, 3, "L")
    np.testing.assert_allclose(p[0, :, 0], [0, 128 / 255, 1.0], atol=1e-7)
    assert np.array_equal(p[..., 0], p[..., 2])

    bits = Image.fromarray(np.array([[0, 255, 0, 255]], dtype=np.uint8)).convert("1")
    p = _check(decode_image(_save(bits, "PNG")), 1, 4, "1")
    np.testing.assert_array_equal(p[0, :, 1], [0, 1, 0, 1])


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (3, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0, 10, 200, 30] + [0] * (253 * 3))
    pal.putdata([0, 1, 2, 2, 1, 0])
    p = _check(decode_image(_save(pal, "PNG")), 2, 3, "P")
    np.testing.assert_allclose(p[0, 1], [1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(p[0, 2], [10 / 255, 200 / 255, 30 / 255], atol=1e-7)

    # index 1 (red) transparent: composited on black; GIF too (first frame)
    for fmt in ("PNG", "GIF"):
        p = _check(decode_image(_save(pal, fmt, transparency=1)), 2, 3, "P")
        np.testing.assert_allclose(p[0, 1], [0, 0, 0], atol=1e-7)
        np.testing.assert_allclose(p[0, 2], [10 / 255, 200 / 255, 30 / 255], atol=1e-7)


def test_alpha_is_composited_on_black():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = [200, 100, 50]
    rgba[0, :, 3] = [255, 0, 51]
    p = _check(decode_image(_save(Image.fromarray(rgba), "PNG")), 1, 3, "RGBA")
    np.testing.assert_allclose(p[0, 0], np.array([200, 100, 50]) / 255, atol=1e-6)
    np.testing.assert_allclose(p[0, 1], [0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(p[0, 2], np.array([200, 100, 50]) / 255 * 0.2, atol=1e-6)

    la = Image.fromarray(np.array([[[100, 255], [100, 0]]], dtype=np.uint8), mode="LA")
    p = _check(decode_image(_save(la, "PNG")), 1, 2, "LA")
    np.testing.assert_allclose(p[0, :, 0], [100 / 255, 0], atol=1e-6)


def test_cmyk_and_ycbcr():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # red
    p = _check(decode_image(_save(cmyk, "JPEG", quality=100)), 2, 2, "CMYK")
    np.testing.assert_allclose(p[0, 0], [1, 0, 0], atol=0.03)
    ycc = Image.new("RGB", (2, 2), (0, 0, 255)).convert("YCbCr")
    p = _check(decode_image(_save(ycc, "TIFF")), 2, 2, "YCbCr")
    np.testing.assert_allclose(p[1, 1], [0, 0, 1], atol=0.03)


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_sixteen_bit_grey(dtype):
    grey = np.array([[65535, 32768, 0, 1000]], dtype=np.uint16).astype(dtype)
    for data in (_png(grey, 0, 16), _save(Image.fromarray(grey), "TIFF")):
        img = decode_image(data)
        assert img.mode in ("I;16", "I;16B")
        p = _check(img, 1, 4, img.mode)
        np.testing.assert_allclose(p[0, :, 0], [1.0, 32768 / 65535, 0.0, 1000 / 65535], atol=1e-6)


def test_sixteen_bit_rgb_png_and_int_and_float_modes():
    rgb48 = np.array([[[65535, 32768, 0], [0, 65535, 65535]]], dtype=np.uint16)
    p = _check(decode_image(_png(rgb48, 2, 16)), 1, 2, "RGB")
    np.testing.assert_allclose(p[0, 0], [1.0, 0.5, 0.0], atol=1 / 255)
    np.testing.assert_allclose(p[0, 1], [0.0, 1.0, 1.0], atol=1e-7)

    as_int = Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.int32), mode="I")
    p = _check(decode_image(_save(as_int, "TIFF")), 1, 3, "I")
    np.testing.assert_allclose(p[0, :, 0], [1.0, 0.5, 0.0], atol=1e-4)

    as_float = Image.fromarray(np.array([[0.25, 1.5, -1.0]], dtype=np.float32), mode="F")
    p = _check(decode_image(_save(as_float, "TIFF")), 1, 3, "F")
    np.testing.assert_allclose(p[0, :, 2], [0.25, 1.0, 0.0], atol=1e-7)


def test_multi_frame_takes_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    p = _check(decode_image(data), 4, 4, "RGB")
    np.testing.assert_allclose(p[2, 2], [1, 0, 0], atol=1e-7)


# ---------------------------------------------------------------- EXIF


def test_exif_orientation_only_when_asked():
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = make_rgb(48, 64)
    data = _save(Image.fromarray(rgb), "JPEG", exif=exif.tobytes(), quality=95)

    stored = decode_image(data)
    assert (stored.width, stored.height, stored.exif_applied) == (64, 48, False)
    assert stored.pixels.shape == (48, 64, 3)

    turned = decode_image(data, apply_exif=True)
    assert (turned.width, turned.height, turned.exif_applied) == (48, 64, True)
    assert turned.pixels.shape == (64, 48, 3) and turned.pixels.flags.c_contiguous
    # orientation 6 = rotate 90 degrees clockwise to display
    np.testing.assert_allclose(turned.pixels, np.rot90(stored.pixels, k=-1), atol=1e-6)

    plain = decode_image(_save(Image.fromarray(rgb), "JPEG"), apply_exif=True)
    assert plain.exif_applied is False and plain.pixels.shape == (48, 64, 3)


# ---------------------------------------------------------------- bad data


def _raises(data: bytes, *words: str, **kw) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kw)
    msg = str(info.value)
    for word in words:
        assert word in msg, msg
    assert len(msg) < 200, msg
    return msg


def test_empty_and_not_an_image():
    assert _raises(b"", "empty file") == "empty file (0 bytes)"
    _raises(b"hello, this is a text file named x.png\n", "not an image", "text")
    rng = np.random.default_rng(1)
    _raises(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image")
    assert issubclass(DecodeError, ValueError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_truncated_files_are_refused_not_padded(fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = _save(Image.fromarray(make_rgb(48, 64)), fmt)
    for cut in (len(data) // 2, 40):
        _raises(data[:cut], "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_payload():
    data = bytearray(_png(make_rgb(8, 8), 2, 8))
    data[60:70] = b"\x00" * 10  # inside IDAT: CRC/zlib mismatch
    msg = _raises(bytes(data), "image")
    assert msg.startswith(("corrupt image", "truncated image")), msg


def test_decompression_bomb_guard():
    data = _save(Image.fromarray(make_rgb(48, 64)), "PNG")
    msg = _raises(data, max_pixels=1000)
    assert msg == "decompression bomb: 64x48 = 3072 pixels exceeds the limit of 1000"
    assert decode_image(data, max_pixels=3072).width == 64

    # a header claiming 60000 x 60000 (3.6 Gpx): refused from the header, before any pixel
    tiny = np.zeros((1, 1, 3), dtype=np.uint8)
    huge = _png(tiny, 2, 8, size=(60000, 60000))
    msg = _raises(huge, "decompression bomb", "60000x60000", max_pixels=10_000_000)
    assert "3600000000 pixels" in msg
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's global is never touched


def test_shared_real_images_decode(shared_data):
    paths = sorted((shared_data / "dev-lowlight").glob("*.png"))
    assert paths, "no images in dev-lowlight"
    for path in paths[:4]:
        data = path.read_bytes()
        img = decode_image(data)
        with Image.open(path) as ref:
            w, h = ref.size
            expected = np.asarray(ref.convert("RGB"))
        p = _check(img, h, w, "RGB")
        assert np.array_equal(to_uint8(p), expected)


# ---------------------------------------------------------------- names


def _names(plan):
    return {k: (v.rel_path, v.pil_format, v.error is not None) for k, v in plan.items()}


def test_plan_same_keeps_jpeg_and_png_converts_others():
    paths = ["a/x.jpg", "a/y.JPEG", "b/z.png", "b/w.PNG", "c/t.tif", "c/u.bmp", "noext"]
    plan = plan_output_names(paths, "same")
    assert list(plan) == paths
    assert _names(plan) == {
        "a/x.jpg": ("a/x.jpg", "JPEG", False),
        "a/y.JPEG": ("a/y.JPEG", "JPEG", False),
        "b/z.png": ("b/z.png", "PNG", False),
        "b/w.PNG": ("b/w.PNG", "PNG", False),
        "c/t.tif": ("c/t.png", "PNG", False),
        "c/u.bmp": ("c/u.png", "PNG", False),
        "noext": ("noext.png", "PNG", False),
    }


def test_plan_png_and_jpeg():
    assert _names(plan_output_names(["a.jpg", "b.png", "c.webp"], "png")) == {
        "a.jpg": ("a.png", "PNG", False),
        "b.png": ("b.png", "PNG", False),
        "c.webp": ("c.png", "PNG", False),
    }
    assert _names(plan_output_names(["a.jpeg", "b.png", "c.JPG", "d.tiff"], "jpeg")) == {
        "a.jpeg": ("a.jpeg", "JPEG", False),
        "b.png": ("b.jpg", "JPEG", False),
        "c.JPG": ("c.JPG", "JPEG", False),
        "d.tiff": ("d.jpg", "JPEG", False),
    }
    with pytest.raises(ValueError, match="format"):
        plan_output_names(["a.png"], "gif")


def test_plan_collisions():
    plan = plan_output_names(["a.tif", "a.png", "b.bmp", "b.tif", "c.gif", "d/a.tif"], "same")
    assert plan["a.png"] == plan["a.png"].__class__("a.png", "PNG", None)  # unchanged keeps
    assert plan["a.tif"].rel_path is None and plan["a.tif"].pil_format is None
    assert "collision" in plan["a.tif"].error and "'a.png'" in plan["a.tif"].error
    assert plan["b.bmp"].error and plan["b.tif"].error  # both changed -> both errors
    assert plan["c.gif"].rel_path == "c.png" and plan["d/a.tif"].rel_path == "d/a.png"

    # format 'jpeg': a.png -> a.jpg collides with an input a.jpg, which keeps its name
    plan = plan_output_names(["a.jpg", "a.png"], "jpeg")
    assert plan["a.jpg"].rel_path == "a.jpg" and plan["a.png"].error
    # a case-only difference is one file on case-insensitive stores
    assert plan_output_names(["A.PNG", "A.tif"], "same")["A.tif"].error
    # never two inputs mapped to one output (unchanged names are distinct inputs already)
    outs = [o.rel_path for o in plan_output_names(
        ["x.tif", "x.png", "x.bmp", "x.PNG", "y.gif"], "same").values() if o.rel_path]
    assert len(outs) == len(set(outs))


# ---------------------------------------------------------------- encode


def test_to_uint8_rounds_and_clips():
    x = np.array([-0.5, 0.0, 0.5 / 255, 0.49 / 255, 0.5, 1.0, 2.0, np.nan], dtype=np.float32)
    assert to_uint8(x).tolist() == [0, 0, 1, 0, 128, 255, 255, 0]
    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(every.astype(np.float32) / 255), every)
    assert to_uint8(every) is every


def test_encode_round_trip():
    rgb = make_rgb(24, 32, seed=3)
    png = encode_image(rgb.astype(np.float32) / 255, "PNG")
    assert png.startswith(b"\x89PNG")
    assert np.array_equal(to_uint8(decode_image(png).pixels), rgb)
    assert encode_image(rgb, "PNG") == png

    jpg = encode_image(rgb, "JPEG", quality=90)
    assert jpg.startswith(b"\xff\xd8")
    yy, xx = np.mgrid[0:24, 0:32]
    smooth = np.stack([xx * 6, yy * 8, 255 - xx * 4], axis=-1).astype(np.uint8)
    back = to_uint8(decode_image(encode_image(smooth, "JPEG")).pixels).astype(int)
    assert np.abs(back - smooth).mean() < 2.5
    with Image.open(io.BytesIO(jpg)) as im:
        assert im.layer[0][1:3] == (2, 2)  # 4:2:0: luma sampled 2x2
    with Image.open(io.BytesIO(encode_image(rgb, "JPEG", quality=95))) as im:
        assert im.layer[0][1:3] == (1, 1)  # 4:4:4 at quality >= 95
    assert len(encode_image(rgb, "JPEG", quality=30)) < len(jpg)
    with pytest.raises(ValueError):
        encode_image(rgb, "GIF")
