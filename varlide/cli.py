"""The ``varlide`` command, the outermost shell. Flows are imported lazily, only here.

    varlide enhance INPUT OUTPUT [options]   score (and enhance) a folder or bucket
    varlide status OUTPUT [--run ID]         shards done / pending / failed of a run
    varlide query OUTPUT "SQL" [--run ID]    DuckDB SQL over the scores (view `scores`)
    varlide report OUTPUT [--run ID]         a run's self-contained HTML report
    varlide demo-corpus OUT                  a small synthetic night-time corpus + references
    varlide train DATA OUT                   zero-reference training of an enhancer
    varlide eval INPUT [--reference URI]     a table of quality measures per enhancer
    varlide retrain OUTPUT --dataset D       retrain on the newest scores; gated promotion
    varlide serve OUTPUT --dataset D         serve retrain (cron) and enhance with Prefect
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from typing import Any

from varlide import allocator
from varlide.config import ConfigError, load_config
from varlide.pools import stuck_threads

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


def _enhance_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enhance", help="score, enhance and measure every image of INPUT",
                       description="Score (v, b), enhance and measure every image of INPUT "
                       "into OUTPUT (any fsspec URI: a folder or s3://bucket/prefix). "
                       "Re-running the same command resumes the run.")
    p.add_argument("input", help="folder or URI of the images (searched recursively)")
    p.add_argument("output", help="folder or URI of the output store")
    p.add_argument("--config", help="YAML file of config fields (see docs/SCHEMA.md)")
    p.add_argument("--dataset", help="dataset name (default: last path component of INPUT)")
    p.add_argument("--shard-size", type=int, help="images per shard (default 256)")
    p.add_argument("--run-id", help="run id (default: hash of input + output-changing config)")
    p.add_argument("--fresh", action="store_true", help="discard this run id's outputs first")
    p.add_argument("--retry-errors", action="store_true",
                   help="process the run's error rows again (a new attempt of each shard "
                   "that has any; the replaced rows stay under runs/ID/history/)")
    p.add_argument("--workers", type=int, help="shards in flight on this machine")
    p.add_argument("--dask", metavar="ADDRESS", help="run the shards on a Dask cluster: its "
                   "scheduler address (tcp://host:8786), or local:N for N worker processes "
                   "here; GPU runs go to workers started with --resources GPU=1")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--enhancer", help="registered enhancer (default varlide-lite, shipped weights; "
                   "classic-curve needs no weights)")
    p.add_argument("--weights", dest="enhancer_weights", help="enhancer weights path or URI")
    p.add_argument("--prior", help="prior backend: analytic (default), clip, qinstruct "
                   "(Q-Instruct LLaVA-1.5 7B, GPU), qrealign (Q-ReAlign 0.8B), auto (the "
                   "enhancer's)")
    p.add_argument("--prior-model", help="clip model: ARCH:TAG (default ViT-B-32:openai), "
                   "ARCH:/path/ckpt, local-dir:/folder; qinstruct / qrealign: a hub repo id "
                   "or a local model folder")
    p.add_argument("--prior-calibration", help="calibration file onto the enhancer's prior "
                   "scale (default: the one `varlide calibrate` stored, if any)")
    p.add_argument("--prior-local", action="store_const", const=True,
                   help="also store the prior's local maps (qinstruct: 3 x 4 x 4 per image) "
                   "in the prior_local column")
    p.add_argument("--metrics", help="comma-separated quality measures")
    p.add_argument("--no-enhance", dest="enhance", action="store_const", const=False,
                   help="scores only, no enhanced images")
    p.add_argument("--include", action="append", help="glob on the relative path to keep")
    p.add_argument("--exclude", action="append", help="glob on the relative path to drop")
    p.add_argument("--limit", type=int, help="at most N images (after sorting and filters)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (images, shards, weights needed); write nothing")
    p.add_argument("--format", choices=["same", "png", "jpeg"], help="enhanced image format")
    p.add_argument("--quality", type=int, help="JPEG quality of enhanced images (default 90)")
    p.add_argument("--apply-exif", dest="apply_exif", action="store_const", const=True,
                   help="apply EXIF orientation (default: keep the stored geometry)")
    p.add_argument("--reference", help="clean images with the same relative paths (psnr, ssim)")
    p.add_argument("--batch-size", type=int, help="images per batch on the device")
    p.add_argument("--memory-budget", metavar="SIZE", help="bytes a shard in flight may hold "
                   "in images and working tensors (e.g. 2GB, or off; default: half the "
                   "available memory shared among the shards in flight, at most 1 GB)")
    p.add_argument("--iqa-max-side", type=int, help="long side cap for pyiqa measures")
    p.add_argument("--retries", type=int, help="retries of a failed shard (default 2)")
    p.add_argument("--image-timeout", dest="image_timeout_s", metavar="SECONDS",
                   help="read + decode time after which a file is an error row "
                   "'timed out' (default 300; off: no limit)")
    p.add_argument("--batch-timeout", dest="batch_timeout_s", metavar="SECONDS",
                   help="compute time after which a batch's images are error rows "
                   "'timed out' (default 1800; off: no limit)")
    p.add_argument("--experiment", help="MLflow experiment (default varlide-enhance)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_enhance)


CONFIG_FLAGS = ("dataset", "shard_size", "run_id", "workers", "dask", "device", "enhancer",
                "enhancer_weights", "prior", "prior_model", "prior_calibration", "prior_local",
                "metrics",
                "enhance", "include", "exclude", "limit",
                "format", "quality", "apply_exif", "reference", "batch_size", "memory_budget",
                "iqa_max_side", "retries", "image_timeout_s", "batch_timeout_s", "experiment",
                "progress")


def _start_prefect_server() -> None:
    """Boot the temporary Prefect server now, in parallel with the imports, weights checks
    and planning still to come (nothing is started when ``PREFECT_API_URL`` is set)."""
    from flows import start_temporary_server

    start_temporary_server()


def cmd_enhance(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS}
    cfg = _config(args.config, overrides)
    args.input, args.output, cfg = _hide_credentials(args.input, args.output, cfg)
    check_stages(cfg)  # a typo or a missing GPU: exit 2 now, not after a server and retries
    _check_locations(args.input, args.output)
    cfg = _pin_registry_weights(cfg)
    finished = _finished_run(args, cfg)
    if finished is not None:
        _print_nothing_to_do(finished, args.json)
        return EXIT_OK
    _check_enhancer_weights(cfg)  # a pickle or wrong shapes: exit 2 before any server
    if not args.dry_run:
        _start_prefect_server()
    from varlide.run import prepare_run

    if args.dry_run:
        plan = prepare_run(args.input, args.output, cfg, fresh=args.fresh, write=False,
                           retry_errors=args.retry_errors)
        print(plan.describe())
        print(_weights_needed(cfg))
        _preflight(cfg)  # missing weights: an error naming them (exit 2)
        print("dry run: nothing written")
        return EXIT_OK
    _preflight(cfg)  # before the run starts, not in a worker
    from flows.enhance import run_enhance  # its imports overlap the server's start

    if not args.verbose:
        _quiet_prefect_tracebacks()

    summary = run_enhance(args.input, args.output, cfg, fresh=args.fresh,
                          retry_errors=args.retry_errors)
    _print_summary({**summary, "nothing_to_do": False} if args.json else summary, args.json)
    if summary["failed_shards"]:
        reasons = sorted(set((summary.get("failures") or {}).values()))
        print(f"error: shard(s) failed after retries: "
              f"{', '.join(f'{i:05d}' for i in summary['failed_shards'])}; "
              "re-run the same command to retry them"
              + (f"; cause: {reasons[0]}" if reasons else "")
              + (f" (and {len(reasons) - 1} other cause(s))" if len(reasons) > 1 else ""),
              file=sys.stderr)
        return EXIT_FAILED_SHARDS
    return EXIT_OK


class _NoTraceback(logging.Filter):
    """Prefect logs each failed task with its traceback; the CLI says the cause in one
    line per shard and once at the end (``--verbose`` keeps the tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith("prefect"):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_prefect_tracebacks() -> None:
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("prefect")]
    for handler in {h for lg in [logging.root, *loggers] for h in lg.handlers}:
        if not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def _hide_credentials(input_uri: str, output_uri: str, cfg):
    """Credentials in INPUT, OUTPUT or ``--reference`` out of every later print, plan and
    record (kept for the filesystem only: ``storage.uri.hide_credentials``)."""
    from varlide.storage.uri import hide_credentials

    if cfg.reference:
        cfg = cfg.model_copy(update={"reference": hide_credentials(cfg.reference)})
    return hide_credentials(input_uri), hide_credentials(output_uri), cfg


def _config(path: str | None, overrides: dict[str, Any]):
    """``load_config`` with a config file that cannot be read or parsed as a usage error
    (exit 2 naming the file), not a traceback."""
    import yaml

    try:
        return load_config(path, overrides)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as a config file: {exc}") from None


def _known(kind: str, name: str, names: list[str]) -> None:
    """ConfigError for a name that is not among ``names``, listing them (and near misses)."""
    if name in names:
        return
    import difflib

    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(names))}{hint}")


def check_stages(cfg) -> None:
    """Every stage name and the device, checked against the registries before a server
    starts or a plan is made: unchecked, a typo passed ``--dry-run`` and failed the real run
    inside each shard task, after its retries (exit 1 after ~35 s). The registries fill as
    their modules import (torch only: open_clip and pyiqa load when a stage is built, and
    pyiqa's names are read from its table file)."""
    from varlide.iqa.base import metric_info
    from varlide.models import ENHANCERS
    from varlide.priors import PRIORS
    from varlide.registry import UnknownNameError

    _known("enhancer", cfg.enhancer, ENHANCERS.names())
    _known("prior", cfg.prior, [*PRIORS.names(), "auto"])
    for name in cfg.quality_metric_names():
        try:
            metric_info(name)
        except UnknownNameError as exc:
            raise ConfigError(str(exc)) from None
    _check_device(cfg)


def _check_device(cfg) -> None:
    """``device: cuda`` needs CUDA here, where the shards run (threads or ``local:N`` Dask
    workers); a remote Dask cluster's GPUs are checked by the flow, on its workers."""
    if cfg.device != "cuda" or (cfg.dask and not cfg.dask.startswith("local:")):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available on this "
                          f"machine (torch {torch.__version__}); valid here: auto, cpu")


def _check_locations(input_uri: str, output_uri: str) -> None:
    """A local INPUT must be a folder and a local OUTPUT a folder or absent: found here,
    before a server starts, instead of in the flow's planning task (or as a traceback)."""
    if "://" not in input_uri:
        path = os.path.expanduser(input_uri)
        if not os.path.exists(path):
            raise ConfigError(f"input not found: {input_uri}")
        if not os.path.isdir(path):
            raise ConfigError(f"input {input_uri} is not a folder (INPUT is a folder or an "
                              "object-store prefix of images)")
    if "://" not in output_uri:
        path = os.path.expanduser(output_uri)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"output {output_uri} exists and is not a folder")


def _finished_run(args: argparse.Namespace, cfg) -> dict[str, Any] | None:
    """The summary of the run this command would only resume when every shard of it is
    done: recorded in MLflow here, without Prefect, so rerunning a finished command costs
    seconds rather than a temporary server's 20-30 s start-up. None when there is work
    (or ``--fresh``, ``--dry-run``, a retry of error rows): the flow decides then."""
    if args.fresh or args.dry_run or args.retry_errors:
        return None
    from varlide.run import resolve_run
    from varlide.storage.runstore import RunStore, run_status

    target = resolve_run(args.input, args.output, cfg)  # a cheap first look: no listing
    output, run_id = target.output_uri, target.run_id
    if not RunStore(output, run_id).exists() or not run_status(output, run_id).complete:
        return None
    return _record_finished(args, cfg, run_id)


def _record_finished(args: argparse.Namespace, cfg, run_id: str) -> dict[str, Any] | None:
    """prepare_run's own view of the finished run (its rules, new files since), recorded
    under the run's lock as the flow would with nothing left to run."""
    from varlide.engine import worker_name
    from varlide.run import prepare_run, record_run
    from varlide.storage.runstore import RunStore

    plan = prepare_run(args.input, args.output, cfg, write=False)
    if plan.run_id != run_id or plan.pending:
        return None
    session = {"failed_shards": [], "processed_images": 0, "seconds": 0.0,
               "workers": cfg.workers, "worker": worker_name(), "shards_run": 0}
    with RunStore(plan.output_uri, plan.run_id).lock(owner=worker_name()):
        return record_run(plan, session)


def _print_nothing_to_do(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_summary({**summary, "nothing_to_do": True}, True)
        return
    _print_summary(summary, False)
    print(f"nothing to do: every shard of run {summary['run_id']} is done "
          "(--fresh starts it over)")


def _pin_registry_weights(cfg):
    """Pin ``models:/NAME@ALIAS`` once, here, so the dry run and the flow see one version."""
    from varlide.run import pin_registry_weights

    pinned = pin_registry_weights(cfg)
    if pinned.enhancer_weights != cfg.enhancer_weights:
        print(f"weights {cfg.enhancer_weights} -> {pinned.enhancer_weights}", file=sys.stderr)
    return pinned


def _weights_needed(cfg) -> str:
    """The dry run's weights lines: every file the run needs, present or MISSING."""
    from varlide import resolver
    from varlide.priors.calibration import prior_id, run_scale

    resolver.use_cache(cfg)
    trained = resolver.trained_prior_of(cfg)
    lines = [f"  prior   {prior_id(*run_scale(cfg, trained))}"
             + (f" (enhancer trained on {prior_id(*trained)})" if trained else "")]
    rows = resolver.describe(resolver.requirements(cfg, trained=trained))
    if not rows:
        lines.append("  weights none")
    for r in rows:
        state = "present" if r["present"] else ("absent (optional)" if r["optional"]
                                                else "MISSING")
        lines.append(f"  weights {r['used_by']}: {r['path']} [{state}]")
    for name in resolver.uncatalogued_metrics(cfg):
        lines.append(f"  weights metric {name}: files not catalogued in varlide.iqa.files "
                     "(pyiqa reads them from $TORCH_HOME/hub/pyiqa)")
    return "\n".join(lines)


def _preflight(cfg) -> None:
    from varlide import resolver

    try:
        resolver.preflight(cfg)
    except ValueError as exc:  # a stage the config cannot have (e.g. prior_local): exit 2
        raise ConfigError(str(exc)) from None


def _check_enhancer_weights(cfg) -> None:
    """Load ``enhancer_weights`` once here (on CPU): a pickle, a file that is not
    safetensors, or tensors whose names, shapes or dtypes are not the enhancer's are a
    usage error now (exit 2), not a shard failure after retries on every worker."""
    if not (cfg.enhance and cfg.enhancer_weights):
        return
    from varlide.models import ENHANCERS, create_enhancer
    from varlide.resolver import local_weights

    light = ENHANCERS.info(cfg.enhancer).get("check_weights") if cfg.enhancer in ENHANCERS \
        else None  # a large model checks its files' headers instead of loading them
    try:
        if light:
            light(local_weights(cfg.enhancer_weights), **cfg.enhancer_options)
        else:
            create_enhancer(cfg.enhancer, weights=local_weights(cfg.enhancer_weights),
                            device="cpu", **cfg.enhancer_options)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"enhancer weights {cfg.enhancer_weights} cannot be used with "
                          f"--enhancer {cfg.enhancer}: {exc}") from None


def _weights_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="list / pull / mirror / sync / verify weight files",
                       description="Every external file a config needs (CLIP checkpoints, "
                       "pyiqa metric files, enhancer weights, calibrations): `list` what is "
                       "present, `pull` what is missing (online) into the libraries' caches "
                       "and record size + sha256 in the lock file, `mirror URI` the cache + "
                       "lock to a bucket/folder, `sync URI` a worker's cache from it, `verify` "
                       "every locked file, `convert SRC DST` a VARSR training checkpoint to "
                       "a slim safetensors file (model tensors only, loads without a "
                       "pickle). Selection: the same config as `enhance`.")
    p.add_argument("action", choices=["list", "pull", "mirror", "sync", "verify", "convert"])
    p.add_argument("uri", nargs="?", help="mirror / sync: the bucket prefix or folder; "
                   "convert: the authors' checkpoint (VARSR.pth, VQVAE.pth)")
    p.add_argument("dst", nargs="?", help="convert: the safetensors file to write")
    p.add_argument("--key", help="convert: the model inside ['trainer'] (default: "
                   "var_wo_ddp or vae_local, whichever the file holds)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="convert: cast floating tensors (default: as stored)")
    p.add_argument("--config", help="YAML of config fields (the run's)")
    p.add_argument("--prior")
    p.add_argument("--prior-model")
    p.add_argument("--metrics", help="comma-separated quality measures")
    p.add_argument("--reference-metrics", help="comma-separated full-reference measures")
    p.add_argument("--enhancer")
    p.add_argument("--weights", dest="enhancer_weights", help="enhancer weights path or URI")
    p.add_argument("--no-enhance", dest="enhance", action="store_const", const=False)
    p.add_argument("--all", action="store_true", help="every catalogued file, not just the "
                   "config's")
    p.add_argument("--hub", help="pull: fetch <hub>/<key> from this folder/URI instead of "
                   "each file's source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_weights)


WEIGHTS_FLAGS = ("prior", "prior_model", "metrics", "reference_metrics", "enhancer",
                 "enhancer_weights", "enhance")


def cmd_weights(args: argparse.Namespace) -> int:
    from varlide import resolver, weights

    if args.action == "convert":
        return _convert_weights(args)

    cfg = _config(args.config, {k: getattr(args, k) for k in WEIGHTS_FLAGS})
    resolver.use_cache(cfg)
    if args.action in ("mirror", "sync") and not args.uri:
        raise ConfigError(f"`varlide weights {args.action}` needs a URI (bucket prefix/folder)")
    reqs: list = []
    if args.action in ("list", "pull", "mirror"):
        reqs = resolver.requirements(cfg, include_reference=True)
        if args.all:
            reqs = weights.dedupe(reqs + resolver.catalogue())
    if args.action == "list":
        rows = resolver.describe(reqs)
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        for r in rows:
            state = "present" if r["present"] else ("absent" if r["optional"] else "MISSING")
            extra = f" {r['size'] / 1e6:.1f} MB" if r["size"] is not None else (
                f" <- {r['source']}" if r["source"] else "")
            lock = f" sha256 {r['sha256'][:12]}" if r["sha256"] else ""
            print(f"{state:8} {r['used_by']}: {r['path']}{extra}{lock}")
        for name in resolver.uncatalogued_metrics(cfg, include_reference=True):
            print(f"?        metric {name}: files not catalogued (pyiqa's own cache)")
        print(f"lock file {weights.lock_path()}")
        return EXIT_OK
    if args.action == "pull":
        weights.set_offline(False)
        os.environ.pop("HF_HUB_OFFLINE", None)
        acts = weights.pull(reqs, hub=args.hub, progress=not args.json)
    elif args.action == "mirror":
        acts = weights.mirror(args.uri, reqs)
    elif args.action == "sync":
        acts = weights.sync(args.uri)
    else:
        acts = weights.verify()
    failed = [a for a in acts if a.what in ("failed", "FAILED")]
    if args.json:
        print(json.dumps([a.__dict__ for a in acts], indent=2))
    else:
        for a in acts:
            print(f"{a.what:8} {a.key} -> {a.path}" + (f": {a.detail}" if a.detail else ""))
        print(f"{len(acts) - len(failed)} ok, {len(failed)} failed; lock file "
              f"{weights.lock_path()}")
    if failed:
        print("error: " + "; ".join(f"{a.path}: {a.detail}" for a in failed), file=sys.stderr)
        return EXIT_FAILED_SHARDS
    return EXIT_OK


def _convert_weights(args: argparse.Namespace) -> int:
    """``varlide weights convert SRC DST``: the model tensors of an authors' checkpoint."""
    if not args.uri or not args.dst:
        raise ConfigError("`varlide weights convert` needs SRC (the authors' .pth) and DST "
                          "(the .safetensors file to write)")
    from varlide.models.var.checkpoints import convert

    try:
        summary = convert(args.uri, args.dst, key=args.key, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"converted {args.uri} ['trainer'][{summary['key']!r}]: {summary['tensors']} "
              f"tensors, {summary['parameters'] / 1e6:.1f} M values, "
              f"{summary['bytes'] / 1e6:.1f} MB -> {summary['dst']}")
    return EXIT_OK


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a prior's map onto the enhancer's trained scale",
                       description="Score every image of REFERENCE with the run's prior and "
                       "with the enhancer's trained prior, fit a monotone quantile map per "
                       "score (v, b) and store it beside the weights (the weights cache, "
                       "recorded in the lock file), where runs pick it up.")
    p.add_argument("reference", help="folder or URI of reference images (like the corpus)")
    p.add_argument("--config", help="YAML of config fields (prompts, enhancer ...)")
    p.add_argument("--prior", help="the backend to calibrate (e.g. clip)")
    p.add_argument("--prior-model", help="its model (clip: ARCH:TAG ...)")
    p.add_argument("--to", help="target scale BACKEND[/MODEL] (default: the enhancer's)")
    p.add_argument("--enhancer")
    p.add_argument("--weights", dest="enhancer_weights", help="enhancer weights path or URI")
    p.add_argument("--out", help="where to write it (default: the weights cache)")
    p.add_argument("--limit", type=int, help="at most N images")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from varlide.engine import resolve_device
    from varlide.priors.calibration import calibrate, parse_prior_id
    from varlide.resolver import trained_prior_of, use_cache
    from varlide.run import canonical_uri
    from varlide.weights import set_offline

    cfg = _config(args.config, {k: getattr(args, k) for k in (
        "prior", "prior_model", "enhancer", "enhancer_weights", "device")})
    use_cache(cfg)
    set_offline(not cfg.weights_online)
    target = parse_prior_id(args.to) if args.to else trained_prior_of(cfg)
    try:
        cal, out = calibrate(canonical_uri(args.reference), cfg, target=target, out=args.out,
                             device=resolve_device(cfg.device), limit=args.limit,
                             batch_size=args.batch_size, progress=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"calibration {cal.id}: {cal.images} images of {cal.reference}")
    print(f"  v knots {cal.visibility.x[0]:.3f}..{cal.visibility.x[-1]:.3f} -> "
          f"{cal.visibility.y[0]:.3f}..{cal.visibility.y[-1]:.3f}; b knots "
          f"{cal.blur.x[0]:.3f}..{cal.blur.x[-1]:.3f} -> {cal.blur.y[0]:.3f}..{cal.blur.y[-1]:.3f}")
    print(f"  written to {out}")
    return EXIT_OK


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    m = summary["metrics"]
    out = summary["output_uri"]
    run_id, dataset = summary["run_id"], summary["dataset"]
    print(f"run {run_id}: {int(m.get('images', 0))} images, {int(m.get('ok', 0))} ok, "
          f"{int(m.get('errors', 0))} errors"
          + (f", {m['images_per_s']:.1f} img/s" if "images_per_s" in m else ""))
    if summary.get("new_files_not_in_run"):
        print(f"note: {summary['new_files_not_in_run']} file(s) appeared since this run was "
              "planned and are not part of it (use --fresh or a new --run-id to include them)")
    print(f"  scores    {out}/scores/{dataset}/{run_id}/*.parquet")
    print(f"  enhanced  {out}/enhanced/{run_id}/")
    print(f"  manifest  {out}/runs/{run_id}/manifest.json")
    ml = summary.get("mlflow", {})
    print(f"  mlflow    {ml.get('tracking_uri')} run {ml.get('run_id')} "
          f"(mlflow ui --backend-store-uri {ml.get('tracking_uri')})")
    print(f"  query     python -c \"import pandas as pd; "
          f"print(pd.read_parquet('{out}/scores/{dataset}/{run_id}').describe())\"")
    print(f"  status    varlide status {out} --run {run_id}")


def _status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="shards done / pending / failed of a run")
    p.add_argument("output", help="the output store of the run(s)")
    p.add_argument("--run", help="run id (default: every run in OUTPUT)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from varlide.run import canonical_uri
    from varlide.storage.runstore import list_run_ids, run_status

    output = canonical_uri(args.output)
    run_ids = [args.run] if args.run else list_run_ids(output)
    if not run_ids:
        print(f"no runs in {output}", file=sys.stderr)
        return EXIT_USAGE
    statuses = [run_status(output, rid) for rid in run_ids]
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=2, default=str))
        return EXIT_OK
    for s in statuses:
        state = "complete" if not s.pending and not s.failed else (
            "failed shards" if s.failed else "incomplete")
        print(f"run {s.run_id} ({s.dataset}): {state}")
        print(f"  shards  {len(s.done)}/{s.shards_total} done, {len(s.pending)} pending, "
              f"{len(s.failed)} failed" + (f" ({', '.join(map(str, s.failed))})"
                                           if s.failed else ""))
        print(f"  rows    {s.rows} of {s.images} images, {s.errors} errors")
        for what, shards in (("missing", s.missing_parquet), ("damaged", s.damaged_parquet)):
            if shards:
                print(f"  {what} Parquet of shard(s) marked done: "
                      f"{', '.join(f'{i:05d}' for i in shards[:10])} (the same enhance "
                      "command redoes them)")
    return EXIT_OK


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-corpus", help="write OUT/lowlight and OUT/reference demo images")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_corpus)


def cmd_demo_corpus(args: argparse.Namespace) -> int:
    from varlide.demo import make_demo_corpus
    from varlide.run import canonical_uri

    out = canonical_uri(args.out)
    names = make_demo_corpus(out, count=args.count, seed=args.seed)
    print(f"wrote {len(names)} low-light images to {out}/lowlight and their references to "
          f"{out}/reference")
    return EXIT_OK


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an enhancer without references on DATA",
                       description="Unsupervised (zero-reference) training on any image corpus "
                       "URI. Checkpoints go to OUT every K steps; re-running the same command "
                       "resumes from the newest one. Curves, checkpoints and the final weights "
                       "go to MLflow (experiment varlide-train).")
    p.add_argument("data", help="folder or URI of training images (any exposure)")
    p.add_argument("out", help="local folder for checkpoints and the final weights")
    p.add_argument("--config", help="YAML of TrainConfig fields (varlide/training.py)")
    p.add_argument("--enhancer", help="a trainable registered enhancer (default varlide-lite; "
                   "zero-dce trains with its own loss; restorer, the learned deblurring "
                   "stage, on blurred / sharp pairs made from DATA; varlide-var, VICM, VGPM "
                   "and SF-RoPE around a frozen VAR backbone, with --init-from)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--init-from", metavar="WEIGHTS",
                   help="weights folder or models:/ URI to start from (fine-tuning); "
                   "varlide-var: the folder of its frozen VAR backbone (varsr.safetensors, "
                   "vqvae.safetensors)")
    p.add_argument("--experiment", default="varlide-train")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from varlide.config import load_settings, read_yaml
    from varlide.training import TrainConfig

    doc = read_yaml(args.config) if args.config else {}
    flags = {n: getattr(args, n) for n in ("enhancer", "steps", "batch_size", "crop", "device",
                                           "init_from")}
    enhancer = flags["enhancer"] or doc.get("enhancer")
    if enhancer:  # its own loss and schedule unless the file names them
        from varlide.models import ENHANCERS
        from varlide.training import train_defaults

        if enhancer in ENHANCERS:
            doc = {**train_defaults(enhancer), **doc}
    cfg = load_settings(TrainConfig, doc, flags, env_prefix="VARLIDE_TRAIN_")
    _start_prefect_server()
    from flows import prefect_api
    from flows.train import train_flow
    from varlide.run import canonical_uri

    with prefect_api():
        summary = train_flow(canonical_uri(args.data), canonical_uri(args.out), cfg.as_dict(),
                             args.experiment)
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s "
          f"({summary['steps_per_s']:.2f} steps/s); weights {summary['weights_uri']} "
          f"(version {summary['version']}); MLflow run {summary['mlflow_run_id']}")
    return EXIT_OK


# varlide.evaluation's DEFAULT_ENHANCERS / DEFAULT_MAX_SIDE (not imported here: it pulls in
# torch for every command; a test checks they agree)
EVAL_ENHANCERS = ("classic-curve", "zero-dce", "varlide-lite")
EVAL_MAX_SIDE = 512


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="a table of quality measures per enhancer",
                       description="Measure enhancers on INPUT and write a table: "
                       "eval_per_image.csv, eval_summary.csv and eval.md (Markdown) to --out, "
                       "the summary metrics and files to one MLflow run (experiment "
                       "varlide-eval) and a Prefect table artifact. INPUT is a folder or URI "
                       "of images (no-reference measures, also by input brightness band), "
                       "with --reference a folder of clean images with the same relative "
                       "names (psnr, ssim), or `synthetic`: the demo-corpus degradations of "
                       "the bundled photographs (2 crops each per seed). The row `input` (no "
                       "enhancement) is always there; learned enhancers run with routing off "
                       "(every image through the full model).")
    p.add_argument("input", help="folder or URI of the images, or `synthetic`")
    p.add_argument("--reference", metavar="URI",
                   help="clean images with the same relative paths as INPUT's")
    p.add_argument("--enhancer", action="append", metavar="NAME[=WEIGHTS]",
                   help="registered enhancer, optionally with weights (a folder, URI or "
                   "models:/NAME@ALIAS); repeatable (default: "
                   f"{', '.join(EVAL_ENHANCERS)})")
    p.add_argument("--metrics", help="comma-separated measures (default: psnr,ssim,brightness "
                   "with a reference; brightness,overexposed,piqe,entropy,sharpness without)")
    p.add_argument("--max-images", type=int, metavar="N",
                   help="at most N images (a deterministic subset)")
    p.add_argument("--config", help="YAML of eval settings (varlide.evaluation.EvalRunConfig: "
                   "reference, enhancers, metrics, max_images, seeds, max_side, device, "
                   "batch_size, iqa_max_side, out, experiment); flags override it")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="synthetic: seeds 0..N-1, 10 images each (default 1)")
    p.add_argument("--max-side", type=int, metavar="N",
                   help=f"area-downscale folder images to this long side, 0 = as stored "
                   f"(default {EVAL_MAX_SIDE}); synthetic crops are min(N, 256) px")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default auto")
    p.add_argument("--batch-size", type=int, help="images per batch (default 8)")
    p.add_argument("--iqa-max-side", type=int, help="long side cap for pyiqa measures")
    p.add_argument("--out", metavar="URI", help="where the files go (any fsspec URI; default "
                   "./eval-<UTC time>-<hex> in the working directory)")
    p.add_argument("--experiment", help="MLflow experiment (default varlide-eval)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)


def _eval_settings(args: argparse.Namespace):
    """``--config`` < ``VARLIDE_EVAL_*`` < flags, through the one settings loader."""
    from varlide.config import load_settings
    from varlide.evaluation import EvalRunConfig

    flags = {k: getattr(args, k) for k in ("reference", "max_images", "seeds", "max_side",
                                           "device", "batch_size", "iqa_max_side", "out",
                                           "experiment")}
    flags["enhancers"] = tuple(args.enhancer) if args.enhancer else None
    flags["metrics"] = (tuple(m.strip() for m in args.metrics.split(",") if m.strip())
                        if args.metrics else None)
    return load_settings(EvalRunConfig, args.config, flags, env_prefix="VARLIDE_EVAL_")


def _eval_preflight(args: argparse.Namespace, ecfg) -> dict[str, Any]:
    """Everything checkable before the flow starts (exit 2 with a message, not a failed
    run): the sets, the enhancers and their weights, the measures, the device."""
    from varlide import evaluation, weights
    from varlide.engine import resolve_device
    from varlide.iqa.base import metric_weights
    from varlide.run import canonical_uri

    specs = list(ecfg.enhancers)
    input_uri = args.input if args.input == evaluation.SYNTHETIC else canonical_uri(args.input)
    reference = canonical_uri(ecfg.reference) if ecfg.reference else None
    metrics = ",".join(ecfg.metrics) if ecfg.metrics else None
    try:
        enhancers = evaluation.parse_enhancers(specs)
        plan = evaluation.plan_sets(input_uri, reference, max_images=ecfg.max_images,
                                    max_side=ecfg.max_side, seeds=ecfg.seeds)
        paired, unpaired = evaluation.plan_metrics(metrics, plan)
        resolve_device(ecfg.device)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    for name in dict.fromkeys([*paired, *unpaired]):
        files = metric_weights(name)
        if files:
            weights.ensure_files(files, f"metric {name}")
    for label, e in enhancers.items():
        try:
            evaluation.load_enhancer(e["name"], e["weights"], "cpu")
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"enhancer {label}: {exc}") from None
    return {"input_uri": input_uri, "reference_uri": reference, "enhancers": specs,
            "metrics": list(dict.fromkeys([*paired, *unpaired])) if metrics else None,
            "plan": plan}


def cmd_eval(args: argparse.Namespace) -> int:
    ecfg = _eval_settings(args)  # a bad value: exit 2 before anything starts
    _start_prefect_server()
    pre = _eval_preflight(args, ecfg)
    from flows import prefect_api
    from flows.evaluate import eval_flow

    with prefect_api():
        result = eval_flow(pre["input_uri"], pre["reference_uri"], enhancers=pre["enhancers"],
                           out=ecfg.out, metrics=pre["metrics"], max_images=ecfg.max_images,
                           max_side=ecfg.max_side, seeds=ecfg.seeds, device=ecfg.device,
                           experiment=ecfg.experiment, batch_size=ecfg.batch_size,
                           iqa_max_side=ecfg.iqa_max_side)
    if args.json:
        print(json.dumps(result, indent=2, default=str, ensure_ascii=False))
        return EXIT_OK
    print(result["table"])
    sets = "; ".join(f"{s['name']} ({s['kind']}, {s['images']} images)" for s in result["sets"])
    print(f"eval {result['eval_id']}: {len(result['enhancers'])} rows per set on {sets} in "
          f"{result['seconds']:.0f} s")
    print(f"  files   {', '.join(result['files'].values())}")
    print(f"  mlflow  run {result['mlflow_run_id']} (experiment {result['experiment']})")
    return EXIT_OK


def _query_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="SQL (DuckDB) over the scores: the view `scores`",
                       description="Run SQL over the score tables of OUTPUT with DuckDB. The "
                       "rows of every run (or of one, --run) are the view `scores` (columns: "
                       "docs/SCHEMA.md). Example: varlide query out \"SELECT route, count(*) "
                       "FROM scores WHERE status = 'ok' GROUP BY route\"")
    p.add_argument("output", help="the output store (a folder or s3://bucket/prefix)")
    p.add_argument("sql", help="the SQL ('-' reads it from stdin)")
    p.add_argument("--run", help="only this run id's rows in `scores`")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--csv", metavar="FILE", help="write the result to FILE as CSV")
    dest.add_argument("--parquet", metavar="FILE", help="write the result to FILE as Parquet")
    p.add_argument("--max-rows", type=int, default=40, help="rows shown in the terminal")
    p.set_defaults(func=cmd_query)


def cmd_query(args: argparse.Namespace) -> int:
    from varlide.analysis import AnalysisError, connect, export, run_sql, show

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    try:
        rel = run_sql(connect(args.output, args.run), sql)
        target = args.csv or args.parquet
        if target:
            rows = export(rel, target, "csv" if args.csv else "parquet")
            print(f"wrote {rows} rows to {target}")
        elif rel is None:
            print("ok (the statement returns no rows)")
        else:
            show(rel, max_rows=args.max_rows)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of a run",
                       description="Write a run's report: counts and error reasons, "
                       "histograms of v, b, n_iter, route and every quality measure before and "
                       "after, v against brightness gain, thumbnail grids (worst, best, random). "
                       "The figures also go to the run's MLflow run (tag varlide.run_id).")
    p.add_argument("output", help="the output store of the run")
    p.add_argument("--run", help="run id (default: the output's only run)")
    p.add_argument("--out", metavar="FILE",
                   help="where to write (default OUTPUT/runs/<run_id>/report.html)")
    p.add_argument("--thumbs", type=int, default=8, help="images per thumbnail grid")
    p.add_argument("--rank-by", metavar="MEASURE",
                   help="rank thumbnails by this measure's improvement, or 'visibility' "
                   "(default: piqe improvement, else another directed measure, else v)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random grid")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_false",
                   help="do not log the figures to MLflow")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from varlide.analysis import AnalysisError, build_report

    try:
        result = build_report(args.output, args.run, args.out, thumbs=args.thumbs,
                              seed=args.seed, rank_by=args.rank_by, mlflow=args.mlflow)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    c = result.counts
    print(f"report of run {result.run_id}: {int(c.get('images', 0))} images, "
          f"{int(c.get('ok', 0))} ok, {int(c.get('errors', 0))} errors, "
          f"{len(result.figures)} figures")
    print(f"  page    {result.uri}")
    print(f"  mlflow  {'figures logged to ' if result.mlflow_run_id else 'not logged: '}"
          f"{result.mlflow_note}")
    return EXIT_OK


def _retrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the output store whose scores pick the images (newest first)")
    p.add_argument("--dataset", required=True, help="the dataset whose scored images to use")
    p.add_argument("--model-name", default="varlide-lite",
                   help="registered model name in the MLflow registry (default varlide-lite)")
    p.add_argument("--newest", type=int, default=512, help="newest N scored images (512)")
    p.add_argument("--config", help="YAML with sections train: (TrainConfig fields), gate: "
                   "(primary, margin, guards) and evaluation: (EvalConfig fields)")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--margin", type=float, help="required improvement of the gate's primary "
                   "measure (gate.margin, default 0.1 dB of psnr)")
    p.add_argument("--initial-weights", help="the first champion when the registry has none "
                   "(default: the shipped weights)")
    p.add_argument("--work-dir", help="staged corpus + training output "
                   "(default OUTPUT/retrain/<retrain id>)")
    p.add_argument("--experiment", default="varlide-retrain")


def _retrain_params(args: argparse.Namespace) -> dict[str, Any]:
    """The retrain flow's parameters, validated here (an error names the field)."""
    from varlide.config import load_settings, read_yaml
    from varlide.promotion import EvalConfig, GateConfig
    from varlide.run import canonical_uri
    from varlide.training import TrainConfig

    doc = read_yaml(args.config) if args.config else {}
    unknown = set(doc) - {"train", "gate", "evaluation"}
    if unknown:
        raise ConfigError(f"{args.config}: unknown section(s) {sorted(unknown)} "
                          "(expected train, gate, evaluation)")
    sections = {"train": (TrainConfig, {"steps": args.steps}),
                "gate": (GateConfig, {"margin": args.margin}), "evaluation": (EvalConfig, {})}
    fields: dict[str, dict[str, Any]] = {}
    for section, (cls, flags) in sections.items():
        loaded = load_settings(cls, doc, flags, section=section)  # errors name the field
        env = {k.removeprefix(f"VARLIDE_{section.upper()}_").lower() for k in os.environ
               if k.startswith(f"VARLIDE_{section.upper()}_")}
        given = {*(doc.get(section) or {}), *env, *(k for k, v in flags.items() if v is not None)}
        fields[section] = {k: getattr(loaded, k) for k in sorted(given)}  # what was set
    train, gate, evaluation = fields["train"], fields["gate"], fields["evaluation"]
    if args.newest < 1:
        raise ConfigError(f"--newest: expected >= 1, got {args.newest}")
    return {"output_uri": canonical_uri(args.output), "dataset": args.dataset,
            "model_name": args.model_name, "newest": args.newest, "train": train,
            "gate": gate, "evaluation": evaluation,
            "initial_weights": canonical_uri(args.initial_weights) if args.initial_weights
            else None,
            "work_dir": canonical_uri(args.work_dir) if args.work_dir else None,
            "experiment": args.experiment}


def _retrain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="retrain on the newest scored images; promote if better",
                       description="Train the registry's champion further on the newest N "
                       "scored images of a dataset, measure candidate and champion on the same "
                       "held-out images, register the candidate and move the `champion` alias "
                       "only when it is better by the gate's margin (MLflow registry at "
                       "MLFLOW_TRACKING_URI). With no champion yet the shipped weights become "
                       "version 1.")
    _retrain_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_retrain)


def cmd_retrain(args: argparse.Namespace) -> int:
    params = _retrain_params(args)
    _start_prefect_server()
    from flows import prefect_api
    from flows.retrain import retrain_flow

    with prefect_api():
        s = retrain_flow(**params)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return EXIT_OK
    print(f"retrain {s['retrain_id']}: {s['decision']} ({s['reason']})")
    print(f"  {s['model_name']}@{s['alias']} = version {s['champion_version_after']} "
          f"(candidate version {s['candidate_version']}, champion before "
          f"{s['champion_version_before']})")
    print(f"  mlflow run {s['mlflow_run_id']}; work dir {s['work_dir']}")
    return EXIT_OK


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the retrain flow on a cron schedule (Prefect)",
                       description="Serve Prefect deployments from this process (Prefect "
                       "`serve`, needs a Prefect server: PREFECT_API_URL): the retrain flow "
                       "with a cron schedule and these parameters, and the enhance and eval "
                       "flows on demand (no schedule). Runs until interrupted.")
    _retrain_args(p)
    p.add_argument("--cron", default="0 2 * * *", help="retrain schedule (default nightly, "
                   "02:00 UTC)")
    p.add_argument("--name", default="nightly", help="the retrain deployment's name")
    p.add_argument("--no-enhance", dest="serve_enhance", action="store_false",
                   help="do not serve the enhance flow")
    p.add_argument("--no-eval", dest="serve_eval", action="store_false",
                   help="do not serve the eval flow")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    params = _retrain_params(args)
    from prefect import serve

    from flows.retrain import retrain_flow

    deployments = [retrain_flow.to_deployment(
        name=args.name, cron=args.cron, parameters=params, tags=["varlide", "retrain"],
        description=f"retrain {params['model_name']} on the newest {params['newest']} scored "
                    f"images of {params['dataset']}; promote only when better")]
    if args.serve_enhance:
        from flows.enhance import enhance_job

        deployments.append(enhance_job.to_deployment(name="on-demand",
                                                      tags=["varlide", "enhance"]))
    if args.serve_eval:
        from flows.evaluate import eval_flow

        deployments.append(eval_flow.to_deployment(name="on-demand", tags=["varlide", "eval"]))
    print(f"serving {', '.join(f'{d.flow_name}/{d.name}' for d in deployments)}; retrain cron "
          f"{args.cron!r}", flush=True)
    serve(*deployments, print_starting_message=False)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varlide", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _enhance_parser(sub)
    _status_parser(sub)
    _query_parser(sub)
    _report_parser(sub)
    _demo_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _weights_parser(sub)
    _calibrate_parser(sub)
    _retrain_parser(sub)
    _serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    allocator.tune()  # first: glibc fixes the arena limit when the second thread starts
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Prefect's temporary server can take > 20 s to start on a loaded machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _sigterm_as_interrupt()
    code = _dispatch(args)
    stuck = stuck_threads()
    if stuck:  # a hang past a timeout: never join it at interpreter exit
        print(f"warning: {stuck} thread(s) stuck past a timeout are left behind (their "
              "files are error rows 'timed out'); exiting without them", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    """The command, with each way it can fail mapped to its exit code."""
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _stopped(signal.SIGINT)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:  # INPUT, config
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno not in _STORE_ERRNOS:
            raise
        print(f"error: the output store refused a write: {exc}; nothing written is corrupt "
              "(free space or fix the store, then re-run the same command)", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    except BaseException as exc:
        from varlide.storage.runstore import RunLockedError

        if isinstance(exc, RunLockedError):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_LOCKED
        if type(exc).__name__ == "TerminationSignal":  # Prefect's SIGTERM inside a flow
            return _stopped(signal.SIGTERM)
        raise


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside a flow, handled like Ctrl-C (Prefect's own handler runs in one)."""


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise _Terminated()

    with contextlib.suppress(ValueError):  # not the main thread (an embedding caller)
        signal.signal(signal.SIGTERM, handler)


def _stopped(sig: signal.Signals) -> int:
    """A signal stopped the command: no shard was finished after its lock was let go."""
    if sig == signal.SIGINT and isinstance(sys.exc_info()[1], _Terminated):
        sig = signal.SIGTERM
    print(f"stopped by {sig.name}: the shards that finished are kept (markers under "
          "OUTPUT/runs/RUN_ID/done); re-run the same command to resume the rest",
          file=sys.stderr)
    return 128 + int(sig)


# a full, read-only or over-quota output store: the run's cause, said in one line
_STORE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


if __name__ == "__main__":
    sys.exit(main())
