"""The CUDA path's image I/O (``varlide.imaging.gpu``) and ``benchmarks/gpu_suite.py``.

Everything runs on CPU (torchvision's libjpeg stands in for nvJPEG, through the same batched
call and fallbacks); the checks that need CUDA are skipped without it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from varlide.imaging import gpu
from varlide.imaging.decode import DecodeError, decode_image, pixels_as_float
from varlide.imaging.encode import encode_image
from varlide.imaging.encode import to_uint8 as np_to_uint8

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
MAX_PIXELS = 10_000  # the 64x48 files pass, the 300x200 one does not
BLOCKED = ("prefect", "mlflow", "pyiqa", "open_clip", "pydantic", "yaml", "fsspec",
           "safetensors")


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with noise: JPEG-like content, uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 200 + 20
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _bad_huffman(jpeg: bytes) -> bytes:
    """A JPEG whose header is fine but whose first Huffman table is bogus: libjpeg refuses
    it in the batched call, after ``device_decodable`` said yes."""
    i = jpeg.index(b"\xff\xc4")
    out = bytearray(jpeg)
    out[i + 5:i + 21] = b"\xff" * 16  # the 16 code-length counts
    return bytes(out)


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    a = _photo()
    im = Image.fromarray(a)
    rgb = _save(im, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    grey16 = Image.fromarray(a[..., 0].astype(np.uint16) * 257)  # mode I;16
    rgba = np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])
    return {
        "jpeg": rgb,
        "png": _save(im, "PNG"),
        "grey_jpeg": _save(im.convert("L"), "JPEG", quality=90),
        "cmyk_jpeg": _save(im.convert("CMYK"), "JPEG", quality=90),
        "progressive_jpeg": _save(im, "JPEG", quality=90, progressive=True),
        "rotated_jpeg": _save(im, "JPEG", quality=90, exif=exif.tobytes()),
        "png16": _save(grey16, "PNG"),
        "rgba_png": _save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "bad_huffman_jpeg": _bad_huffman(rgb),
        "truncated_jpeg": rgb[: len(rgb) // 2],
        "garbage": bytes(range(256)) * 4,
        "empty": b"",
        "too_many_pixels": _save(Image.fromarray(_photo(200, 300, 1)), "JPEG", quality=90),
    }


def _cpu(data: bytes, apply_exif: bool = False) -> np.ndarray | str:
    try:
        return decode_image(data, apply_exif=apply_exif, max_pixels=MAX_PIXELS,
                            keep_uint8=True).pixels
    except DecodeError as exc:
        return str(exc)


# --------------------------------------------------------------------------- header


def test_only_plain_colour_jpegs_go_to_the_batched_decoder(files):
    routed = {k for k, d in files.items() if gpu.device_decodable(d, MAX_PIXELS)}
    # bad_huffman's header is fine: only decoding finds the fault (the fallback test)
    assert routed == {"jpeg", "rotated_jpeg", "bad_huffman_jpeg"}
    assert not gpu.device_decodable(files["rotated_jpeg"], MAX_PIXELS, apply_exif=True)
    assert gpu.device_decodable(files["too_many_pixels"])  # the default limit allows it


def test_jpeg_header_reads_the_frame_header(files):
    h = gpu.jpeg_header(files["jpeg"])
    assert (h.width, h.height, h.components, h.sof, h.precision) == (64, 48, 3, 0xC0, 8)
    assert h.complete and h.orientation == 1 and not h.multi_picture
    assert gpu.jpeg_header(files["progressive_jpeg"]).sof == 0xC2
    assert gpu.jpeg_header(files["grey_jpeg"]).components == 1
    cmyk = gpu.jpeg_header(files["cmyk_jpeg"])
    assert cmyk.components == 4 and cmyk.adobe_transform == 0
    assert gpu.jpeg_header(files["rotated_jpeg"]).orientation == 6
    assert not gpu.jpeg_header(files["truncated_jpeg"]).complete
    for name in ("png", "garbage", "empty"):
        assert gpu.jpeg_header(files[name]) is None


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("apply_exif", [False, True])
def test_decode_batch_matches_the_cpu_decoder(files, apply_exif):
    got = gpu.decode_batch(list(files.values()), "cpu", MAX_PIXELS, apply_exif=apply_exif)
    assert len(got) == len(files)
    for (name, data), item in zip(files.items(), got, strict=True):
        want = _cpu(data, apply_exif)
        if isinstance(want, str):
            assert item == want, name
            continue
        assert isinstance(item, torch.Tensor), (name, item)
        assert item.shape == (3, *want.shape[:2]) and item.is_contiguous(), name
        assert item.dtype == (torch.uint8 if want.dtype == np.uint8 else torch.float32), name
        diff = np.abs(item.permute(1, 2, 0).numpy().astype(np.float64) - want)
        assert diff.max() <= gpu.CPU_DECODE_TOLERANCE, name


def test_bad_files_get_the_cpu_decoders_reasons(files):
    got = dict(zip(files, gpu.decode_batch(list(files.values()), "cpu", MAX_PIXELS),
                   strict=True))
    assert got["empty"] == "empty file (0 bytes)"
    assert got["truncated_jpeg"].startswith("truncated image: ")
    assert got["garbage"].startswith("not an image: ")
    assert got["too_many_pixels"] == ("decompression bomb: 300x200 = 60000 pixels exceeds "
                                      "the limit of 10000")
    assert got["bad_huffman_jpeg"].startswith("corrupt image: ")


def test_a_file_the_batched_call_refuses_falls_back_alone(files):
    good, bad = files["jpeg"], files["bad_huffman_jpeg"]
    with pytest.raises(RuntimeError):  # the premise: libjpeg refuses it, failing the batch
        decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in (good, bad)])
    items = gpu.decode_batch_images([good, bad, files["rotated_jpeg"]], "cpu")
    assert items[0].on_device and items[2].on_device  # decoded one by one, still batched path
    assert items[1] == _cpu(bad)
    assert torch.equal(items[0].pixels.permute(1, 2, 0), torch.from_numpy(_cpu(good).copy()))


def test_decode_batch_images_says_what_a_row_records(files):
    names = ["jpeg", "png", "rotated_jpeg", "png16"]
    items = gpu.decode_batch_images([files[n] for n in names], "cpu", apply_exif=True)
    jpeg, png, rotated, png16 = items
    assert (jpeg.width, jpeg.height, jpeg.mode, jpeg.on_device) == (64, 48, "RGB", True)
    assert not png.on_device and png.mode == "RGB"
    assert rotated.exif_applied and not rotated.on_device
    assert (rotated.width, rotated.height) == (48, 64) == tuple(rotated.pixels.shape[:0:-1])
    assert png16.mode == "I;16" and png16.pixels.dtype == torch.float32


def test_to_float_batch_gives_decode_images_float_values(files):
    datas = [files["jpeg"], files["png"], files["rgba_png"]]
    batch = gpu.to_float_batch(gpu.decode_batch(datas, "cpu"))
    want = np.stack([decode_image(d).pixels for d in datas])
    assert batch.dtype == torch.float32
    assert np.array_equal(batch.permute(0, 2, 3, 1).numpy(), want)
    u8 = decode_image(datas[0], keep_uint8=True).pixels
    assert np.array_equal(pixels_as_float(u8), want[0])


# --------------------------------------------------------------------------- encode


def test_to_uint8_rounds_like_the_cpu_encoder():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.4999, 0.5, 1.0, 2.0, float("nan")])
    got = gpu.to_uint8(x.view(1, 1, -1)).flatten().numpy()
    assert np.array_equal(got, np_to_uint8(x.numpy()))
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(gpu.to_uint8(u8.float() / 255), u8)


def test_encode_jpeg_batch_on_cpu_is_the_cpu_encoders_bytes():
    frames = np.stack([_photo(48, 64, s) for s in range(3)])
    floats = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    for quality in (90, 97):
        got = gpu.encode_jpeg_batch(floats, quality)
        assert got == [encode_image(f, "JPEG", quality) for f in frames]
        assert gpu.encode_jpeg_batch(torch.from_numpy(frames).permute(0, 3, 1, 2),
                                     quality) == got
    back = np.stack([decode_image(b, keep_uint8=True).pixels for b in got])
    assert np.abs(back.astype(int) - frames).mean() < 6  # a lossy round trip, not a copy
    assert gpu.encode_jpeg_batch([], 90) == []


def test_transfers_are_no_ops_on_cpu():
    t = gpu.Transfers("cpu")
    a = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    up = t.upload(a).get()
    assert np.shares_memory(up.numpy(), a)
    down = t.download(up).get()
    assert down is up


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_decode_is_close_to_pillow_and_errors_agree(files):
    got = gpu.decode_batch(list(files.values()), "cuda", MAX_PIXELS)
    for (name, data), item in zip(files.items(), got, strict=True):
        want = _cpu(data)
        if isinstance(want, str):
            assert item == want, name
            continue
        assert item.is_cuda and item.shape == (3, *want.shape[:2]), name
        x = item.cpu().permute(1, 2, 0).numpy().astype(np.float64)
        scale = 255.0 if want.dtype == np.uint8 else 1.0
        assert np.abs(x - want).mean() <= gpu.CUDA_DECODE_MEAN_TOLERANCE / 255 * scale, name


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_encode_round_trip_and_transfers():
    frames = np.stack([_photo(48, 64, s) for s in range(4)])
    transfers = gpu.Transfers("cuda")
    dev = transfers.upload(frames).get()
    assert dev.is_cuda and torch.equal(transfers.download(dev).get(), torch.from_numpy(frames))
    encoded = gpu.encode_jpeg_batch(dev.permute(0, 3, 1, 2).float() / 255, 90)
    back = np.stack([decode_image(b, keep_uint8=True).pixels for b in encoded])
    assert np.abs(back.astype(int) - frames).mean() < 6


# --------------------------------------------------------------------------- the suite


def test_suite_reads_the_shipped_weights_like_safetensors():
    st = pytest.importorskip("safetensors.torch")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.gpu_suite import read_safetensors
    finally:
        sys.path.remove(str(ROOT))
    data = (ROOT / "varlide/models/shipped/varlide-lite/model.safetensors").read_bytes()
    ours, theirs = read_safetensors(data), st.load(data)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


_BLOCKER = textwrap.dedent(f"""
    import importlib.abc, runpy, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError("blocked for this test: " + name)
    sys.meta_path.insert(0, Block())
    sys.argv = ["gpu_suite.py", *sys.argv[1:]]
    runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
""")


def test_suite_quick_cpu_run_without_the_heavy_packages():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = ["--device", "cpu", "--images", "8", "--size", "320x180", "--quick",
            "--jpeg-dir", str(ROOT / "no-such-dir")]
    proc = subprocess.run([sys.executable, "-c", _BLOCKER, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "gpu_suite results" in out
    for stage in ("decode", "prior", "enhance", "measures", "encode", "end to end"):
        assert f"\n{stage} " in out, stage
    assert "check FAIL" not in out and "check ok" in out
    # the bare-machine detours were taken, and said so
    assert "weights read by the suite's reader" in out
    assert "import varlide.priors failed" not in out  # priors import on a bare machine


# --------------------------------------------------------------------------- the engine

SIZES = ((48, 64), (60, 80))  # (h, w): two buckets of JPEG frames
EXACT = ("status", "error", "width", "height", "exif_applied", "sha256", "size_bytes",
         "enhancer", "route")  # equal in every run (route: in exact runs)


def _shard_corpus(folder: Path) -> None:
    """6 JPEG frames of 2 sizes; of a frame's size (same batch): an 8-bit and a 16-bit PNG,
    a progressive JPEG (all decoded in the I/O pool) and a bad-Huffman JPEG (its header
    sends it to the batched decoder, which refuses it); a JPEG with EXIF orientation 6 (the
    pool rotates it with ``apply_exif``, else the lane decodes it); a truncated JPEG and a
    non-image."""
    folder.mkdir(parents=True)
    for i in range(6):
        h, w = SIZES[i % 2]
        Image.fromarray(_photo(h, w, seed=i)).save(folder / f"f{i}.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_photo(*SIZES[1], seed=11)).save(folder / "rotated.jpg", quality=90,
                                                     exif=exif.tobytes())
    frame = Image.fromarray(_photo(*SIZES[0], seed=9))
    frame.save(folder / "p.png")
    Image.fromarray(_photo(*SIZES[0], seed=10)[..., 0].astype(np.uint16) * 257).save(
        folder / "p16.png")
    frame.save(folder / "progressive.jpg", quality=90, progressive=True)
    jpeg = _save(frame, "JPEG", quality=90)
    (folder / "bad_huffman.jpg").write_bytes(_bad_huffman(jpeg))
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.jpg").write_bytes(b"not an image at all, just some text\n")


def _run_shard(corpus: Path, out: Path, monkeypatch, device_io: bool, **overrides):
    """Rows (by rel_path) and enhanced files (by rel_path) of one run through
    ``process_shard`` with the device-I/O switch as given."""
    import pandas as pd

    from varlide.config import load_config
    from varlide.engine import process_shard
    from varlide.run import prepare_run

    monkeypatch.setenv("VARLIDE_DEVICE_IO", "1" if device_io else "0")
    cfg = load_config(overrides={"progress": False, "decode_threads": 2, **overrides})
    plan = prepare_run(str(corpus), str(out), cfg, fresh=True)
    for shard in plan.pending:
        process_shard(plan.job(shard))
    rows = pd.read_parquet(out / "scores").sort_values("rel_path").set_index("rel_path")
    enhanced = {p.relative_to(out).as_posix(): p.read_bytes()
                for p in out.rglob("*") if p.is_file() and p.suffix in (".jpg", ".png")}
    return rows, enhanced


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _compare_runs(a, b, rtol: float = 0.0, pixel_mean: float = 0.0) -> None:
    """Same rows and enhanced files. Exact (``rtol`` 0): every compared column equal and
    the files' bytes equal. Else status, error, geometry and hash equal, scores within
    ``rtol`` (+ 0.01 absolute), mean |pixel diff| of each file <= ``pixel_mean``; route and
    iterations may then differ (a score at a threshold)."""
    (rows_a, files_a), (rows_b, files_b) = a, b
    exact = rtol == 0 and pixel_mean == 0
    assert list(rows_a.index) == list(rows_b.index)
    scores = [c for c in rows_a.columns if c.startswith("q_")]
    assert len(scores) >= 4
    for col in EXACT if exact else EXACT[:-1]:
        assert rows_a[col].equals(rows_b[col]), (col, rows_a[col], rows_b[col])
    for col in [*scores, "visibility", "blur", *(["n_iter", "phase_strength"] * exact)]:
        x, y = rows_a[col].astype(float), rows_b[col].astype(float)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=0 if exact else 0.01,
                                   equal_nan=True, err_msg=col)
    assert rows_a["enhanced_uri"].isna().equals(rows_b["enhanced_uri"].isna())
    assert sorted(files_a) == sorted(files_b) and files_a
    for name, data in files_a.items():
        if exact:
            assert data == files_b[name], name
        else:
            diff = np.abs(_pixels(data) - _pixels(files_b[name]))
            assert diff.mean() <= pixel_mean, (name, diff.mean())


def _expected_statuses(rows) -> None:
    errors = rows.loc[rows["status"] == "error", "error"].to_dict()
    assert set(errors) == {"bad_huffman.jpg", "notes.jpg", "truncated.jpg"}, errors
    assert errors["truncated.jpg"].startswith("truncated image: ")
    assert errors["bad_huffman.jpg"].startswith("corrupt image: ")
    assert errors["notes.jpg"].startswith("not an image: ")
    assert rows.loc["bad_huffman.jpg", ["width", "height"]].isna().all()
    assert rows["sha256"].notna().all()
    assert rows.loc["p16.png", ["width", "height"]].tolist() == [64, 48]


@pytest.fixture(scope="module")
def shard_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("device-io") / "in"
    _shard_corpus(folder)
    return folder


@pytest.mark.parametrize("overrides", [
    # every output encoded by the lanes; the rotated JPEG to the pool; the inputs as their
    # own references (full-reference measures on both sides)
    {"enhancer": "classic-curve", "format": "jpeg", "apply_exif": True, "reference": "IN"},
    {},  # the default enhancer and measures; 'same': JPEG and PNG outputs in one batch
], ids=["classic-curve-jpeg-exif-ref", "default"])
def test_device_io_on_cpu_gives_the_cpu_paths_rows_and_files(shard_corpus, tmp_path,
                                                             monkeypatch, overrides):
    if overrides.get("reference") == "IN":
        overrides = {**overrides, "reference": str(shard_corpus)}
    calls = _spy(monkeypatch)
    cpu = _run_shard(shard_corpus, tmp_path / "cpu", monkeypatch, False, device="cpu",
                     **overrides)
    assert calls == {"decoded": 0, "encoded": 0}  # off: today's path, Pillow in the pool
    dev = _run_shard(shard_corpus, tmp_path / "dev", monkeypatch, True, device="cpu",
                     **overrides)
    # on: the 6 frames, the bad-Huffman file and (without apply_exif) the rotated one
    # decoded by the lanes, not the PNGs nor the progressive JPEG; JPEG outputs encoded
    # there (all 10 with format jpeg, else all but the PNGs': the writer encodes those)
    exif = overrides.get("apply_exif", False)
    assert calls == {"decoded": 7 if exif else 8, "encoded": 10 if exif else 8}
    _expected_statuses(cpu[0])
    rotated = cpu[0].loc["rotated.jpg"]
    assert (rotated["width"], rotated["height"], rotated["exif_applied"]) == \
        ((60, 80, True) if exif else (80, 60, False))
    if "reference" in overrides:
        assert cpu[0].loc["f0.jpg", "q_psnr_in"] >= 60  # itself as reference (capped)
    _compare_runs(cpu, dev)
    _compare_runs(cpu, dev, rtol=0.05, pixel_mean=4.0)  # the CUDA test's comparison runs


def _spy(monkeypatch) -> dict[str, int]:
    """Counts of files through ``gpu.decode_batch_images`` and ``gpu.encode_jpeg_batch``."""
    calls = {"decoded": 0, "encoded": 0}
    decode, encode = gpu.decode_batch_images, gpu.encode_jpeg_batch

    def decoding(datas, *args, **kwargs):
        calls["decoded"] += len(datas)
        return decode(datas, *args, **kwargs)

    def encoding(images, *args, **kwargs):
        calls["encoded"] += len(images)
        return encode(images, *args, **kwargs)

    monkeypatch.setattr(gpu, "decode_batch_images", decoding)
    monkeypatch.setattr(gpu, "encode_jpeg_batch", encoding)
    return calls


def test_device_io_keeps_jpeg_bytes_for_the_lane(shard_corpus, monkeypatch):
    """A JPEG the device decodes waits as its compressed bytes with its header's size (the
    ledger's bytes); a PNG is decoded in the pool as on the CPU path."""
    from varlide.config import load_config
    from varlide.engine import _read_and_decode
    from varlide.run import prepare_run

    cfg = load_config(overrides={"progress": False, "device": "cpu"})
    plan = prepare_run(str(shard_corpus), str(shard_corpus.parent / "out"), cfg, fresh=True)
    job = plan.job(plan.pending[0])
    by_name = {f.rel_path: f for f in job.shard.files}
    kept = _read_and_decode(job, cfg, by_name["f1.jpg"], device_io=True)
    data = (shard_corpus / "f1.jpg").read_bytes()
    assert kept.image is None and kept.data == data and kept.ready
    assert kept.size() == SIZES[1] and kept.waiting_bytes() == len(data)
    assert (kept.row["width"], kept.row["height"]) == SIZES[1][::-1]
    png = _read_and_decode(job, cfg, by_name["p.png"], device_io=True)
    assert png.data is None and png.image is not None
    assert png.waiting_bytes() == png.image.pixels.nbytes
    for name in ("f1.jpg", "p.png"):
        off = _read_and_decode(job, cfg, by_name[name])
        assert off.data is None and off.image is not None


def test_device_io_too_big_for_the_budget_by_its_header(tmp_path, monkeypatch):
    """The ledger prices a kept JPEG from its header: one the budget cannot hold gets the
    CPU path's error row (with its size) before any pixel is decoded."""
    folder = tmp_path / "in"
    (folder / "big").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_photo(240, 320, seed=i)).save(folder / f"f{i}.jpg", quality=90)
    Image.fromarray(_photo(1500, 2000, seed=3)).save(folder / "big" / "f.jpg", quality=90)
    calls = _spy(monkeypatch)
    runs = [_run_shard(folder, tmp_path / name, monkeypatch, on, device="cpu",
                       enhancer="classic-curve", memory_budget="64MB")
            for name, on in (("off", False), ("on", True))]
    assert calls["decoded"] == 2  # the big one never reached a lane
    rows = runs[1][0]
    assert rows["status"].to_dict() == {"big/f.jpg": "error", "f0.jpg": "ok", "f1.jpg": "ok"}
    assert "too large for the memory budget: 2000x1500" in rows.loc["big/f.jpg", "error"]
    assert rows["width"].tolist() == [2000, 320, 320]
    # the cost in its message counts the file's bytes waiting, not its decoded pixels
    off, on = (r[0].loc["big/f.jpg", "error"] for r in runs)
    assert off.split(" needs ")[0] == on.split(" needs ")[0]
    for r in runs:
        r[0].loc["big/f.jpg", "error"] = "too large"
    _compare_runs(*runs)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_device_io_on_cuda_is_close_to_the_cpu_decode(shard_corpus, tmp_path, monkeypatch):
    """nvJPEG decodes (and encodes, 4:4:4) a few levels away from Pillow: same rows and
    statuses, scores and pixels within a tolerance."""
    overrides = {"enhancer": "classic-curve", "device": "cuda"}
    off = _run_shard(shard_corpus, tmp_path / "off", monkeypatch, False, **overrides)
    on = _run_shard(shard_corpus, tmp_path / "on", monkeypatch, True, **overrides)
    _expected_statuses(on[0])
    _compare_runs(off, on, rtol=0.05, pixel_mean=4.0)
