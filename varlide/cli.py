"""The ``varlide`` command, the outermost shell. Flows are imported lazily, only here.

    varlide enhance INPUT OUTPUT [options]   score (and enhance) a folder or bucket
    varlide status OUTPUT [--run ID]         shards done / pending / failed of a run
    varlide demo-corpus OUT                  a small synthetic night-time corpus + references
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from varlide.config import ConfigError, load_config

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
    p.add_argument("--workers", type=int, help="shards in flight on this machine")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"])
    p.add_argument("--enhancer", help="registered enhancer name (default classic-curve)")
    p.add_argument("--weights", dest="enhancer_weights", help="enhancer weights path or URI")
    p.add_argument("--prior", help="prior backend (default analytic)")
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
    p.add_argument("--iqa-max-side", type=int, help="long side cap for pyiqa measures")
    p.add_argument("--retries", type=int, help="retries of a failed shard (default 2)")
    p.add_argument("--experiment", help="MLflow experiment (default varlide-enhance)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_enhance)


CONFIG_FLAGS = ("dataset", "shard_size", "run_id", "workers", "device", "enhancer",
                "enhancer_weights", "prior", "metrics", "enhance", "include", "exclude", "limit",
                "format", "quality", "apply_exif", "reference", "batch_size", "iqa_max_side",
                "retries", "experiment", "progress")


def cmd_enhance(args: argparse.Namespace) -> int:
    from varlide.run import prepare_run

    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS}
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        plan = prepare_run(args.input, args.output, cfg, fresh=args.fresh, write=False)
        print(plan.describe())
        print(f"  weights {_weights_needed(cfg)}")
        print("dry run: nothing written")
        return EXIT_OK
    from flows.enhance import run_enhance

    summary = run_enhance(args.input, args.output, cfg, fresh=args.fresh)
    _print_summary(summary, args.json)
    if summary["failed_shards"]:
        print(f"error: shard(s) failed after retries: "
              f"{', '.join(f'{i:05d}' for i in summary['failed_shards'])}; "
              "re-run the same command to retry them", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    return EXIT_OK


def _weights_needed(cfg) -> str:
    if not cfg.enhance:
        return "none (--no-enhance)"
    if cfg.enhancer_weights:
        return f"enhancer {cfg.enhancer}: {cfg.enhancer_weights}"
    import varlide.models  # noqa: F401
    from varlide.models.base import ENHANCERS

    default = getattr(ENHANCERS.get(cfg.enhancer), "default_weights", None)
    return f"enhancer {cfg.enhancer}: {default or 'none (no learned weights)'}"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varlide", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _enhance_parser(sub)
    _status_parser(sub)
    _demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from varlide.storage.runstore import RunLockedError

        if isinstance(exc, RunLockedError):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_LOCKED
        raise


if __name__ == "__main__":
    sys.exit(main())
