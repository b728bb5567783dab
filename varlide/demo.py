"""A synthetic low-light demo corpus, made with the paper's degradation model.

    x_LQ = clip(gamma(k * x_HQ) + n, 0, 1)

applied to clean colour photographs, in this order:

1. motion blur ``k * x_HQ``: a linear kernel of random length 1..15 px (about a third of the
   images nearly sharp, length 1..3) at a random angle (:func:`motion_blur_kernel`);
2. darkening ``gamma(.)``: a power curve then an exposure scale, ``exposure * x ** gamma``,
   with ``gamma`` in [1.0, 2.0] and ``exposure`` in [0.05, 0.3];
3. sensor noise ``n``: signal-dependent shot noise plus Gaussian read noise (a Poisson-Gaussian
   model), ``n ~ N(0, shot_noise * x + noise_sigma ** 2)`` per pixel and channel;
4. clip to [0, 1].

Every image draws its parameters from ``np.random.default_rng([seed, index])``, so the same
seed gives identical bytes, and a corpus of ``count`` images is a prefix of a larger one.

Source photographs are the colour photos bundled inside the scikit-image wheel (read from the
package folder, never downloaded): astronaut, chelsea, coffee, rocket and motorcycle_left.

:func:`make_demo_corpus` writes, under any fsspec URI ``OUT``::

    OUT/lowlight/<name>.png     the degraded image (the enhancement input)
    OUT/reference/<name>.png    the clean crop it came from (same relative name)
    OUT/degradations.json       each image's source, crop and degradation parameters

Images are random crops of ``size`` (width, height) of a randomly rescaled photograph, cycling
over the photographs (see ``random_crop``); every 5th
image (index 4, 9, 14, ...) is a (256, 256) crop instead, so a demo corpus mixes two sizes and
exercises the engine's batching by size.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from varlide.imaging.encode import encode_image
from varlide.storage.uri import join

__all__ = [
    "Degradation",
    "motion_blur_kernel",
    "degrade",
    "source_photographs",
    "make_demo_corpus",
]

PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}
ODD_SIZE = (256, 256)
ODD_EVERY = 5
MODEL = "x_LQ = clip(exposure * (k * x_HQ) ** gamma + n, 0, 1), n ~ N(0, shot*x + sigma^2)"


@dataclass
class Degradation:
    gamma: float  # power curve exponent (>= 1 darkens mid-tones)
    exposure: float  # linear scale after the power curve
    kernel_length: int  # motion-blur length in pixels (1 = sharp)
    kernel_angle: float  # degrees, counter-clockwise from the x axis
    noise_sigma: float  # Gaussian read-noise standard deviation
    shot_noise: float  # shot-noise gain: variance = shot_noise * signal


def motion_blur_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A linear motion-blur kernel (odd square, float32, sums to 1) through its centre.

    ``length`` 1 gives the identity ``[[1.0]]``; the kernel is ``length`` (odd) or
    ``length + 1`` (even) pixels square, with the line's centre on the centre pixel.
    """
    length = int(length)
    if length < 1:
        raise ValueError(f"length: expected >= 1, got {length}")
    if length == 1:
        return np.ones((1, 1), dtype=np.float32)
    size = 2 * math.ceil((length - 1) / 2) + 1
    centre = size // 2
    theta = math.radians(angle_deg)
    # Dense samples along a segment of ``length`` px, each counted in the pixel it falls in:
    # the line's length inside every pixel cell (an axis-aligned line gives exactly 1/length).
    n = 16 * length
    t = (np.arange(n) + 0.5) / n * length - length / 2
    xs = np.clip(np.rint(centre + t * math.cos(theta)), 0, size - 1).astype(int)
    ys = np.clip(np.rint(centre - t * math.sin(theta)), 0, size - 1).astype(int)
    kernel = np.zeros((size, size), dtype=np.float64)
    np.add.at(kernel, (ys, xs), 1.0)
    return (kernel / kernel.sum()).astype(np.float32)


def trajectory_kernel(length: float, rng: np.random.Generator, size: int | None = None,
                      steps: int = 256, turn: float = 0.15) -> np.ndarray:
    """A random camera-shake kernel (odd square, float32, sums to 1): a random walk whose
    direction turns by ``turn`` radians (s.d.) per step, scaled to ``length`` px of path,
    centred on its mean and splatted bilinearly. The curved, uneven kernels of real hand
    shake (the kind VARSR's and LEDNet's training pairs draw), beside the straight lines of
    :func:`motion_blur_kernel`."""
    if length < 1:
        raise ValueError(f"length: expected >= 1, got {length}")
    size = size or 2 * math.ceil(length / 2) + 1
    if size % 2 == 0:
        raise ValueError(f"size: expected an odd kernel side, got {size}")
    angles = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0.0, turn, steps))
    path = np.cumsum(np.stack([np.cos(angles), np.sin(angles)], axis=1), axis=0)
    path = (path - path.mean(axis=0)) * (float(length) / steps) + size // 2
    path = np.clip(path, 0, size - 1 - 1e-6)
    kernel = np.zeros((size, size), dtype=np.float64)
    x0, y0 = np.floor(path[:, 0]).astype(int), np.floor(path[:, 1]).astype(int)
    fx, fy = path[:, 0] - x0, path[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(kernel, (np.minimum(y0 + dy, size - 1), np.minimum(x0 + dx, size - 1)), w)
    return (kernel / kernel.sum()).astype(np.float32)


def blur_pair(clean: np.ndarray, rng: np.random.Generator, kernel_max: int = 23,
              trajectory_prob: float = 0.5, sharp_prob: float = 0.15,
              noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A restoration training input from a clean (H, W, 3) float crop: motion blur (a
    ``sharp_prob`` share 1-2 px, else 3..``kernel_max`` px; a random trajectory with
    probability ``trajectory_prob``, else a straight line), the demo's Poisson-Gaussian
    noise ranges, the 8-bit grid. Returns (degraded float32, kernel)."""
    from scipy.signal import fftconvolve

    length = int(rng.integers(1, 3)) if rng.random() < sharp_prob else int(
        rng.integers(3, kernel_max + 1))
    if rng.random() < trajectory_prob:
        kernel = trajectory_kernel(length, rng)
    else:
        kernel = motion_blur_kernel(length, rng.uniform(0.0, 180.0))
    x = np.asarray(clean, dtype=np.float32)
    h = kernel.shape[0] // 2
    if h:
        padded = np.pad(x, ((h, h), (h, h), (0, 0)), mode="reflect")
        x = fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))
        x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if noise:
        sigma, shot = rng.uniform(0.0, 0.012), rng.uniform(0.0, 0.006)
        z = rng.standard_normal(x.shape, dtype=np.float32)
        x = np.clip(x + np.sqrt(np.float32(shot) * x + np.float32(sigma) ** 2) * z, 0, 1)
    return (np.round(x * 255) / 255).astype(np.float32), kernel


def _draw(rng: np.random.Generator) -> Degradation:
    """Random parameters; always the same number of draws, so overrides never shift the rng."""
    gamma = rng.uniform(1.0, 2.0)
    exposure = rng.uniform(0.05, 0.3)
    sharp = rng.random() < 0.3
    length_any = int(rng.integers(1, 16))
    length_sharp = int(rng.integers(1, 4))
    angle = rng.uniform(0.0, 180.0)
    noise_sigma = rng.uniform(0.001, 0.012)
    shot_noise = rng.uniform(0.0, 0.006)
    return Degradation(
        gamma=round(float(gamma), 6),
        exposure=round(float(exposure), 6),
        kernel_length=length_sharp if sharp else length_any,
        kernel_angle=round(float(angle), 6),
        noise_sigma=round(float(noise_sigma), 6),
        shot_noise=round(float(shot_noise), 6),
    )


def degrade(
    clean: np.ndarray, rng: np.random.Generator, **overrides: float
) -> tuple[np.ndarray, Degradation]:
    """Degrade an (H, W, 3) float image in [0, 1]; returns (float32 low-light, parameters).

    Parameters are drawn from ``rng``; any :class:`Degradation` field given as a keyword
    overrides its draw. With ``gamma=1, exposure=1, kernel_length=1, noise_sigma=0,
    shot_noise=0`` the clean image comes back unchanged.
    """
    fields = {f.name for f in dataclasses.fields(Degradation)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"degrade: unknown parameter(s) {sorted(unknown)}; known: {sorted(fields)}")
    params = dataclasses.replace(_draw(rng), **overrides)
    params.kernel_length = int(params.kernel_length)

    x = np.asarray(clean, dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"clean: expected shape (H, W, 3), got {x.shape}")
    x = np.clip(x, 0.0, 1.0)

    kernel = motion_blur_kernel(params.kernel_length, params.kernel_angle)
    if kernel.shape != (1, 1):
        x = ndimage.convolve(x, kernel[:, :, None], mode="reflect")
        np.clip(x, 0.0, 1.0, out=x)
    if params.gamma != 1.0:
        x = np.power(x, np.float32(params.gamma), dtype=np.float32)
    if params.exposure != 1.0:
        x = x * np.float32(params.exposure)

    # One standard normal draw per pixel and channel, whatever the parameters (determinism).
    z = rng.standard_normal(x.shape, dtype=np.float32)
    std = np.sqrt(np.float32(params.shot_noise) * x + np.float32(params.noise_sigma) ** 2)
    out = x + std * z
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False), params


@functools.lru_cache(maxsize=1)
def photos_uint8() -> tuple[tuple[str, np.ndarray], ...]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    found = []
    for name, filename in PHOTOS.items():
        path = folder / filename
        if not path.is_file():  # not bundled in this scikit-image build: skip, never download
            continue
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        arr.flags.writeable = False
        found.append((name, arr))
    if not found:
        raise RuntimeError(
            f"no bundled scikit-image photographs found in {folder} "
            f"(looked for {', '.join(PHOTOS.values())})"
        )
    return tuple(found)


def source_photographs() -> dict[str, np.ndarray]:
    """The bundled colour photographs, (H, W, 3) float32 in [0, 1], by name (offline)."""
    return {name: arr.astype(np.float32) / np.float32(255.0) for name, arr in photos_uint8()}


def random_crop(
    photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """A random (width, height) uint8 crop of a randomly rescaled photo.

    The photo is resized (up or down) so the crop spans a random 50-100 % of its limiting
    side, so a small crop still shows a scene rather than a patch of texture; crops that are
    nearly black or flat (a night sky, a studio background) are redrawn, up to 20 tries.
    """
    w, h = size
    ph, pw = photo.shape[:2]
    fraction = rng.uniform(0.5, 1.0)
    scale = max(w / pw, h / ph) / fraction
    new = (max(w, round(pw * scale)), max(h, round(ph * scale)))
    resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS
    scaled = np.asarray(Image.fromarray(photo).resize(new, resample))
    for _ in range(20):
        x0 = int(rng.integers(0, new[0] - w + 1))
        y0 = int(rng.integers(0, new[1] - h + 1))
        crop = scaled[y0 : y0 + h, x0 : x0 + w]
        if crop.mean() >= 40 and crop.std() >= 12:
            break
    flip = bool(rng.random() < 0.5)
    if flip:
        crop = crop[:, ::-1]
    info = {"resized_to": list(new), "crop_xywh": [x0, y0, w, h], "flipped": flip}
    return np.ascontiguousarray(crop), info


def make_demo_corpus(
    out_uri: str, count: int = 20, size: tuple[int, int] = (320, 240), seed: int = 0
) -> list[str]:
    """Write ``count`` low-light/reference pairs and degradations.json under ``out_uri``.

    Returns the relative names (``0000_astronaut.png`` ...), the same under ``lowlight/`` and
    ``reference/``.
    """
    if count < 1:
        raise ValueError(f"count: expected >= 1, got {count}")
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise ValueError(f"size: expected a positive (width, height), got {size}")
    photos = photos_uint8()
    from varlide.storage.uri import write_bytes


    names: list[str] = []
    records: dict[str, dict] = {}
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        photo_name, photo = photos[i % len(photos)]
        crop_size = ODD_SIZE if i % ODD_EVERY == ODD_EVERY - 1 else size
        clean_u8, crop_info = random_crop(photo, crop_size, rng)
        clean = clean_u8.astype(np.float32) / np.float32(255.0)
        low, params = degrade(clean, rng)

        name = f"{i:04d}_{photo_name}.png"
        write_bytes(join(out_uri, "lowlight", name), encode_image(low, "PNG"))
        write_bytes(join(out_uri, "reference", name), encode_image(clean_u8, "PNG"))
        names.append(name)
        records[name] = {"source": photo_name, **crop_info, **dataclasses.asdict(params)}

    manifest = {
        "model": MODEL,
        "seed": seed,
        "count": count,
        "size": list(size),
        "odd_size": {"every": ODD_EVERY, "size": list(ODD_SIZE)},
        "images": records,
    }
    write_bytes(join(out_uri, "degradations.json"),
                json.dumps(manifest, indent=1, sort_keys=True).encode())
    return names


def main(argv: list[str] | None = None) -> int:
    """``python -m varlide.demo OUT [--count N] [--size WxH] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m varlide.demo", description="Write a synthetic low-light demo corpus."
    )
    parser.add_argument("out", help="output URI (local folder, s3://..., memory://...)")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    names = make_demo_corpus(args.out, count=args.count, size=(w, h), seed=args.seed)
    print(f"wrote {len(names)} low-light/reference pairs under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
