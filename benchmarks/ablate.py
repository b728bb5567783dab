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
        --merge /tmp/train/ablate2/eval_per_image-ablate.csv --tag all --backbone identity
    (and likewise one eval call per further weights folder, each merged in with --merge)

The backbone slot's denoiser (METHOD.md, "The backbone slot"): which filter, then every row
with it (``--backbone denoise`` also filters the baselines' outputs: rows "+ denoiser")::

    .venv/bin/python $A denoise --out /tmp/train/denoise
    .venv/bin/python $A eval $EV --out /tmp/train/full --variants a --suffix " (800 steps)" \
        --shipped varlide/models/shipped/varlide-lite --backbone denoise --tag dn1 \
        --label "varlide-lite (shipped: VICM, E 0.525, 800 steps)"
    .venv/bin/python $A eval $EV --out /tmp/train/full525 --variants b --no-baselines \
        --suffix " (800 steps, E 0.525)" --shipped /tmp/train/ship800-vgpm525/final \
        --label "vicm+vgpm (800 steps, E 0.525)" --backbone denoise --tag dn2 \
        --merge /tmp/train/full/eval_per_image-dn1.csv
    .venv/bin/python $A ship --no-vgpm --backbone denoise --exposure-level 0.525 \
        --steps 800 --threads 1 --out /tmp/train/ship-dn-E0.525  # trained with the filter

Issue 12's per-stage ablation (default routing, shipped weights; METHOD.md, "Stages")::

    .venv/bin/python $A stages --out /tmp/train/stages

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
                 model={"vgpm": not args.no_vgpm,
                        **({"backbone": args.backbone} if args.backbone else {})},
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
    split (``varlide.holdout``: content hash, 5 %, at most 48), so no evaluated image was
    trained on."""
    from varlide.evaluation import MODERATE, paired_from_folder, paired_synthetic, unpaired_folder
    from varlide.holdout import split_corpus

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


class Denoised:
    """A baseline (``zero-dce``) followed by varlide-lite's ``denoise``
    backbone (same filter, same settings), so a row can be compared at equal post-processing."""

    def __init__(self, inner) -> None:
        from varlide.models.denoise import NoiseAdaptiveDenoiser

        self.inner, self.denoiser = inner, NoiseAdaptiveDenoiser()

    def enhance(self, images, visibility, blur):
        r = self.inner.enhance(images, visibility, blur)
        r.images = self.denoiser(r.images.float(), images.float()).clamp(0, 1)
        return r


def build_enhancers(out: str, shipped: str | None, variants: str = "a,b,c,d,e",
                    baselines: bool = True, suffix: str = "",
                    label: str = "varlide-lite (shipped)", backbone: str | None = None):
    """Display name -> enhancer; learned ones with full routing (never skip, VGPM always).

    ``backbone``: None = each varlide-lite weights' own; ``identity`` / ``denoise`` forces it,
    and ``denoise`` also puts the filter after the baselines (rows end in "+ denoiser")."""
    from varlide.evaluation import full_path
    from varlide.models.base import create_enhancer

    full = dict(skip_visibility=None, full_blur=0.0)
    if backbone:
        full["backbone"] = backbone
    dn = backbone == "denoise"
    wrap = Denoised if dn else (lambda m: m)
    tail = " + denoiser" if dn else ""
    enh: dict = {"input": None}
    if baselines:
        enh[f"classic-curve{tail}"] = full_path(create_enhancer(  # its own option
            "classic-curve", **({"backbone": backbone} if backbone else {})))
    for key, (name, kw) in VARIANTS.items():
        if key not in variants.split(","):
            continue
        w = os.path.join(out, name, "final")
        name = f"{name}{suffix}{tail}"
        if not os.path.exists(os.path.join(w, "model.safetensors")):
            print(f"({key} {name}: no weights at {w}, row left out)", flush=True)
            continue
        if kw["enhancer"] == "zero-dce":
            enh[name] = wrap(create_enhancer("zero-dce", weights=w))
        else:
            enh[name] = create_enhancer("varlide-lite", weights=w, **full)
    if shipped:
        enh[f"{label}{tail}"] = create_enhancer("varlide-lite", weights=shipped, **full)
    return enh


def cmd_eval(args) -> None:
    from varlide.evaluation import format_table, measure, summarize

    t0 = time.time()
    sets, held = build_sets(args.data_root, args.max_images, args.seeds, args.dev_max_side)
    for s in sets:
        print(f"set {s.name}: {len(s)} images ({s.description})", flush=True)
    enh = build_enhancers(args.out, args.shipped, args.variants, not args.no_baselines,
                          args.suffix, args.label, args.backbone)
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


def _filter_variants():
    """The backbone-slot filters compared in METHOD.md (name -> fn(curve_output, input))."""
    from varlide.models.denoise import NoiseAdaptiveDenoiser, gaussian_blur, noise_sigma

    def lee(y, noise_var, w):
        mu = gaussian_blur(y, w)
        var = (gaussian_blur(y * y, w) - mu * mu).clamp_min(0)
        return mu + (var - noise_var).clamp_min(0) / var.clamp_min(1e-8) * (y - mu)

    def lee_output_sigma(w, k):  # one sigma per image/channel, measured on the curve output
        return lambda y, x: lee(y, (k * noise_sigma(y)[:, :, None, None]) ** 2, w)

    out = {"none": lambda y, x: y,
           "gaussian 1 px (everywhere)": lambda y, x: gaussian_blur(y, 1.0)}
    for w, k in ((1.0, 1.0), (1.5, 1.0), (1.0, 1.5), (1.5, 1.5)):
        out[f"Lee w {w:g}, output sigma x{k:g}"] = lee_output_sigma(w, k)
    for w, k in ((1.0, 1.0), (1.5, 1.0), (2.0, 1.0), (1.5, 1.5)):
        out[f"Lee w {w:g}, input sigma x gain x{k:g}"] = NoiseAdaptiveDenoiser(w, k)
    return out


class _Filtered:
    def __init__(self, inner, fn) -> None:
        self.inner, self.fn = inner, fn

    def enhance(self, images, visibility, blur):
        r = self.inner.enhance(images, visibility, blur)
        r.images = self.fn(r.images.float(), images.float()).clamp(0, 1)
        return r


def _report(per, sets, out: str | None, name: str) -> None:
    """Print the summary table; with ``out``, write OUT/<name>_per_image.csv and <name>.md."""
    from varlide.evaluation import format_table, summarize

    table = format_table(summarize(per, sets=sets))
    print(table)
    if out:
        os.makedirs(out, exist_ok=True)
        per.to_csv(os.path.join(out, f"{name}_per_image.csv"), index=False)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(table)


def cmd_denoise(args) -> None:
    """Which filter fills the backbone slot: the shipped curve (backbone forced to identity)
    followed by each candidate; paired psnr/ssim, and brightness/sharpness/piqe on real frames
    (what a filter must not destroy)."""
    from varlide.evaluation import measure
    from varlide.models.base import create_enhancer

    t0 = time.time()
    sets, _ = build_sets(args.data_root, args.max_images, args.seeds, args.dev_max_side)
    curve = create_enhancer("varlide-lite", weights=args.weights, skip_visibility=None,
                            full_blur=0.0, backbone="identity")
    enh = {name: _Filtered(curve, fn) for name, fn in _filter_variants().items()}
    per = measure(enh, sets, batch_size=8, paired_metrics=("psnr", "ssim"),
                  unpaired_metrics=("brightness", "sharpness", "piqe"))
    _report(per, sets, args.out, "denoise")
    print(f"denoise ablation took {time.time() - t0:.0f} s", flush=True)


def cmd_downscale(args) -> None:
    """The Zero-DCE++ knob: curve maps estimated on a 1/k copy, bilinear upsampling of the maps.

    Quality cost against k = 1 (same weights) on the paired sets (psnr, ssim) and on
    dev-lowlight at its stored size (brightness, and psnr of the /k output against the k = 1
    output); speed is measured by ``benchmarks/enhancer.py`` (curve net /k rows)."""
    from varlide.evaluation import measure
    from varlide.models.base import create_enhancer

    sets, _ = build_sets(args.data_root, args.max_images, args.seeds, None)
    full = dict(skip_visibility=None, full_blur=0.0)
    if args.backbone:
        full["backbone"] = args.backbone
    enh = {f"varlide-lite /{k:g}": create_enhancer("varlide-lite", weights=args.weights,
                                                   downscale=k, **full)
           for k in args.factors}
    per = measure(enh, sets, batch_size=4, paired_metrics=("psnr", "ssim"),
                  unpaired_metrics=("brightness",))
    _report(per, sets, args.out, "downscale")


def stage_sets(data_root: str, limit: int | None, seeds: int, dev_max_side: int | None):
    """The issue-12 sets: each synthetic preset isolates one part of the degradation model
    (dark, blur, noise; all three; sharp = nothing to fix), then the real sets."""
    from varlide.evaluation import paired_synthetic

    synthetic = [paired_synthetic(seeds=tuple(range(seeds)), degradation=d)
                 for d in ("dark", "blur", "noise", "all", "sharp")]
    real, _ = build_sets(data_root, limit, seeds, dev_max_side)
    return synthetic + [s for s in real if s.name != "synthetic"]


def stage_enhancers(weights: str | None, restorer: str | None = None):
    """Per-stage rows, as a user runs them (default routing): the baselines with and without
    the denoiser, then varlide-lite's stages added one at a time. No VGPM row: the shipped
    weights have none (METHOD.md, "The shipped weights"). The learned deblurring row needs
    restorer weights (``restorer``, else the shipped ones when present)."""
    from varlide.models.base import create_enhancer
    from varlide.models.pretrained import WEIGHTS_FILE, default_weights_dir

    def lite(**kw):
        return create_enhancer("varlide-lite", weights=weights, **kw)

    if restorer is None and (default_weights_dir("restorer") / WEIGHTS_FILE).is_file():
        restorer = str(default_weights_dir("restorer"))
    learned = ({"+ learned deblur": lite(deblur={"method": "learned", "weights": restorer})}
               if restorer else {})
    return {
        "input": None,
        "zero-dce": create_enhancer("zero-dce"),
        "classic-curve": create_enhancer("classic-curve"),
        "classic-curve + denoise": create_enhancer("classic-curve", backbone="denoise"),
        "curve alone": lite(backbone="identity", highlights=False),
        "curve + highlights": lite(backbone="identity"),
        "+ denoise (default)": lite(),
        "+ nlm instead of denoise": lite(backbone="nlm"),
        "+ blind deblur": lite(deblur=True),
        **learned,
    }


def cmd_stages(args) -> None:
    """The per-stage ablation of issue 12 on the sets that isolate each part."""
    from varlide.evaluation import measure

    t0 = time.time()
    sets = stage_sets(args.data_root, args.max_images, args.seeds, args.dev_max_side)
    for s in sets:
        print(f"set {s.name}: {len(s)} images ({s.description})", flush=True)
    per = measure(stage_enhancers(args.weights, args.restorer), sets, batch_size=4,
                  iqa_max_side=args.iqa_max_side,
                  paired_metrics=("psnr", "ssim", "brightness", "overexposed", "colorfulness",
                                  "sharpness"),
                  unpaired_metrics=("brightness", "overexposed", "colorfulness", "sharpness",
                                    "piqe"))
    _report(per, sets, args.out, "stages")
    print(f"stage ablation took {time.time() - t0:.0f} s", flush=True)


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
    s.add_argument("--backbone", choices=("identity", "denoise"), default=None,
                   help="the backbone slot while training (default: identity)")
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
    e.add_argument("--backbone", choices=("identity", "denoise"), default=None,
                   help="force varlide-lite's backbone slot (default: each weights' own); "
                   "denoise also filters the baselines' outputs (rows '+ denoiser')")
    d = sub.add_parser("downscale", help="quality cost of downscaled curve estimation")
    d.add_argument("--data-root", default="../shared/data")
    d.add_argument("--weights", default="varlide/models/shipped/varlide-lite")
    d.add_argument("--factors", type=lambda t: [float(x) for x in t.split(",")],
                   default=[1.0, 2.0, 4.0])
    d.add_argument("--max-images", type=int, default=16)
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--out", default=None)
    d.add_argument("--backbone", choices=("identity", "denoise"), default=None,
                   help="force the backbone slot (METHOD.md's table: identity)")
    n = sub.add_parser("denoise", help="which filter fills the backbone slot")
    n.add_argument("--data-root", default="../shared/data")
    n.add_argument("--weights", default="varlide/models/shipped/varlide-lite")
    n.add_argument("--max-images", type=int, default=16)
    n.add_argument("--seeds", type=int, default=3)
    n.add_argument("--dev-max-side", type=int, default=512)
    n.add_argument("--out", default=None)
    g = sub.add_parser("stages", help="issue 12's per-stage ablation (default routing)")
    g.add_argument("--data-root", default="../shared/data")
    g.add_argument("--weights", default=None, help="varlide-lite weights (default: shipped)")
    g.add_argument("--restorer", default=None,
                   help="restorer weights for the learned-deblur row (default: shipped)")
    g.add_argument("--max-images", type=int, default=12)
    g.add_argument("--seeds", type=int, default=2)
    g.add_argument("--dev-max-side", type=int, default=512)
    g.add_argument("--iqa-max-side", type=int, default=512)
    g.add_argument("--out", default=None)
    args = p.parse_args(argv)
    {"train": cmd_train, "ship": cmd_ship, "eval": cmd_eval, "downscale": cmd_downscale,
     "denoise": cmd_denoise, "stages": cmd_stages}[args.cmd](args)


if __name__ == "__main__":
    main()
