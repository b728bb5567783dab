"""Evaluation of enhancers on paired (full-reference) and real (no-reference) image sets.

One call measures every enhancer on every set and gives one table (issue 3, "Evaluation and
the bar to beat")::

    from varlide.evaluation import evaluate, format_table, paired_synthetic, unpaired_folder
    sets = [paired_synthetic(), unpaired_folder("../shared/data/dev-lowlight")]
    df = evaluate({"input": None, "classic-curve": "classic-curve"}, sets)
    print(format_table(df))

Sets (:class:`EvalSet`; images are loaded lazily, one batch at a time, so memory stays
bounded whatever the folder's size):

- :func:`paired_synthetic`: the demo corpus in memory. For each seed ``s`` and index ``i``
  it draws exactly what ``make_demo_corpus(seed=s, size=size)`` draws for image ``i`` (the
  photograph ``i % 5``, a random crop, then ``degrade``), so with the default 256x256 size
  the set is bit-identical to ``python -m varlide.demo OUT --count 10 --size 256x256
  --seed s`` for each seed (images quantised to 8 bits, as the PNG files are).
- :func:`paired_from_folder`: well-exposed images of a folder (mean luma in
  ``brightness``, default [0.35, 0.60]) as pseudo-references, downscaled to ``max_side``
  and degraded the same way (the rng keyed by the relative path and the seed, so the pair
  of an image does not depend on what else is in the folder).
- :func:`paired_folders`: an input folder and a reference folder with the same relative
  names (the demo corpus's ``lowlight/`` and ``reference/``; ``varlide eval --reference``);
  inputs without a reference are left out up front, none at all is an error.
- :func:`unpaired_folder`: real images without reference, optionally filtered by mean
  luma, reported overall and by brightness band of the input (:data:`BANDS`).
- :meth:`EvalSet.from_arrays`: in-memory arrays (tests, notebooks).

Degradation presets (:data:`DEGRADATIONS`; ``degradation=`` of :func:`paired_synthetic` and
:func:`paired_from_folder`, ``plan_sets(..., degradations=[...])``) isolate each part of
the model, so an ablation can tell what a denoiser, a deblurring stage and a tone curve each
do: ``all`` (the demo corpus, unchanged), ``dark`` (gamma and exposure only), ``blur``
(motion blur only, length drawn from :data:`BLUR_LENGTHS`, 5..21 px), ``noise``
(Poisson-Gaussian noise only) and ``sharp`` (none: input = reference). Every degraded item's
``meta`` holds the applied parameters, known without loading pixels; :func:`true_kernel`
gives its blur kernel (the ground truth of kernel similarity).

Held-out images: the trainer's, by the one rule in :mod:`varlide.holdout` (content hash,
5 %, at most 48), so no image evaluated as held out was trained on.

Measures, per image and per enhancer (``'input'``, enhancer None, is the identity):

- paired sets: ``psnr``, ``ssim`` (pyiqa's weight-free metrics, output vs clean) and
  ``brightness``;
- unpaired sets: ``brightness``, ``overexposed``, ``piqe``, ``entropy``, ``sharpness`` and
  ``in_band``: whether the output's mean luma is in :data:`TARGET_BAND` [0.40, 0.55].

The prior (``analytic`` by default) scores each input once, as the pipeline does, and every
enhancer gets that v and b. ``ssim`` is computed by :class:`SeparableSSIM` by default:
pyiqa's own preprocessing (Y of YIQ, rounded to 0..255) and formula, with its 11x11
Gaussian window applied as two 1-D passes in float64 (the window is separable): equal to
pyiqa to ~3e-7, and 5-10x faster on CPU (pyiqa runs a float64 2-D convolution, which has no
fast CPU kernel: ~0.5-1 s per 256x256 image on the shared 2-core box, against ~0.1 s).
``ssim_impl='pyiqa'`` uses pyiqa's module itself; a test checks that the two agree.

:func:`default_sets` builds the issue's four sets from ``../shared/data`` (synthetic,
``sice-paired``, ``dev-lowlight``, ``sice-moderate``).

:func:`measure` gives the per-image table (for plots), :func:`summarize` the mean/std table,
:func:`evaluate` is ``summarize(measure(...))``, :func:`format_table` gives Markdown
for docs/METHOD.md with each measure's direction (from ``metric_info``).

Learned enhancers are measured with routing off (:data:`FULL_PATH`: never skip, VGPM always,
:func:`load_enhancer` / :func:`full_path`; a registered name given to :func:`measure` is
built that way), so a row measures the model, not the router.

``varlide eval`` (``flows/evaluate.py``) is built from :func:`plan_sets` (INPUT ``synthetic``,
a folder, or a folder with ``--reference``: JSON-able specs with the images chosen once),
:func:`sets_from_plan`, :func:`plan_metrics`, :func:`parse_enhancers` (``NAME[=WEIGHTS]``)
and :func:`summary_metrics` (the summary as flat tracker metrics).
"""


from varlide.evaluation.harness import (
    evaluate,
    full_path,
    load_enhancer,
    measure,
    summarize,
)
from varlide.evaluation.planning import (
    DEFAULT_ENHANCERS,
    DEFAULT_MAX_SIDE,
    SYNTHETIC,
    SYNTHETIC_SIDE,
    EvalRunConfig,
    parse_enhancers,
    plan_metrics,
    plan_sets,
    sets_from_plan,
    summary_metrics,
)
from varlide.evaluation.sets import (
    ALL,
    BANDS,
    BLUR_LENGTHS,
    DEGRADATIONS,
    FULL_PATH,
    INPUT,
    MODERATE,
    PAIRED_METRICS,
    TARGET_BAND,
    UNPAIRED_METRICS,
    WELL_EXPOSED,
    EvalItem,
    EvalSet,
    brightness_band,
    default_sets,
    degradation_overrides,
    paired_folders,
    paired_from_folder,
    paired_synthetic,
    true_kernel,
    unpaired_folder,
)
from varlide.evaluation.ssim import SeparableSSIM
from varlide.evaluation.tables import DIGITS, format_table, measure_info

__all__ = [
    "ALL", "BANDS", "BLUR_LENGTHS", "DEFAULT_ENHANCERS", "DEFAULT_MAX_SIDE", "DEGRADATIONS",
    "DIGITS", "FULL_PATH", "INPUT", "MODERATE", "PAIRED_METRICS", "SYNTHETIC", "SYNTHETIC_SIDE",
    "TARGET_BAND", "UNPAIRED_METRICS", "WELL_EXPOSED", "EvalItem", "EvalRunConfig", "EvalSet",
    "SeparableSSIM", "brightness_band", "default_sets", "degradation_overrides", "evaluate",
    "format_table", "full_path", "load_enhancer", "measure", "measure_info", "paired_folders",
    "paired_from_folder", "paired_synthetic", "parse_enhancers", "plan_metrics", "plan_sets",
    "sets_from_plan", "summarize", "summary_metrics", "true_kernel", "unpaired_folder",
]
