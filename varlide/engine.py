"""The worker core: one shard through decode -> prior -> enhance -> quality -> write.

``process_shard`` is the only per-image code path of a run. It knows nothing of Prefect: the
flow's task calls it, a Dask worker calls it, a benchmark calls it. Models and metrics are
built once per process (``get_stages``) and reused across shards.

How the work is overlapped (CPU and GPU alike):
- reading + hashing + decoding run ahead in a thread pool (Pillow and hashlib release the
  GIL), bounded to a window of images so memory stays flat however big the shard is;
- decoded images wait in per-size buckets; a full bucket (``batch_size``) becomes one batch
  through prior, enhancer and metrics on the device;
- encoding + writing enhanced images runs behind compute in the same kind of pool;
- device I/O (on for CUDA, ``VARLIDE_DEVICE_IO``: :func:`device_io_enabled`): the pool only
  reads and hashes a JPEG that ``varlide.imaging.gpu`` decodes on the device, keeping its
  bytes and header size (the ledger holds the compressed bytes); the compute lane decodes
  the batch in one call (a file that fails gets the CPU decoder's error row) and encodes
  JPEG outputs in one call (nvJPEG), so the writer only writes them. Other files and PNG
  outputs go through Pillow as on CPU;
- on CPU, batches are computed in several lanes at once (threads, each batch with torch's
  intra-op threads divided among the lanes: 2 lanes x 1 thread on a 2-core machine), not one
  batch at a time with every core on each op. Most ops here are small (a (B,) bisection,
  pyiqa's per-strip calls, reductions) and intra-op threads synchronise on every one of them,
  which costs more than it gains, badly so when the machine is shared. The intra-op thread
  count is process-wide: it is set for the duration of a shard and restored after. On CUDA
  there is one lane and nothing is changed;
- measures go through ``varlide.iqa.measure.measure`` (size cap, and on CPU the row-strip
  path for pyiqa's ``ssim``: same value, 4-8x faster), as ``varlide eval`` does.
Then the shard's Parquet file is written whole, and only then its completion marker.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from varlide import allocator
from varlide.config import Config
from varlide.devices import resolve_device  # noqa: F401  (engine.resolve_device: callers')
from varlide.imaging.decode import DecodedImage, DecodeError, decode_image, pixels_as_float
from varlide.imaging.encode import encode_image
from varlide.iqa.base import Metric, create_metric
from varlide.iqa.measure import measure
from varlide.memory import default_budget, format_size, image_cost, workspace_for
from varlide.models.base import Enhancer, EnhanceResult, create_enhancer
from varlide.pools import Inline, Pool, Task, TaskTimeout
from varlide.priors.base import Prior
from varlide.priors.calibration import prior_for_run
from varlide.storage import retries as store_retries
from varlide.storage.plan import PlannedFile, Shard
from varlide.storage.results import SCHEMA_VERSION, write_rows
from varlide.storage.runstore import RunStore
from varlide.storage.uri import UnsafePathError, filesystem, join, write_bytes

if TYPE_CHECKING:
    from varlide.imaging.gpu import DeviceImage  # torchvision: imported when device I/O runs

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (images done in this call, errors in them)


class StageError(RuntimeError):
    """A model stage failed on a batch: the shard fails (and is retried), no rows are lost."""


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs for one shard; plain data so it pickles to any executor."""

    run_id: str
    dataset: str
    input_uri: str
    output_uri: str
    shard: Shard
    config: dict[str, Any]  # Config.model_dump(mode="json")
    retry_errors: bool = False  # a done shard: process only its error rows again


@dataclass
class ShardResult:
    shard: int
    rows: int
    errors: int
    parquet_uri: str
    seconds: float
    worker: str
    device: str
    stage_ms: dict[str, float] = field(default_factory=dict)
    attempt: int = 0  # 0: the first; each --retry-errors of the shard adds one
    parquet_bytes: int | None = None  # the Parquet file's size, checked on resume
    # this session's counts (not in the marker): object-store request retries in this
    # process during the shard, and runs of the shard task it took (orchestrator retries)
    store_retries: int = 0
    tries: int = 1

    @classmethod
    def from_marker(cls, m: dict[str, Any]) -> ShardResult:
        """The result a done marker records (``as_marker`` read back)."""
        return cls(shard=m["shard"], rows=m["rows"], errors=m["errors"],
                   parquet_uri=m["parquet"], seconds=m["seconds"], worker=m["worker"],
                   device=m["device"], stage_ms=m.get("stage_ms") or {},
                   attempt=int(m.get("attempt") or 0), parquet_bytes=m.get("parquet_bytes"))

    def as_marker(self) -> dict[str, Any]:
        return {
            "shard": self.shard, "rows": self.rows, "errors": self.errors,
            "attempt": self.attempt, "parquet": self.parquet_uri,
            "parquet_bytes": self.parquet_bytes, "seconds": round(self.seconds, 3),
            "worker": self.worker, "device": self.device, "stage_ms": self.stage_ms,
            "finished_at": datetime.now(UTC).isoformat(),
        }


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- stages


@dataclass
class Stages:
    """The models and measures of a run, built once per process and device."""

    device: torch.device
    prior: Prior
    enhancer: Enhancer | None
    metrics: dict[str, Metric]
    reference_metrics: dict[str, Metric]

    def peak_bytes_per_pixel(self) -> int:
        """The largest working bytes per pixel of a measure called on one image (a measure
        is called on whole images; the enhancer works in bands within the workspace)."""
        measures = [*self.metrics.values(), *self.reference_metrics.values()]
        return max([getattr(m, "bytes_per_pixel", 400) for m in measures], default=0)


_STAGES: dict[tuple, Stages] = {}
_STAGES_LOCK = threading.Lock()


def _stage_key(cfg: Config, device: torch.device) -> tuple:
    return cfg.stage_config(), str(device), _calibrations_state(cfg)


def _calibrations_state(cfg: Config) -> tuple:
    """Stored calibrations (a new one is picked up by the next run of a long-lived worker)."""
    from varlide.resolver import calibrations_state, use_cache

    use_cache(cfg)
    return calibrations_state()


def get_stages(cfg: Config) -> Stages:
    """Build (once per process) the prior, enhancer and measures this config asks for."""
    from varlide.resolver import local_weights, prepare_worker

    device = resolve_device(cfg.device)
    prepare_worker(cfg)  # once per config: offline switches, weights_mirror sync, check
    key = _stage_key(cfg, device)
    with _STAGES_LOCK:
        if key not in _STAGES:
            enhancer = None
            if cfg.enhance:
                enhancer = create_enhancer(cfg.enhancer,
                                           weights=local_weights(cfg.enhancer_weights),
                                           device=device, **cfg.enhancer_options)
            ref_names = cfg.reference_metrics if cfg.reference else ()
            _STAGES[key] = Stages(
                device=device,
                prior=prior_for_run(cfg, enhancer, device),  # on the enhancer's scale
                enhancer=enhancer,
                metrics={m: create_metric(m, device=device) for m in cfg.metrics},
                reference_metrics={m: create_metric(m, device=device) for m in ref_names},
            )
        return _STAGES[key]


def clear_stage_cache() -> None:
    with _STAGES_LOCK:
        _STAGES.clear()


# --------------------------------------------------------------------------- decode

DEVICE_IO_ENV = "VARLIDE_DEVICE_IO"


def device_io_enabled(device: torch.device) -> bool:
    """Whether JPEGs are decoded, and JPEG outputs encoded, in the compute lane by
    ``varlide.imaging.gpu`` (one batched call each) instead of by Pillow in the I/O pool.

    Why: on CUDA Pillow decodes ~110 frames/s per thread against ~11,500 for batched nvJPEG,
    so CPU decode would be the bottleneck. The one place ``VARLIDE_DEVICE_IO`` is read:
    ``1`` on, ``0`` off, unset: on for CUDA, off for CPU. On CPU, ``1`` runs the same code
    with torchvision's CPU decoder (Pillow's pixels) and Pillow's encoder: how the tests
    cover the CUDA path without a GPU.
    """
    value = os.environ.get(DEVICE_IO_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return device.type == "cuda"


@dataclass
class Loaded:
    """One input after read + decode. ``image`` is None when it failed (its row says why),
    or, with device I/O, while ``data`` waits to be decoded with its batch."""

    file: PlannedFile
    row: dict[str, Any]
    image: DecodedImage | None = None
    reference: np.ndarray | None = None
    cost: int = 0  # bytes held in the shard's memory budget (``varlide.memory.image_cost``)
    data: bytes | None = None  # the file, undecoded until its batch (device I/O)
    header_size: tuple[int, int] = (0, 0)  # (height, width) of ``data``'s JPEG header

    @property
    def ready(self) -> bool:
        """Decoded, or due to be decoded with its batch; else it has its error row."""
        return self.image is not None or self.data is not None

    def size(self) -> tuple[int, int]:
        """(height, width) for buckets and the ledger: the image's, else the header's."""
        if self.image is not None:
            return self.image.height, self.image.width
        return self.header_size

    def waiting_bytes(self) -> int:
        """Bytes held until the batch runs: pixels, or the compressed file (device I/O)."""
        ref = 0 if self.reference is None else self.reference.nbytes
        if self.image is not None:
            return self.image.pixels.nbytes + ref
        return (0 if self.data is None else len(self.data)) + ref

    def release(self) -> None:
        """Drop pixels and bytes (memory freed early); the row stays."""
        self.image = self.reference = self.data = None


def _read_and_decode(job: ShardJob, cfg: Config, file: PlannedFile,
                     device_io: bool = False) -> Loaded:
    """Read, hash and decode one file (I/O pool). With ``device_io`` a JPEG the device
    decodes is only read: its pixels come from its batch's one decode call."""
    loaded = Loaded(file=file, row=_new_row(job, file))
    row = loaded.row
    if file.unread:  # the listing refused it: never opened
        row.update(status="error", error=f"not read: {file.unread}", size_bytes=None)
        return loaded
    t0 = time.perf_counter()
    data = _read(job, file, row)
    if data is None:
        return loaded
    if file.out_error:
        row.update(status="error", error=file.out_error)
        return loaded
    if not (device_io and _keep_for_device(loaded, data, cfg)):
        image = _decode_on_cpu(data, cfg, row)
        del data
        if image is None:
            return loaded
        row.update(width=image.width, height=image.height, exif_applied=image.exif_applied)
        loaded.image = image
    row["decode_ms"] = (time.perf_counter() - t0) * 1000
    if cfg.reference:
        loaded.reference = _load_reference(cfg, file.rel_path, *loaded.size())
    return loaded


def _new_row(job: ShardJob, file: PlannedFile) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "run_id": job.run_id, "dataset": job.dataset,
            "shard": job.shard.index, "rel_path": file.rel_path, "size_bytes": file.size,
            "status": "ok"}


def _timed_out(job: ShardJob, file: PlannedFile, what: str) -> Loaded:
    """A fresh error row for a file whose work hung (the stuck thread keeps the old one)."""
    row = _new_row(job, file)
    row.update(status="error", error=f"timed out: {what}")
    return Loaded(file=file, row=row)


def _read(job: ShardJob, file: PlannedFile, row: dict[str, Any]) -> bytes | None:
    """The file's bytes, its ``source_uri``, ``size_bytes`` and ``sha256`` in ``row``; None
    with an error row when it cannot be read (an unsafe key, permissions, I/O error)."""
    try:
        source = join(job.input_uri, file.rel_path)
    except UnsafePathError as exc:  # a key like 'a/../../x.png' on an object store
        row.update(status="error", error=str(exc))
        return None
    row["source_uri"] = source
    try:
        fs, path = filesystem(source)
        data = fs.cat_file(path)
    except Exception as exc:  # unreadable: permissions, vanished, I/O error
        row.update(status="error", error=f"unreadable: {type(exc).__name__}: {exc}")
        return None
    row["size_bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    return data


def _decode_on_cpu(data: bytes, cfg: Config, row: dict[str, Any]) -> DecodedImage | None:
    """Pillow's decode (``decode_image``), or None with the error row a bad file gets."""
    try:
        return decode_image(data, apply_exif=cfg.apply_exif, max_pixels=cfg.max_pixels,
                            keep_uint8=True)
    except DecodeError as exc:
        row.update(status="error", error=str(exc))
    except Exception as exc:  # a decoder bug must still give a row, never a crash
        row.update(status="error", error=f"decode failed: {type(exc).__name__}: {exc}")
    return None


def _keep_for_device(loaded: Loaded, data: bytes, cfg: Config) -> bool:
    """Keep ``data`` undecoded when the device decoder takes it; its header's size goes to
    the row and the ledger now (the decoded size, the same, replaces it later)."""
    from varlide.imaging.gpu import device_header

    header = device_header(data, cfg.max_pixels, cfg.apply_exif)
    if header is None:
        return False
    loaded.data, loaded.header_size = data, (header.height, header.width)
    loaded.row.update(width=header.width, height=header.height, exif_applied=False)
    return True


def _load_reference(cfg: Config, rel_path: str, height: int,
                    width: int) -> np.ndarray | None:
    """The clean image for full-reference measures, or None (absent, unreadable, other size)."""
    try:
        fs, path = filesystem(join(cfg.reference, rel_path))
        ref = decode_image(fs.cat_file(path), apply_exif=cfg.apply_exif,
                           max_pixels=cfg.max_pixels, keep_uint8=True)
    except (FileNotFoundError, DecodeError, OSError) as exc:
        log.warning("reference for %s unusable: %s", rel_path, exc)
        return None
    if (ref.height, ref.width) != (height, width):
        log.warning("reference for %s has another size (%dx%d vs %dx%d); skipped", rel_path,
                    ref.width, ref.height, width, height)
        return None
    return ref.pixels


# --------------------------------------------------------------------------- compute

Output = np.ndarray | bytes | None  # uint8 HWC for the writer to encode, or encoded bytes


def _to_batch(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """``(B, 3, H, W)`` float32 in [0, 1] on ``device`` from decoded HWC arrays (uint8 are
    divided by 255 after the upload: the values ``decode_image`` gives as float32)."""
    if len({a.dtype for a in arrays}) > 1:  # uint8 and float32 images of one size: np.stack
        arrays = [pixels_as_float(a) for a in arrays]  # would upcast without the / 255
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        return batch.to(torch.float32).div_(255.0).contiguous()
    return batch.float().contiguous()


def _to_uint8_hwc(images: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
    """``(B, 3, H, W)`` float (or a list of same-size ``(3, H, W)``) -> ``(B, H, W, 3)``
    uint8 numpy, exactly as ``varlide.imaging.encode.to_uint8`` rounds (x 255, + 0.5,
    NaN -> 0, clip, truncate)."""
    out = np.empty((len(images), *images[0].shape[1:], 3), dtype=np.uint8)
    for i, image in enumerate(images):  # one image's temporaries at a time
        x = image.float().mul(255.0).add_(0.5).nan_to_num_(0.0).clamp_(0.0, 255.0)
        out[i] = x.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_batch(batch: list[Loaded], stages: Stages, cfg: Config,
               workspace: int | None = None, device_io: bool = False) -> list[Output]:
    """Prior, enhancer and measures for images of one size; fills rows, returns outputs
    (what the writer writes, None where there is none). ``workspace``: bytes a measure's call
    may take. ``device_io``: the batch's kept JPEGs are decoded here in one call (a file
    that fails gets its error row and no output) and JPEG outputs encoded here."""
    if not device_io:
        images = _to_batch([item.image.pixels for item in batch], stages.device)
        return _compute(batch, images, stages, cfg, workspace)
    from varlide.imaging.gpu import to_float_batch

    outputs: list[Output] = [None] * len(batch)
    for idx, pixels in _decode_on_device(batch, stages.device, cfg):
        got = _compute([batch[i] for i in idx], to_float_batch(pixels), stages, cfg,
                       workspace, encode_jpeg=True)
        for i, out in zip(idx, got, strict=True):
            outputs[i] = out
    return outputs


def _decode_on_device(batch: list[Loaded], device: torch.device,
                      cfg: Config) -> list[tuple[list[int], list[torch.Tensor]]]:
    """The batch's ``(3, H, W)`` pixels on ``device``, grouped by size as (indices into
    ``batch``, tensors), in batch order: kept files decoded in one ``decode_batch_images``
    call, those the I/O pool decoded (PNG, progressive ...) copied up. A file that fails is
    in no group; its row is the CPU decoder's error row."""
    from varlide.imaging.gpu import decode_batch_images, host_to_device

    todo = [i for i, item in enumerate(batch) if item.data is not None]
    t0 = time.perf_counter()
    try:  # bad data never raises here (per-file fallbacks); this is the device failing
        decoded = decode_batch_images([batch[i].data for i in todo], device, cfg.max_pixels,
                                      apply_exif=cfg.apply_exif) if todo else []
        _sync(device)
    except Exception as exc:
        raise StageError(f"decode failed on a batch of {len(todo)} "
                         f"({batch[0].file.rel_path} ...): {type(exc).__name__}: {exc}") from exc
    share_ms = (time.perf_counter() - t0) * 1000 / max(1, len(todo))
    pixels = {i: _take_decoded(batch[i], got, share_ms)
              for i, got in zip(todo, decoded, strict=True)}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(batch):
        if item.image is not None:
            pixels[i] = host_to_device(item.image.pixels, device)
        if pixels.get(i) is not None:
            groups.setdefault(tuple(pixels[i].shape), []).append(i)
    return [(idx, [pixels[i] for i in idx]) for idx in groups.values()]


def _take_decoded(item: Loaded, got: DeviceImage | str, share_ms: float) -> torch.Tensor | None:
    """Record one device-decoded file (a ``DeviceImage``, or an error string) in its row, as
    the CPU path records it; its pixels, or None when it failed."""
    item.data = None
    row = item.row
    if isinstance(got, str):  # no geometry in the row, as when Pillow fails in the pool
        for key in ("width", "height", "exif_applied", "decode_ms"):
            row.pop(key, None)
        row.update(status="error", error=got)
        item.reference = None
        return None
    row.update(width=got.width, height=got.height, exif_applied=got.exif_applied)
    row["decode_ms"] = row.get("decode_ms", 0.0) + share_ms
    if item.reference is not None and item.reference.shape[:2] != (got.height, got.width):
        log.warning("reference for %s has another size; skipped", item.file.rel_path)
        item.reference = None
    return got.pixels


def _wants_local(cfg: Config) -> bool:
    """An enhancer registered ``local_prior`` takes the prior's local maps (``local=``)."""
    from varlide.models import ENHANCERS

    return bool(ENHANCERS.info(cfg.enhancer).get("local_prior"))


def _compute(batch: list[Loaded], images: torch.Tensor, stages: Stages, cfg: Config,
             workspace: int | None = None, encode_jpeg: bool = False) -> list[Output]:
    """Prior, enhancer and measures on ``images`` (the batch's pixels, float on the
    device); fills rows, returns outputs (see :func:`_outputs`)."""
    device = stages.device
    n = len(batch)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            scores = (stages.prior.score_with_maps(images) if cfg.prior_local
                      else stages.prior.score(images))
            _sync(device)
            t1 = time.perf_counter()
            result = None
            if stages.enhancer is not None:
                local = {"local": scores.local} if _wants_local(cfg) else {}
                result = stages.enhancer.enhance(images, scores.visibility, scores.blur,
                                                 **local)
                _sync(device)
            t2 = time.perf_counter()
            outputs = None if result is None else result.images.clamp_(0, 1)  # in place
            quality = _quality(batch, images, outputs, stages, cfg, workspace)
            t3 = time.perf_counter()
    except Exception as exc:
        raise StageError(f"stage failed on a batch of {n} ({batch[0].file.rel_path} ...): "
                         f"{type(exc).__name__}: {exc}") from exc
    visibility = scores.visibility.float().cpu().tolist()
    blur = scores.blur.float().cpu().tolist()
    local = (None if scores.local is None
             else scores.local.float().flatten(1).cpu().tolist())  # K x G x G, row-major
    for i, item in enumerate(batch):
        item.row.update(prior_backend=stages.prior.backend, prior_model=stages.prior.model,
                        prior_calibration=getattr(stages.prior, "calibration", None),
                        prior_local=None if local is None else local[i],
                        visibility=visibility[i], blur=blur[i],
                        prior_ms=(t1 - t0) * 1000 / n, enhance_ms=(t2 - t1) * 1000 / n,
                        quality_ms=(t3 - t2) * 1000 / n, iqa_max_side=cfg.iqa_max_side)
        item.row.update(quality[i])
    if result is None:
        return [None] * n
    _record_enhancer(batch, stages.enhancer, result)
    return _outputs(batch, outputs, cfg.quality, encode_jpeg)


def _record_enhancer(batch: list[Loaded], enhancer: Enhancer,
                     result: EnhanceResult) -> None:
    """The enhancer's per-image columns (route, iterations, phase strength, deblurring
    decision and kernel length) in the rows."""
    n_iter = None if result.n_iter is None else result.n_iter.cpu().tolist()
    strength = None if result.phase_strength is None else result.phase_strength.cpu().tolist()
    px = None if result.deblur_kernel_px is None else result.deblur_kernel_px.cpu().tolist()
    for i, item in enumerate(batch):
        item.row.update(enhancer=enhancer.name, enhancer_version=enhancer.version,
                        route=result.route[i],
                        n_iter=None if n_iter is None else int(n_iter[i]),
                        phase_strength=None if strength is None else float(strength[i]),
                        deblur=None if result.deblur is None else result.deblur[i],
                        deblur_kernel_px=None if px is None or px[i] != px[i] else px[i])


def _outputs(batch: list[Loaded], outputs: torch.Tensor, quality: int,
             encode_jpeg: bool = False) -> list[Output]:
    """What the writer gets: uint8 HWC arrays it encodes; with ``encode_jpeg`` the JPEG
    outputs are encoded here instead, in one ``encode_jpeg_batch`` call (nvJPEG on CUDA, no
    download of pixels), and the writer only writes their bytes."""
    result: list[Output] = [None] * len(batch)
    jpeg = [i for i, item in enumerate(batch)
            if encode_jpeg and (item.file.out_format or "").upper() == "JPEG"]
    if jpeg:
        from varlide.imaging.gpu import encode_jpeg_batch

        try:
            for i, data in zip(jpeg, encode_jpeg_batch([outputs[i] for i in jpeg], quality),
                               strict=True):
                result[i] = data
        except Exception as exc:  # the writer encodes them instead (its errors are rows)
            log.warning("batched JPEG encode failed (%s: %s); the writer encodes",
                        type(exc).__name__, exc)
    rest = [i for i in range(len(batch)) if result[i] is None]
    if rest:
        arrays = _to_uint8_hwc(outputs if len(rest) == len(batch)
                               else [outputs[i] for i in rest])
        for i, array in zip(rest, arrays, strict=True):
            result[i] = array
    return result


def _quality(batch: list[Loaded], images: torch.Tensor, outputs: torch.Tensor | None,
             stages: Stages, cfg: Config,
             workspace: int | None = None) -> list[dict[str, float | None]]:
    n = len(batch)
    per_row: list[dict[str, float | None]] = [{} for _ in range(n)]
    for name, metric in stages.metrics.items():
        for side, tensor in (("in", images), ("out", outputs)):
            if tensor is None:
                continue
            for i, value in enumerate(measure(metric, tensor, cfg.iqa_max_side,
                                              workspace=workspace)):
                per_row[i][f"q_{name}_{side}"] = value
    if stages.reference_metrics:
        have = [i for i, item in enumerate(batch) if item.reference is not None]
        if have:
            ref = _to_batch([batch[i].reference for i in have], stages.device)
            idx = None if len(have) == n else torch.tensor(have, device=stages.device)
            for name, metric in stages.reference_metrics.items():
                for side, tensor in (("in", images), ("out", outputs)):
                    if tensor is None:
                        continue
                    if idx is not None:  # only the images that have a reference
                        tensor = tensor.index_select(0, idx)
                    values = measure(metric, tensor, cfg.iqa_max_side, ref, workspace)
                    for i, value in zip(have, values, strict=True):
                        per_row[i][f"q_{name}_{side}"] = value
    return per_row


# --------------------------------------------------------------------------- write


def _write_enhanced(store: RunStore, item: Loaded, output: np.ndarray | bytes,
                    quality: int) -> None:
    """Encode (uint8 HWC pixels; bytes were encoded in the compute lane) and write one
    enhanced image, behind compute in the I/O pool."""
    row = item.row
    try:
        uri = store.enhanced_uri(item.file.out_rel_path)
        data = output if isinstance(output, bytes) else \
            encode_image(output, item.file.out_format, quality)
    except Exception as exc:  # this image cannot be encoded: its error, not the shard's
        row.update(status="error", error=f"encode failed: {type(exc).__name__}: {exc}")
        return
    try:
        write_bytes(uri, data)
    except OSError as exc:
        if exc.errno not in _PER_IMAGE_WRITE_ERRNOS:
            raise OutputStoreError(f"writing {uri} failed: {exc}") from exc
        row.update(status="error", error=f"write failed: {type(exc).__name__}: {exc}")
        return
    row["enhanced_uri"] = uri


# A write that fails for one image's name (too long, a folder in the way) is that image's
# error row; any other failure (a full disk, a read-only or vanished store, a network error)
# is the store's: the shard fails without a Parquet file or a marker, so a retry or the same
# command redoes it once the store works again, instead of leaving permanent error rows.
_PER_IMAGE_WRITE_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR,
                                     errno.EINVAL, errno.EEXIST})


class ShardStopped(RuntimeError):
    """The run is stopping (SIGTERM, Ctrl-C): the shard ends before its Parquet and marker,
    so a stop never finishes a shard after the run has let go of its lock."""


_STOP = threading.Event()


def request_stop() -> None:
    """Ask the shards running in this process to end at their next batch, unwritten."""
    _STOP.set()


def clear_stop() -> None:
    """A new run in this process starts unstopped."""
    _STOP.clear()


def _check_stop(job: ShardJob) -> None:
    if _STOP.is_set():
        raise ShardStopped(f"shard {job.shard.index:05d} of run {job.run_id}: the run is "
                           "stopping")


class OutputStoreError(RuntimeError):
    """The output store refused a write for a reason that is not the image's (e.g. ENOSPC)."""


# --------------------------------------------------------------------------- lanes

MAX_CPU_LANES = 4  # batches computed at once on CPU; the rest of the cores go intra-op
_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED = 0


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def compute_plan(device: torch.device, workers: int = 1) -> tuple[int, int]:
    """(lanes, intra-op threads per lane) for one shard of ``workers`` in flight.

    The budget is this process's cores (never more than torch's own thread setting, so an
    ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` limit is kept) shared among the shards
    in flight; on CPU it goes to lanes first (up to ``MAX_CPU_LANES``), the rest intra-op.
    CUDA: one lane, torch's setting untouched (0 = unchanged).
    """
    if device.type != "cpu":
        return 1, 0
    with _THREADS_LOCK:
        current = _THREADS_SAVED if _THREADS_USERS else torch.get_num_threads()
    budget = max(1, min(_cpu_count(), current) // max(1, workers))
    lanes = min(MAX_CPU_LANES, budget)
    return lanes, max(1, budget // lanes)


_TORCH_THREADS_SET = False


def set_torch_threads(n: int | None) -> None:
    """torch's intra-op threads of this process, once (the first config that sets it wins).

    The budget ``compute_plan`` divides; a Dask worker process or a benchmark sets it so
    that N processes on one machine do not each take every core. None: leave torch's.
    """
    global _TORCH_THREADS_SET, _THREADS_SAVED
    if not n or _TORCH_THREADS_SET:
        return
    with _THREADS_LOCK:
        if _TORCH_THREADS_SET:
            return
        if _THREADS_USERS:  # shards in flight: restored to n when they finish
            _THREADS_SAVED = n
        elif torch.get_num_threads() != n:
            torch.set_num_threads(n)
        _TORCH_THREADS_SET = True


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` while any shard runs; the old value after."""
    global _THREADS_USERS, _THREADS_SAVED
    if n <= 0:
        yield
        return
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = torch.get_num_threads()
            if _THREADS_SAVED != n:
                torch.set_num_threads(n)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0 and torch.get_num_threads() != _THREADS_SAVED:
                torch.set_num_threads(_THREADS_SAVED)


def process_shard(job: ShardJob, progress: ProgressCallback | None = None) -> ShardResult:
    """Run one shard end to end: images, then its Parquet file, then its done marker."""
    cfg = Config(**job.config)
    store_retries.install()
    retried_before = store_retries.count()
    allocator.tune()  # thresholds now; the arena limit only if no thread existed yet (cli)
    set_torch_threads(cfg.torch_threads)
    _check_stop(job)
    stages = get_stages(cfg)
    lanes, intra_op = compute_plan(stages.device, cfg.workers)
    with _intra_op_threads(intra_op):
        if job.retry_errors:
            result = _retry_shard_errors(job, cfg, stages, lanes, progress)
        else:
            result = _process_shard(job, cfg, stages, lanes, progress)
    result.store_retries = store_retries.count() - retried_before
    if result.store_retries:
        log.info("shard %05d: %d object-store request(s) retried", job.shard.index,
                 result.store_retries)
    return result


def _retry_shard_errors(job: ShardJob, cfg: Config, stages: Stages, lanes: int,
                        progress: ProgressCallback | None) -> ShardResult:
    """A new attempt at a done shard's ``error`` rows: the shard's Parquet then holds its
    ``ok`` rows unchanged and one new row per retried file (one current row per image).

    The attempt it replaces is kept first under ``runs/<run_id>/history/`` (never
    overwritten, so a crash between the steps keeps the original), then the Parquet is
    replaced in one write, then the marker (``attempt`` + 1). A shard without error rows, or
    whose Parquet is missing, is left to the normal path."""
    from varlide.storage.results import read_table

    store = RunStore(job.output_uri, job.run_id)
    uri = store.scores_uri(job.dataset, job.shard.index)
    marker = store.read_markers().get(job.shard.index)
    try:
        old = read_table(uri).to_pylist()
    except FileNotFoundError:
        old = None
    if marker is None or old is None:
        return _process_shard(job, cfg, stages, lanes, progress)
    failed = {r["rel_path"] for r in old if r["status"] == "error"}
    attempt = int(marker.get("attempt") or 0)
    if not failed:
        return ShardResult(job.shard.index, len(old), 0, uri, 0.0, worker_name(),
                           str(stages.device), attempt=attempt)
    store.keep_attempt(job.dataset, job.shard.index, attempt)
    files = [f for f in job.shard.files if f.rel_path in failed]
    kept = [r for r in old if r["rel_path"] not in failed]
    return _process_shard(job, cfg, stages, lanes, progress, files, kept, attempt + 1)


class _Ledger:
    """Bytes the shard's images hold now; released from writer threads, read by the main
    thread (which alone admits new work, so no admission can race another)."""

    def __init__(self) -> None:
        self.held = 0
        self._cond = threading.Condition()

    def reserve(self, n: int) -> None:
        with self._cond:
            self.held += n

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

    def wait_release(self, timeout: float = 0.5) -> None:
        with self._cond:
            self._cond.wait(timeout)


def shard_budget(cfg: Config) -> int | None:
    """Bytes one shard in flight may hold: ``memory_budget``, else the machine's default;
    None when the budget is 'off' (0: whole frames, nothing bounded)."""
    if cfg.memory_budget == 0:
        return None
    return cfg.memory_budget or default_budget(cfg.workers)


def _too_big(item: Loaded, cost: int, room: int) -> None:
    h, w = item.size()
    item.row.update(status="error", error=(
        f"too large for the memory budget: {w}x{h} needs ~{format_size(cost)} at once, "
        f"{format_size(room)} available to images (raise memory_budget / --memory-budget, "
        "or lower max_pixels)"))
    item.release()


def _output_bytes(output: Output) -> int:
    """Bytes an output holds until written: its pixels, or its encoded file."""
    if output is None:
        return 0
    return len(output) if isinstance(output, bytes) else output.nbytes


def _process_shard(job: ShardJob, cfg: Config, stages: Stages, lanes: int,
                   progress: ProgressCallback | None, files: list[PlannedFile] | None = None,
                   kept: Sequence[dict[str, Any]] = (), attempt: int = 0) -> ShardResult:
    """Decode ahead, batch by size, compute in ``lanes``, write behind (:class:`_ShardRun`),
    then the shard's Parquet file, then its marker.

    ``files``: the shard's files to process (default: all); ``kept``: rows of earlier
    attempts written with the new ones (a retry of the error rows)."""
    started = time.perf_counter()
    run = _ShardRun(job, cfg, stages, lanes, progress,
                    list(job.shard.files if files is None else files))
    rows = run.rows()
    processed_at = datetime.now(UTC)
    for row in rows:
        row["processed_at"] = processed_at
    rows = sorted([*kept, *rows], key=lambda r: r["rel_path"])
    store = RunStore(job.output_uri, job.run_id)
    parquet_uri = store.scores_uri(job.dataset, job.shard.index)
    _check_stop(job)
    written = write_rows(rows, cfg.quality_metric_names(), parquet_uri)
    stage_ms = {
        k: float(sum(r.get(k) or 0.0 for r in rows))
        for k in ("decode_ms", "prior_ms", "enhance_ms", "quality_ms")
    }
    result = ShardResult(
        shard=job.shard.index, rows=len(rows),
        errors=sum(r["status"] == "error" for r in rows), parquet_uri=parquet_uri,
        seconds=time.perf_counter() - started, worker=run.worker, device=run.device,
        stage_ms=stage_ms, attempt=attempt, parquet_bytes=written.nbytes,
    )
    store.write_marker(job.shard.index, result.as_marker())
    return result


class _ShardRun:
    """One shard's images through the pools: every image is admitted only while the bytes
    held stay inside the shard's memory budget. Driven by one thread (:meth:`rows`)."""

    def __init__(self, job: ShardJob, cfg: Config, stages: Stages, lanes: int,
                 progress: ProgressCallback | None, files: list[PlannedFile]) -> None:
        self.job, self.cfg, self.stages, self.lanes = job, cfg, stages, lanes
        self.progress, self.files = progress, files
        self.store = RunStore(job.output_uri, job.run_id)
        self.worker, self.device = worker_name(), str(stages.device)
        budget = shard_budget(cfg)
        self.workspace = None if budget is None else workspace_for(budget)
        self.room = (float("inf") if budget is None  # for images; the rest is stage work
                     else max(self.workspace, budget - lanes * self.workspace))
        if stages.enhancer is not None:
            stages.enhancer.set_workspace(self.workspace)
        self.ledger = _Ledger()
        self.done: list[dict[str, Any]] = []
        self.buckets: dict[tuple[int, int], list[Loaded]] = defaultdict(list)
        self.window = max(cfg.batch_size * 2, cfg.decode_threads * 2)
        self.pending: deque[Task[Loaded]] = deque()
        self.write_jobs: list[Task] = []
        self.computing: deque[tuple[list[Loaded], Task]] = deque()  # at most ``lanes``
        self.largest = 0  # bytes of the costliest image decoded so far: the next one's guess
        self.next_index = 0
        self.device_io = device_io_enabled(stages.device)  # decode + encode in the lane

    def rows(self) -> list[dict[str, Any]]:
        """Every file's row, once all outputs are written."""
        # a lane of its own for one-lane compute only when a batch may time out
        self.compute_pool = (Pool(self.lanes, "compute")
                             if self.lanes > 1 or self.cfg.batch_timeout_s else Inline())
        self.io_pool = Pool(self.cfg.decode_threads, "decode")
        try:
            while self.pending or self.next_index < len(self.files):
                _check_stop(self.job)
                self.top_up()
                if not self.pending:  # nothing may start: the budget is full
                    self.make_room()
                    continue
                item = self.take(self.pending.popleft())
                if not item.ready:
                    self.finish([item])
                else:
                    self.admit(item)
            for key in list(self.buckets):
                self.flush(key)
            while self.computing:
                self.collect()
            for task in self.write_jobs:
                task.result()
        finally:
            self.io_pool.shutdown()
            self.compute_pool.shutdown()
        return self.done

    def stop_check(self) -> None:
        _check_stop(self.job)

    def finish(self, items: list[Loaded]) -> None:
        errors = sum(item.row["status"] == "error" for item in items)
        for item in items:
            item.row.update(worker=self.worker, device=self.device)
            self.done.append(item.row)
        if self.progress is not None:
            self.progress(len(items), errors)

    def write(self, item: Loaded, out: Output, held: int) -> None:
        try:
            _write_enhanced(self.store, item, out, self.cfg.quality)
        finally:
            self.ledger.release(held)

    def collect(self) -> None:
        """Wait for the oldest batch in compute; queue its writes; count it done. A batch
        past ``batch_timeout_s`` becomes error rows; its stuck lane is left behind."""
        batch, task = self.computing.popleft()
        try:  # a StageError fails the shard
            outputs = task.result(self.cfg.batch_timeout_s, on_wait=self.stop_check)
        except TaskTimeout as exc:
            self.compute_pool.abandon()
            for item in batch:
                self.ledger.release(item.cost)
            what = f"computing its batch of {len(batch)} {exc} (batch_timeout_s)"
            log.warning("shard %05d: %s ... %s", self.job.shard.index, batch[0].file.rel_path,
                        what)
            self.finish([_timed_out(self.job, item.file, what) for item in batch])
            return
        finally:
            if task.future.done():  # a stuck lane may still read its batch's pixels
                for item in batch:
                    item.release()  # free memory early
        for item, out in zip(batch, outputs, strict=True):
            kept = _output_bytes(out)
            self.ledger.release(item.cost - kept)
            if out is not None:
                self.write_jobs.append(self.io_pool.submit(self.write, item, out, kept))
        self.finish(batch)

    def flush(self, key: tuple[int, int]) -> None:
        batch = self.buckets.pop(key)
        self.computing.append((batch, self.compute_pool.submit(
            _run_batch, batch, self.stages, self.cfg, self.workspace, self.device_io)))
        while len(self.computing) >= self.lanes:
            self.collect()

    def take(self, task: Task[Loaded]) -> Loaded:
        """The next read + decode; an error row once it runs past ``image_timeout_s``."""
        try:
            return task.result(self.cfg.image_timeout_s, on_wait=self.stop_check)
        except TaskTimeout as exc:
            self.io_pool.abandon()
            file = task.args[2]
            what = f"reading and decoding {exc} (image_timeout_s)"
            log.warning("shard %05d: %s %s", self.job.shard.index, file.rel_path, what)
            return _timed_out(self.job, file, what)

    def make_room(self) -> None:
        """Free bytes: compute what waits in buckets, else finish a batch, else a write."""
        if self.buckets:
            self.flush(max(self.buckets, key=lambda k: sum(i.cost for i in self.buckets[k])))
        elif self.computing:
            self.collect()
        else:
            self.ledger.wait_release()

    def top_up(self) -> None:
        """Start reading + decoding more files while their guessed bytes fit the budget."""
        while self.next_index < len(self.files) and len(self.pending) < self.window:
            if self.pending and (not self.largest or self.ledger.held
                                 + (len(self.pending) + 1) * self.largest > self.room):
                return  # the first image's size is unknown until it is decoded
            self.pending.append(self.io_pool.submit(
                _read_and_decode, self.job, self.cfg, self.files[self.next_index],
                self.device_io))
            self.next_index += 1

    def admit(self, item: Loaded) -> None:
        h, w = item.size()
        cost = image_cost(h, w, item.waiting_bytes(), item.reference is not None,
                          self.stages.peak_bytes_per_pixel(), self.workspace or 0)
        self.largest = max(self.largest, cost)
        if cost > self.room:
            _too_big(item, cost, self.room)
            self.finish([item])
            return
        while self.ledger.held + cost > self.room and (
                self.buckets or self.computing or self.ledger.held > 0):
            self.make_room()
        item.cost = cost
        self.ledger.reserve(cost)
        key = (h, w)
        bucket = self.buckets[key]
        bucket.append(item)
        if (len(bucket) >= self.cfg.batch_size
                or sum(i.cost for i in bucket) * (self.lanes + 1) >= self.room):
            self.flush(key)
        elif sum(len(b) for b in self.buckets.values()) >= self.window:  # bound the waiting
            self.flush(max(self.buckets, key=lambda k: len(self.buckets[k])))
