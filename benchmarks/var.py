"""VARSR inference cost: seconds per 512x512 image, KV cache (ours) against no cache (baseline).

    PYTHONPATH=. python benchmarks/var.py                          # CUDA: full size, b 1,4,8
    PYTHONPATH=. python benchmarks/var.py --batches 8 --dtypes bf16 --no-uncached
    PYTHONPATH=. python benchmarks/var.py --batches 1,2 --repeats 1   # CPU: tiny config
    PYTHONPATH=. python benchmarks/var.py --train --batches 2 --dtypes bf16  # fine-tuning step

What runs: ``varlide.models.var.varsr.restore`` (the authors' test settings: CFG 6 on a
doubled batch, greedy top-k 1 / top-p 0.75, the diffusion refiner with ``--steps`` steps,
VQ-VAE decode, AdaIN colour fix) on random LR images, with models of RANDOM weights built
directly on the device (not on meta: SA-RoPE's table is a plain attribute a meta build
leaves empty). Random weights cost what real ones do. On CUDA the default is the full size
(``VARSRModel()`` + ``MultiScaleVQVAE()``, 512x512 images, fp16 and bf16 autocast); on CPU a
tiny one (depth 2, width 64, heads 2, patch_nums (1, 2, 4), 16x16 images, fp32) unless
``--full`` (~4.4 GB of fp32 weights).

- ours (cached): ``restore`` as shipped: ``prefill`` once, then one ``step`` per scale, each
  scale's tokens attending to the kept keys / values of everything before.
- baseline (uncached): the same ``restore`` (same sampling, refiner, decode, colour fix)
  with the transformer behind ``_Uncached``: at every scale si it recomputes the whole
  sequence so far from scratch -- the conv embedding of the LR prefix, prefix + class token
  + the input maps of scales 1..si -- through every block with the block-causal mask (the
  top-left corner of ``attn_bias_for_masking``), nothing kept between scales, and takes
  scale si's rows. At the last scale this is ``forward_teacher_forcing`` exactly; earlier
  scales skip the not-yet-known later tokens (which the mask hides anyway), so the baseline
  is the cheapest uncached path, not a strawman.

Check first (exit status 1 on MISMATCH): fp32, one batch (the smallest), the cached greedy
indices of ``restore``; then the uncached forward fed the same per-scale input maps must
pick the same CFG-guided argmax at every scale. A flip where the two best guided logits lie
within 1e-3 of the logit range (a near tie, kernels' rounding) is counted, not failed.

Per configuration (batch x dtype): one warm-up call, then ``--repeats`` timed calls (CUDA
events / wall clock), the median seconds per call divided by the batch; the refiner
(``DiffusionRefiner.sample``) and decode (``MultiScaleVQVAE.fhat_to_img01``) shares of the
cached call; peak GPU memory = ``torch.cuda.max_memory_allocated`` (weights included),
reset before each configuration's cached and uncached runs. The ratio printed last is
uncached / cached seconds per image at the largest batch. Goal: at most 0.5 s per 512x512
image at batch 8 on an H100-class GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
GOAL_S = 0.5  # s per 512x512 image, batch 8, H100-class GPU
TIE = 1e-3  # near tie: best two guided logits within TIE x the logit range
TINY_PATCH_NUMS = (1, 2, 4)


class _Uncached:
    """The transformer without a KV cache behind ``prefill`` / ``step`` (the baseline): each
    call recomputes prefix + class token + scales 1..si from scratch with the block-causal
    mask and returns scale si's rows. Everything else is the wrapped model's."""

    def __init__(self, model) -> None:
        self._m, self._lr, self._labels, self._inputs = model, None, None, []

    def __getattr__(self, name: str):
        return getattr(self._m, name)

    def prefill(self, lr_image: torch.Tensor, label: torch.Tensor):
        self._lr, self._labels, self._inputs = lr_image, label, []
        return self._forward()

    def step(self, scale_index: int, tokens_in: torch.Tensor):
        if scale_index != len(self._inputs) + 1:
            raise ValueError(f"expected scale {len(self._inputs) + 1}, got {scale_index}")
        self._inputs.append(tokens_in)
        return self._forward()

    def reset_cache(self) -> None:
        self._lr, self._labels, self._inputs = None, None, []
        self._m.reset_cache()

    def _forward(self):
        from varlide.models.var.transformer import ScaleOutput

        m = self._m
        x, cond = m._start_tokens(m.embed_prefix(self._lr), self._labels)
        parts, rots = [x], [m.rope.segment(0, None, device=x.device)]
        for si, inp in enumerate(self._inputs, start=1):
            parts.append(m.word_embed(inp) + m.lvl_embed.weight[si])
            rots.append(m.rope.segment(si, inp, device=x.device))
        x = torch.cat(parts, dim=1)
        if any(r.dim() == 3 for r in rots):  # a batched rotation (SF-RoPE)
            rots = [r if r.dim() == 3 else r.expand(x.shape[0], -1, -1) for r in rots]
        rot, n = torch.cat(rots, dim=-2), x.shape[1]
        mask = m.attn_bias_for_masking[:, :, :n, :n]
        for block in m.blocks:
            x = block(x, cond, rot, mask)
        pn = m.patch_nums[len(self._inputs)]
        hidden = x[:, -pn * pn:]
        return ScaleOutput(m.logits(hidden, cond), hidden)


class _Probe:
    """Times calls of wrapped methods (CUDA events on a GPU, wall clock on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.marks = device, {}

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def wrap(self, obj, attr: str, key: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = self._mark()
            out = original(*args, **kwargs)
            self.marks.setdefault(key, []).append((start, self._mark()))
            return out

        setattr(obj, attr, timed)  # an instance attribute: shadows the method

    def seconds(self, key: str) -> float:
        """Total seconds of ``key``'s calls since the last ``clear`` (sync first)."""
        if self.device.type == "cuda":
            return sum(a.elapsed_time(b) / 1000 for a, b in self.marks.get(key, []))
        return sum(b - a for a, b in self.marks.get(key, []))

    def clear(self) -> None:
        self.marks = {}


def _build(full: bool, steps: int, device: torch.device):
    """(model, vae) of random weights built on ``device``, eval mode."""
    from varlide.models.var.varsr import VARSRModel
    from varlide.models.var.vqvae import MultiScaleVQVAE

    torch.manual_seed(0)
    with torch.device(device):
        if full:
            model, vae = VARSRModel(refiner_steps=str(steps)), MultiScaleVQVAE()
        else:
            model = VARSRModel(depth=2, width=64, heads=2, vocab_size=64, cvae=8,
                               patch_nums=TINY_PATCH_NUMS, prefix_side=4,
                               cond_channels=(8, 16, 32), refiner_width=16, refiner_depth=2,
                               refiner_steps=str(steps))
            vae = MultiScaleVQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2),
                                  patch_nums=TINY_PATCH_NUMS)
        with torch.no_grad():  # the authors' inits zero the refiner's output / AdaLN layers
            for p in model.diffloss.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval(), vae.eval()


@torch.no_grad()
def _check(model, vae, batch: int, device: torch.device) -> bool:
    """Cached greedy indices vs the uncached forward's argmax on the same inputs (fp32)."""
    from varlide.models.var.varsr import restore

    gen = torch.Generator(device=device).manual_seed(1)
    side, cfg, sn = vae.image_size, 6.0, len(model.patch_nums)
    lr = torch.rand(batch, 3, side, side, device=device, generator=gen)
    _, cached = restore(model, vae, lr, cfg=cfg, seed=0, refine=False, return_indices=True,
                        colour_fix=False, amp_dtype=None)
    view, quant = _Uncached(model), vae.quantize
    labels = torch.tensor([0] * batch + [model.num_classes - 1] * batch, device=device)
    f_hat = torch.zeros(batch, model.cvae, model.patch_nums[-1], model.patch_nums[-1],
                        device=device)
    flips = ties = 0
    try:
        out = view.prefill(lr * 2 - 1, labels)
        for si in range(sn):
            if si > 0:
                x = quant.next_scale_input(f_hat, si - 1).float()
                out = view.step(si, torch.cat((x, x)))
            t = cfg * si / (sn - 1)
            guided = (1 + t) * out.logits[:batch] - t * out.logits[batch:]
            ours = guided.argmax(dim=-1)
            differ = ours != cached[si]
            if differ.any():
                gap = (guided.gather(-1, ours[..., None])
                       - guided.gather(-1, cached[si][..., None]))[..., 0][differ]
                span = float(guided.amax() - guided.amin())
                flips += int(differ.sum())
                ties += int((gap <= TIE * span).sum())
            f_hat = f_hat + quant.scale_contribution(cached[si], si).float()
    finally:
        view.reset_cache()
    tokens = sum(int(i.numel()) for i in cached)
    ok = flips == ties
    print(f"check (fp32, batch {batch}, {tokens} tokens over {sn} scales): cached vs uncached "
          f"greedy indices: {'OK' if ok else 'MISMATCH'} ({flips} differ, {ties} near ties)",
          flush=True)
    return ok


def _time_config(fn, device: torch.device, repeats: int, probe: _Probe):
    """Median seconds per call over ``repeats`` after a warm-up; median refiner / decode
    shares; peak GPU memory in MiB (None on CPU)."""
    from benchmarks._common import sync

    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals, ref, dec = [], [], []
    for _ in range(repeats):
        probe.clear()
        start = probe._mark()
        fn()
        end = probe._mark()
        sync(device)
        total = start.elapsed_time(end) / 1000 if device.type == "cuda" else end - start
        totals.append(total)
        ref.append(probe.seconds("refiner") / total)
        dec.append(probe.seconds("decode") / total)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(totals), statistics.median(ref), statistics.median(dec), peak


def _measure(model, vae, batch: int, dtype_name: str, args, probe: _Probe) -> dict:
    from varlide.models.var.varsr import restore

    device, side = args.device, vae.image_size
    lr = torch.rand(batch, 3, side, side, device=device,
                    generator=torch.Generator(device=device).manual_seed(batch))
    amp = DTYPES[dtype_name]
    with torch.inference_mode():
        t, ref, dec, peak = _time_config(
            lambda: restore(model, vae, lr, seed=0, amp_dtype=amp), device, args.repeats, probe)
        row = {"cached": t / batch, "refiner": ref, "decode": dec, "peak": peak,
               "uncached": None, "peak_u": None}
        if not args.no_uncached:
            view = _Uncached(model)
            t_u, _, _, peak_u = _time_config(
                lambda: restore(view, vae, lr, seed=0, amp_dtype=amp), device, args.repeats,
                probe)
            row.update(uncached=t_u / batch, peak_u=peak_u)
    return row


def _train_cost(model, vae, batch: int, dtype_name: str, args, probe: _Probe) -> dict:
    """Seconds per image of one fine-tuning step through the frozen backbone
    (``restore_straight_through`` forward + backward to the LR image, as VICM receives it)
    against greedy inference without the refiner, the same forward value."""
    from varlide.models.var.varsr import _amp, restore, restore_straight_through

    device, side = args.device, vae.image_size
    lr = torch.rand(batch, 3, side, side, device=device,
                    generator=torch.Generator(device=device).manual_seed(batch))
    amp = DTYPES[dtype_name]
    for p in [*model.parameters(), *vae.parameters()]:
        p.requires_grad_(False)  # frozen, as in varlide-var: gradients only reach the input

    def step():
        x = lr.clone().requires_grad_(True)
        with _amp(device, amp):
            y = restore_straight_through(model, vae, x)
        y.float().mean().backward()

    with torch.inference_mode():
        t_inf, _, _, _ = _time_config(
            lambda: restore(model, vae, lr, top_k=1, refine=False, amp_dtype=amp), device,
            args.repeats, probe)
    t_step, _, _, peak = _time_config(step, device, args.repeats, probe)
    return {"infer": t_inf / batch, "step": t_step / batch, "peak": peak}


def _report_train(rows: list, label: str) -> None:
    print("\n| config | batch | dtype | greedy inference s/img | fine-tuning step s/img | "
          "peak GPU MiB (step) |")
    print("|---|---|---|---|---|---|")
    for b, d, r in rows:
        print(f"| {label} | {b} | {d} | {r['infer']:.4f} | {r['step']:.4f} | "
              f"{_fmt(r['peak'], '.0f')} |")
    b, d, r = rows[-1]
    print(f"\nratio (fine-tuning step / greedy inference s per image): {r['step'] / r['infer']:.2f}"
          f" (batch {b}, {d})")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default=None,
                   help="autocast dtypes among fp16,bf16,fp32 (CUDA: fp16,bf16; CPU: fp32)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="released sizes (CUDA default)")
    size.add_argument("--tiny", action="store_true", help="tiny sizes (CPU default)")
    p.add_argument("--no-uncached", action="store_true", help="skip the slow baseline")
    p.add_argument("--steps", type=int, default=10, help="refiner sampling steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--train", action="store_true", help="instead: the cost of a fine-tuning "
                   "step through the frozen backbone (varlide train --enhancer varlide-var)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.batches = [int(b) for b in args.batches.split(",")]
    cuda = args.device.type == "cuda"
    args.dtypes = (args.dtypes or ("fp16,bf16" if cuda else "fp32")).split(",")
    if unknown := [d for d in args.dtypes if d not in DTYPES]:
        p.error(f"unknown dtypes {unknown}; choose among {list(DTYPES)}")
    args.full = args.full or (cuda and not args.tiny)
    return args


def _report(rows: list, args, label: str) -> None:
    largest = max(args.batches)
    print("\n| config | batch | dtype | cached s/img | uncached s/img | refiner share | "
          "decode share | peak GPU MiB (cached / uncached) |")
    print("|---|---|---|---|---|---|---|---|")
    for b, d, r in rows:
        peak = "-" if r["peak"] is None else f"{r['peak']:.0f} / {_fmt(r['peak_u'], '.0f')}"
        print(f"| {label} | {b} | {d} | {r['cached']:.4f} | {_fmt(r['uncached'], '.4f')} | "
              f"{r['refiner']:.1%} | {r['decode']:.1%} | {peak} |")
    at = [(d, r) for b, d, r in rows if b == largest]
    ratios = {d: r["uncached"] / r["cached"] for d, r in at if r["uncached"] is not None}
    best = min(r["cached"] for _, r in at)
    scope = "" if args.full else " (tiny config: not comparable)"
    print(f"\ngoal: at most {GOAL_S} s per 512x512 image at batch 8 on an H100-class GPU; "
          f"here {best:.4f} s/img at batch {largest} on {args.where}{scope}")
    if not ratios:
        print(f"ratio (uncached / cached s per image, batch 8 or the largest): n/a "
              f"(--no-uncached); batch {largest}")
        return
    main = ratios.get("bf16", next(iter(ratios.values())))
    per = ", ".join(f"{d} {v:.2f}" for d, v in ratios.items())
    print(f"ratio (uncached / cached s per image, batch 8 or the largest): {main:.2f} "
          f"(batch {largest}; {per})")


def main(argv=None) -> None:
    from benchmarks._common import cores, cpu_model, load_average, say

    args = _args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.type == "cuda"
    args.where = torch.cuda.get_device_name(args.device) if cuda else \
        f"{cpu_model()} ({cores()} cores, {args.threads} threads)"
    say(f"device: {args.where}; torch {torch.__version__}; load {load_average()}")
    model, vae = _build(args.full, args.steps, args.device)
    n_var = sum(p.numel() for p in model.parameters()) / 1e6
    n_vae = sum(p.numel() for p in vae.parameters()) / 1e6
    side = vae.image_size
    label = f"{'full' if args.full else 'tiny'} {side}x{side}"
    say(f"config: {label}, depth {model.depth}, width {model.width}, patch_nums "
        f"{model.patch_nums}, {n_var:.1f} M transformer+refiner + {n_vae:.1f} M VQ-VAE "
        f"parameters (random), refiner {args.steps} steps")
    if not _check(model, vae, min(args.batches), args.device):
        sys.exit(1)
    probe = _Probe(args.device)
    probe.wrap(model.diffloss, "sample", "refiner")
    probe.wrap(vae, "fhat_to_img01", "decode")
    if args.train:
        rows = [(b, d, _train_cost(model, vae, b, d, args, probe)) for d in args.dtypes
                for b in args.batches]
        _report_train(rows, label)
        return
    rows = []
    for d in args.dtypes:
        for b in args.batches:
            r = _measure(model, vae, b, d, args, probe)
            say(f"  {label} batch {b} {d}: cached {r['cached']:.4f} s/img, uncached "
                f"{_fmt(r['uncached'], '.4f')} s/img")
            rows.append((b, d, r))
    _report(rows, args, label)


if __name__ == "__main__":
    main()
