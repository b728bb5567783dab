r"""Enhancer ablations: train the variants on a reduced budget, then evaluate them.

docs/METHOD.md's table (two runs at a time on 2 cores: ``--threads 1`` each)::

    A=benchmarks/ablate.py; EV="--max-images 16 --seeds 3 --dev-max-side 512"
    .venv/bin/python $A train --variants a,b,c,d,e --steps 200 --threads 1 \
        --exposure-level 0.5 --out /tmp/train/ablate2
    .venv/bin/python $A train --variants a --steps 800 --threads 1 --out /tmp/train/full
    .venv/bin/python $A ship --exposure-level 0.5 --steps 800 --threads 1 --out /tmp/train/ship800
    .venv/bin/python $A ship --exposure-level 0.525 --steps 800 --threads 1 \
        --out /tmp/train/ship800-vgpm525                             # VICM+VGPM, shipped loss
    .venv/bin/python $A train --variants b --steps 800 --threads 1 --exposure-level 0.525 \
        --out /tmp/train/full525                                     # fixed N, shipped loss
    .venv/bin/python $A ship --no-vgpm --exposure-level 0.525 --steps 800 --threads 1 \
        --out /tmp/train/ship-E0525                                  # the shipped weights
    .venv/bin/python $A eval $EV --out /tmp/train/ablate2 --suffix " (200 steps)" --tag ablate
    .venv/bin/python $A eval $EV --out /tmp/train/full --variants a --no-baselines \
        --suffix " (800 steps)" --shipped /tmp/train/ship-E0525/final --label shipped \
        --merge /tmp/train/ablate2/eval_per_image-ablate.csv --tag all
    (and likewise one eval call per further weights folder, each merged in with --merge)

``train`` writes OUT/<variant>/final (and checkpoints); ``eval`` writes
OUT/eval_per_image*.csv, eval_summary*.csv and eval*.md (docs/METHOD.md's table).

Variants (same recipe and seed; only the model/loss differ):
  a  zero-dce       ZeroDCE (fixed N = 8), Zero-DCE's own losses
  b  fixed-N-ours   VarlideLite with vicm=False, vgpm=False, our losses (fixed N = 8)
  c  vicm           VarlideLite with vicm=True, vgpm=False, our losses
  d  vicm+vgpm      VarlideLite (VICM + VGPM), our losses, the paper's entropy sign (+1)
  e  vicm+vgpm-neg  as d with entropy_sign = -1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "a": ("zero-dce", dict(enhancer="zero-dce", loss="zero-dce")),
    "b": ("fixed-N-ours", dict(enhancer="varlide-lite", model={"vicm": False, "vgpm": False})),
    "c": ("vicm", dict(enhancer="varlide-lite", model={"vicm": True, "vgpm": False})),
    "d": ("vicm+vgpm", dict(enhancer="varlide-lite", loss_options={"entropy_sign": 1.0})),
    "e": ("vicm+vgpm-neg", dict(enhancer="varlide-lite", loss_options={"entropy_sign": -1.0})),
}


def recipe(steps: int, **kw):
    from varlide.training import TrainConfig

    base = dict(steps=steps, batch_size=16, crop=64, lr=5e-3, warmup=50, seed=0,
                log_every=25, checkpoint_every=50, val_every=max(steps, 1))
    base.update(kw)
    return TrainConfig(**base)


def cmd_train(args) -> None:
    from varlide.training import train

    for key in args.variants.split(","):
        name, kw = VARIANTS[key]
        if args.lr:
            kw = dict(kw, lr=args.lr)
        if args.warmup is not None:
            kw = dict(kw, warmup=args.warmup)
        if args.threads:
            kw = dict(kw, threads=args.threads)
        if args.exposure_level and kw.get("loss") != "zero-dce":
            kw = dict(kw, loss_options={**kw.get("loss_options", {}),
                                        "exposure_level": args.exposure_level})
        cfg = recipe(args.steps, **kw)
        out = os.path.join(args.out, name)
        t0 = time.time()
        print(f"== {key} {name}: {json.dumps(cfg.as_dict())}", flush=True)

        def on_metrics(step, m, name=name):
            print(f"[{name}] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in m.items()),
                  flush=True)

        res = train(args.data, out, cfg, on_metrics=on_metrics)
        print(f"== {name} done: {res.steps} steps in {time.time() - t0:.0f} s, "
              f"version {res.version}, weights {res.weights_uri}", flush=True)


def cmd_ship(args) -> None:
    """The shipped model: varlide-lite, the full recipe (warm-up 50); ``--no-vgpm``: VICM only."""
    from varlide.training import train

    cfg = recipe(args.steps, enhancer="varlide-lite", warmup=50, val_every=200,
                 model={"vgpm": not args.no_vgpm},
                 checkpoint_every=50, keep_checkpoints=5,
                 loss_options={"entropy_sign": args.entropy_sign,
                               **({"exposure_level": args.exposure_level}
                                  if args.exposure_level else {})},
                 **({"loss_weights": {"exp": args.exposure_weight}}
                    if args.exposure_weight else {}),
                 **({"darken_prob": args.darken_prob} if args.darken_prob is not None else {}),
                 **({"lr": args.lr} if args.lr else {}),
                 **({"threads": args.threads} if args.threads else {}))
    print(f"== shipped: {json.dumps(cfg.as_dict())}", flush=True)
    t0 = time.time()
    res = train(args.data, args.out, cfg, on_metrics=lambda step, m: print(
        f"[shipped] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in m.items()), flush=True))
    print(f"== shipped done: {res.steps} steps in {time.time() - t0:.0f} s, version "
          f"{res.version}, weights {res.weights_uri}", flush=True)


def build_sets(data_root: str, limit: int | None, seeds: int, dev_max_side: int | None):
    """The issue's four sets, with train-sice's held-out images taken from the *trainer's*
    split (``split_corpus``: content hash, 5 %, at most 48), so no evaluated image was
    trained on."""
    from varlide.evaluation import MODERATE, paired_from_folder, paired_synthetic, unpaired_folder
    from varlide.training import split_corpus

    sice = os.path.join(data_root, "train-sice")
    held = split_corpus(sice)[1]
    return [
        paired_synthetic(seeds=tuple(range(seeds))),
        paired_from_folder(sice, held, limit=limit, max_side=256, name="sice-paired"),
        unpaired_folder(os.path.join(data_root, "dev-lowlight"), "dev-lowlight",
                        max_side=dev_max_side),
        unpaired_folder(sice, "sice-moderate", held, brightness=MODERATE, limit=limit,
                        max_side=256),
    ], held


def build_enhancers(out: str, shipped: str | None, variants: str = "a,b,c,d,e",
                    baselines: bool = True, suffix: str = "",
                    label: str = "varlide-lite (shipped)"):
    """Display name -> enhancer; learned ones with full routing (never skip, VGPM always)."""
    from varlide.models.base import create_enhancer

    full = dict(skip_visibility=None, full_blur=0.0)
    enh: dict = {"input": None}
    if baselines:
        enh["classic-curve"] = "classic-curve"
    for key, (name, kw) in VARIANTS.items():
        if key not in variants.split(","):
            continue
        w = os.path.join(out, name, "final")
        name = f"{name}{suffix}"
        if not os.path.exists(os.path.join(w, "model.safetensors")):
            print(f"({key} {name}: no weights at {w}, row left out)", flush=True)
            continue
        if kw["enhancer"] == "zero-dce":
            enh[name] = create_enhancer("zero-dce", weights=w)
        else:
            enh[name] = create_enhancer("varlide-lite", weights=w, **full)
    if shipped:
        enh[label] = create_enhancer("varlide-lite", weights=shipped, **full)
    return enh


def cmd_eval(args) -> None:
    from varlide.evaluation import format_table, measure, summarize

    t0 = time.time()
    sets, held = build_sets(args.data_root, args.max_images, args.seeds, args.dev_max_side)
    for s in sets:
        print(f"set {s.name}: {len(s)} images ({s.description})", flush=True)
    enh = build_enhancers(args.out, args.shipped, args.variants, not args.no_baselines,
                          args.suffix, args.label)
    per = measure(enh, sets, batch_size=8, iqa_max_side=args.iqa_max_side)
    os.makedirs(args.out, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    per.to_csv(os.path.join(args.out, f"eval_per_image{tag}.csv"), index=False)
    for extra in args.merge or []:  # per-image tables of earlier calls (same sets)
        import pandas as pd

        old = pd.read_csv(extra)
        old = old[~old["enhancer"].isin(set(per["enhancer"]))]
        per = pd.concat([old, per], ignore_index=True)
    df = summarize(per, sets=sets)
    df.to_csv(os.path.join(args.out, f"eval_summary{tag}.csv"), index=False)
    table = format_table(df)
    with open(os.path.join(args.out, f"eval{tag}.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"eval took {time.time() - t0:.0f} s", flush=True)


def cmd_downscale(args) -> None:
    """The Zero-DCE++ knob: curve maps estimated on a 1/k copy, bilinear upsampling of the maps.

    Quality cost against k = 1 (same weights) on the paired sets (psnr, ssim) and on
    dev-lowlight at its stored size (brightness, and psnr of the /k output against the k = 1
    output); speed is measured by ``benchmarks/enhancer.py`` (curve net /k rows)."""
    from varlide.evaluation import format_table, measure, summarize
    from varlide.models.base import create_enhancer

    sets, _ = build_sets(args.data_root, args.max_images, args.seeds, None)
    full = dict(skip_visibility=None, full_blur=0.0)
    enh = {f"varlide-lite /{k:g}": create_enhancer("varlide-lite", weights=args.weights,
                                                   downscale=k, **full)
           for k in args.factors}
    per = measure(enh, sets, batch_size=4, paired_metrics=("psnr", "ssim"),
                  unpaired_metrics=("brightness",))
    df = summarize(per, sets=sets)
    table = format_table(df)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        per.to_csv(os.path.join(args.out, "downscale_per_image.csv"), index=False)
        with open(os.path.join(args.out, "downscale.md"), "w") as f:
            f.write(table)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", default="../shared/data/train-sice")
    t.add_argument("--out", default="/tmp/train/ablate")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--warmup", type=int, default=None, help="default: the recipe's 50")
    t.add_argument("--variants", default="a,b,c,d,e")
    t.add_argument("--threads", type=int, default=None, help="torch threads (two runs at once: 1)")
    t.add_argument("--exposure-level", type=float, default=None,
                   help="VarlideLoss E of our-loss variants (METHOD.md's 200-step rows: 0.5)")
    s = sub.add_parser("ship", help="train the shipped varlide-lite on the full recipe")
    s.add_argument("--data", default="../shared/data/train-sice")
    s.add_argument("--out", default="/tmp/train/shipped")
    s.add_argument("--steps", type=int, default=800)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--entropy-sign", type=float, default=1.0)
    s.add_argument("--threads", type=int, default=None, help="torch threads")
    s.add_argument("--exposure-level", type=float, default=None,
                   help="VarlideLoss E (default: its TRAINED_EXPOSURE_LEVEL)")
    s.add_argument("--exposure-weight", type=float, default=None,
                   help="VarlideLoss exposure weight (default: its 20)")
    s.add_argument("--darken-prob", type=float, default=None,
                   help="probability a bright crop is darkened (default: the recipe's 0.25)")
    s.add_argument("--no-vgpm", action="store_true",
                   help="VICM only (the shipped weights: VGPM measured harmful, METHOD.md)")
    e = sub.add_parser("eval")
    e.add_argument("--data-root", default="../shared/data")
    e.add_argument("--out", default="/tmp/train/ablate")
    e.add_argument("--shipped", default=None, help="weights folder of the shipped model")
    e.add_argument("--max-images", type=int, default=12,
                   help="at most this many held-out train-sice images per set")
    e.add_argument("--seeds", type=int, default=3, help="synthetic set: seeds 0..N-1")
    e.add_argument("--dev-max-side", type=int, default=None,
                   help="area-downscale dev-lowlight inputs to this long side")
    e.add_argument("--iqa-max-side", type=int, default=512)
    e.add_argument("--variants", default="a,b,c,d,e", help="ablation rows to measure")
    e.add_argument("--no-baselines", action="store_true", help="leave out classic-curve")
    e.add_argument("--tag", default="", help="suffix of the output files")
    e.add_argument("--suffix", default="", help="appended to the variant rows' names, e.g. "
                   "' (800 steps)'")
    e.add_argument("--label", default="varlide-lite (shipped)", help="row name of --shipped")
    e.add_argument("--merge", nargs="*", help="per-image CSVs of earlier calls to merge in")
    d = sub.add_parser("downscale", help="quality cost of downscaled curve estimation")
    d.add_argument("--data-root", default="../shared/data")
    d.add_argument("--weights", default="varlide/weights/varlide-lite")
    d.add_argument("--factors", type=lambda t: [float(x) for x in t.split(",")],
                   default=[1.0, 2.0, 4.0])
    d.add_argument("--max-images", type=int, default=16)
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--out", default=None)
    args = p.parse_args(argv)
    {"train": cmd_train, "ship": cmd_ship, "eval": cmd_eval,
     "downscale": cmd_downscale}[args.cmd](args)


if __name__ == "__main__":
    main()
