r"""Highlights and routing (issue 12, part 3): the shipped varlide-lite as it was (blur
decides the route first, no highlight roll-off) against today's default (exposure first,
``tone.protect_highlights``), on the sets where each change matters.

    PYTHONPATH=. .venv/bin/python benchmarks/tone.py --seeds 2 --data ../shared/data

Sets: ``dev-lowlight`` (real night frames, stored size), ``sice-moderate`` (held-out
moderately lit SICE frames, 256 px), and the synthetic presets ``blur`` (well-lit, motion
blurred), ``sharp`` (nothing to fix) and ``all`` (the demo degradations). Per set and
enhancer: mean psnr (paired) or brightness / in-band share (real), over-exposed fraction,
how many frames clip more than their input, how many come out worse than their input
(paired) and how many were changed at all (psnr against the input below 35 dB). The last
line is the ratio of frames made to clip (baseline / ours).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _enhancers():
    from varlide.models.base import create_enhancer
    from varlide.models.varlide_lite import VarlideLite

    class BlurFirst(VarlideLite):
        """The routing before issue 12: b >= full_blur first (curve without VGPM), then skip."""

        def routes(self, v, b):
            out = []
            for vi, bi in zip(v.float().cpu().tolist(), b.float().cpu().tolist(), strict=True):
                lo, hi = self.skip_visibility or (2.0, 2.0)
                if bi >= self.full_blur:
                    out.append("full" if self.vgpm is not None else "curve")
                else:
                    out.append("skip" if lo <= vi <= hi else "curve")
            return out

    ours = create_enhancer("varlide-lite")
    before = create_enhancer("varlide-lite", highlights=False)
    before.__class__ = BlurFirst  # same weights and settings, the old routing
    enh = {"input": None, "before (blur first, no roll-off)": before, "ours (default)": ours}
    return enh


def _sets(data: str | None, seeds: int, limit: int):
    from varlide.evaluation import MODERATE, paired_synthetic, unpaired_folder
    from varlide.holdout import split_corpus

    seeds_ = tuple(range(seeds))
    sets = [paired_synthetic(seeds=seeds_, degradation=d) for d in ("blur", "sharp", "all")]
    if data and os.path.isdir(os.path.join(data, "dev-lowlight")):
        sice = os.path.join(data, "train-sice")
        held = split_corpus(sice)[1]
        sets += [unpaired_folder(os.path.join(data, "dev-lowlight"), "dev-lowlight"),
                 unpaired_folder(sice, "sice-moderate", held, brightness=MODERATE,
                                 limit=limit, max_side=256)]
    return sets


def _row(set_name: str, name: str, g, base) -> tuple[str, int]:
    """One table line and the number of frames that clip more than their input."""
    more = int((g.overexposed > base.overexposed + 1e-9).sum())
    paired = "psnr" in g and g.psnr.notna().any()
    cells = [set_name, name,
             f"{g.psnr.mean():.2f}" if paired else "",
             f"{g.brightness.mean():.3f}",
             "" if paired else f"{g.in_band.mean():.2f}",
             f"{100 * g.overexposed.mean():.2f} %", str(more),
             str(int((g.psnr < base.psnr - 0.05).sum())) if paired else "",
             str(int((g.psnr_vs_input < 35).sum())) if paired else ""]
    return "| " + " | ".join(cells) + " |", more


def _table(per) -> tuple[str, dict[str, int]]:
    """The markdown table, and per enhancer the number of frames made to clip."""
    inp = per[per.enhancer == "input"].set_index(["set", "image"])
    lines = ["| set | enhancer | psnr | brightness | in band | over-exposed | clip more "
             "| worse | changed |", "|---|---|---|---|---|---|---|---|---|"]
    clipped: dict[str, int] = {}
    for (set_name, name), g in per.groupby(["set", "enhancer"], sort=False):
        g = g.set_index(["set", "image"])
        line, more = _row(set_name, name, g, inp.loc[g.index])
        lines.append(line)
        clipped[name] = clipped.get(name, 0) + more
    return "\n".join(lines), clipped


def _changed(enh, sets) -> dict[tuple[str, str, str], float]:
    """psnr of each output against its own input: 'changed' means below 35 dB."""
    from varlide.evaluation.sets import EvalSet
    from varlide.priors.base import create_prior

    prior = create_prior("analytic")
    out = {}
    for eset in sets:
        if not isinstance(eset, EvalSet):
            continue
        for item in eset.items:
            x = torch.from_numpy(item.load()[0]).permute(2, 0, 1)[None].float()
            s = prior.score(x)
            for name, m in enh.items():
                if m is None:
                    continue
                y = m.enhance(x, s.visibility, s.blur).images.float()
                mse = float(((y - x) ** 2).mean())
                out[(eset.name, item.id, name)] = 10 * torch.log10(
                    torch.tensor(1 / max(mse, 1e-12))).item()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("VARLIDE_SHARED_DATA", "../shared/data"))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--limit", type=int, default=24, help="sice-moderate images at most")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from varlide.evaluation import measure

    t0 = time.time()
    enh = _enhancers()
    sets = _sets(args.data, args.seeds, args.limit)
    per = measure(enh, sets, batch_size=4, paired_metrics=("psnr", "brightness", "overexposed"),
                  unpaired_metrics=("brightness", "overexposed"))
    vs_input = _changed(enh, [s for s in sets if s.paired])
    per["psnr_vs_input"] = [vs_input.get((r.set, r.image, r.enhancer), float("nan"))
                            for r in per.itertuples()]
    table, clipped = _table(per)
    print(table)
    print(f"\n{time.time() - t0:.0f} s, load {os.getloadavg()[0]:.2f}; frames made to clip "
          f"more than their input: before {clipped['before (blur first, no roll-off)']}, "
          f"ours {clipped['ours (default)']}")
    b, o = clipped["before (blur first, no roll-off)"], clipped["ours (default)"]
    print(f"ratio (frames clipped, before / ours): {b / max(o, 1):.1f}x"
          f"{' (ours: 0)' if o == 0 else ''}")


if __name__ == "__main__":
    main()
