"""Enhancer ablations: train the variants on a reduced budget, then evaluate them.

    .venv/bin/python benchmarks/ablate.py train --data ../shared/data/train-sice \
        --out /tmp/train/ablate --steps 100 --warmup 25 --variants a,b,c,d,e
    .venv/bin/python benchmarks/ablate.py eval --out /tmp/train/ablate \
        --shipped varlide/weights/varlide-lite --max-images 12

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
    args = p.parse_args(argv)
    cmd_train(args)


if __name__ == "__main__":
    main()
