"""Scheduled retraining, library side: the data it takes, the measures, the promotion gate.

- :func:`newest_scored_images`: the newest N ``status == 'ok'`` rows of a dataset in an
  output store (every run's Parquet under ``<out>/scores/<dataset>/``), by ``processed_at``,
  one per ``source_uri``; :func:`stage_corpus` copies them into a training folder.
- :func:`heldout_sets`: the held-out images of that folder (the trainer's own split,
  ``varlide.holdout.split_corpus``) as two weight-free evaluation sets: ``synthetic``
  (psnr of the demo degradation of each held-out image, well-exposed ones as references
  when there are any) and ``real`` (piqe, brightness and ``in_band``, the exposure band).
- :func:`score_pair`: champion and candidate measured on the same images with the same
  measures; scores are ``{"<set>/<measure>": mean}``.
- :func:`decide`: promote only when the ``primary`` measure improves by more than
  ``margin`` (in its own direction: psnr up, piqe down) and no guard measure regresses by
  more than its tolerance.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

@dataclass
class GateConfig:
    """When a candidate replaces the champion. Keys are ``<set>/<measure>``."""

    primary: str = "synthetic/psnr"
    margin: float = 0.1  # required improvement of ``primary`` (its units: dB for psnr)
    guards: dict[str, float] = field(default_factory=lambda: {
        "real/piqe": 2.0, "real/in_band": 0.1})  # largest regression tolerated

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"gate.margin: expected >= 0, got {self.margin}")
        for key in [self.primary, *self.guards]:
            if "/" not in key:
                raise ValueError(f"gate: measure keys are '<set>/<measure>', got {key!r}")


@dataclass
class EvalConfig:
    """The held-out evaluation (weight-free measures by default)."""

    paired_metrics: tuple[str, ...] = ("psnr", "brightness")
    unpaired_metrics: tuple[str, ...] = ("brightness", "piqe")
    max_side: int = 256
    paired_limit: int = 24
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.paired_metrics = tuple(self.paired_metrics)
        self.unpaired_metrics = tuple(self.unpaired_metrics)
        self.seeds = tuple(self.seeds)


@dataclass
class Decision:
    promote: bool
    reason: str
    primary: str
    margin: float
    improvement: dict[str, float]  # per measure, > 0 = candidate better
    champion: dict[str, float]
    candidate: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lower_better(measure: str) -> bool:
    """A gate measure's direction, from the measure's own metadata (one place decides)."""
    name = measure.rsplit("/", 1)[-1]
    from varlide.evaluation import measure_info

    info = measure_info(name)
    if info is None or info.lower_better is None:
        raise ValueError(f"gate: measure {name!r} has no direction (better up or down?)")
    return bool(info.lower_better)


def improvement(measure: str, candidate: float, champion: float) -> float:
    """How much better the candidate is (positive = better), in the measure's units."""
    d = candidate - champion
    return -d if lower_better(measure) else d


def decide(champion: dict[str, float], candidate: dict[str, float],
           gate: GateConfig | None = None) -> Decision:
    """The promotion decision (see the module docstring)."""
    gate = gate or GateConfig()
    imp: dict[str, float] = {}
    for key in [gate.primary, *gate.guards]:
        a, b = candidate.get(key), champion.get(key)
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        imp[key] = improvement(key, a, b)

    def result(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, gate.primary, gate.margin, imp, dict(champion),
                        dict(candidate))

    if gate.primary not in imp:
        return result(False, f"{gate.primary} missing from the scores: keep the champion")
    gain = imp[gate.primary]
    if gain <= gate.margin:
        return result(False, f"{gate.primary} improved by {gain:+.4g}, not more than the "
                             f"margin {gate.margin:g}: keep the champion")
    for key, tol in gate.guards.items():
        if key in imp and imp[key] < -tol:
            return result(False, f"{gate.primary} improved by {gain:+.4g} but {key} regressed "
                                 f"by {-imp[key]:.4g} (> {tol:g}): keep the champion")
    return result(True, f"{gate.primary} improved by {gain:+.4g} > margin {gate.margin:g}, "
                        "no guard regressed: promote")


# --------------------------------------------------------------------------- data


def newest_scored_images(output_uri: str, dataset: str, n: int) -> list[dict[str, Any]]:
    """The newest ``n`` ok rows of ``dataset`` (all runs), one per source_uri, newest first:
    dicts with ``source_uri``, ``rel_path``, ``processed_at``, ``run_id``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from varlide.storage.uri import filesystem, join

    fs, base = filesystem(join(output_uri, "scores", dataset))
    files = sorted(fs.glob(f"{base.rstrip('/')}/**/*.parquet"))
    if not files:
        raise FileNotFoundError(f"no score files for dataset {dataset!r} under "
                                f"{join(output_uri, 'scores', dataset)}")
    cols = ["source_uri", "rel_path", "status", "processed_at", "run_id"]
    tables = [pq.read_table(f, columns=cols, filesystem=fs) for f in files]
    df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    df = df[df["status"] == "ok"].dropna(subset=["source_uri", "processed_at"])
    df = df.sort_values("processed_at", ascending=False, kind="stable")
    df = df.drop_duplicates("source_uri", keep="first").head(int(n))
    return [{"source_uri": r.source_uri, "rel_path": r.rel_path,
             "processed_at": r.processed_at.isoformat(), "run_id": r.run_id}
            for r in df.itertuples(index=False)]


def stage_corpus(images: list[dict[str, Any]], dest: str) -> str:
    """Copy the images into ``dest`` by relative path (a clash gets a hash prefix)."""
    from varlide.storage.uri import filesystem, join, safe_relpath, write_bytes

    used: set[str] = set()
    for im in images:
        rel = safe_relpath(im.get("rel_path") or im["source_uri"].rsplit("/", 1)[-1])
        if rel in used:
            h = hashlib.sha256(im["source_uri"].encode()).hexdigest()[:8]
            head, _, tail = rel.rpartition("/")
            rel = f"{head}/{h}-{tail}" if head else f"{h}-{tail}"
        used.add(rel)
        sfs, spath = filesystem(im["source_uri"])
        write_bytes(join(dest, rel), sfs.cat_file(spath))
    return dest


def heldout_sets(corpus_uri: str, held_out: list[str], cfg: EvalConfig | None = None):
    """(synthetic, real) evaluation sets of the held-out images of ``corpus_uri``."""
    from varlide.evaluation import WELL_EXPOSED, paired_from_folder, unpaired_folder

    cfg = cfg or EvalConfig()
    if not held_out:
        raise ValueError(f"no held-out images in {corpus_uri}: take more images (newest N) "
                         "or raise train.val_fraction")
    synth = paired_from_folder(corpus_uri, held_out, brightness=WELL_EXPOSED,
                               seeds=cfg.seeds, max_side=cfg.max_side,
                               limit=cfg.paired_limit, name="synthetic")
    if not synth.items:  # night data: no well-exposed reference; degrade what there is
        synth = paired_from_folder(corpus_uri, held_out, brightness=None, seeds=cfg.seeds,
                                   max_side=cfg.max_side, limit=cfg.paired_limit,
                                   name="synthetic")
    real = unpaired_folder(corpus_uri, "real", held_out, max_side=cfg.max_side)
    return [synth, real]


def summary_scores(summary, enhancer: str) -> dict[str, float]:
    """``{"<set>/<measure>": mean}`` of one enhancer from an ``evaluate`` summary."""
    out: dict[str, float] = {}
    rows = summary[(summary["enhancer"] == enhancer) & (summary["band"] == "all")]
    for _, row in rows.iterrows():
        out[f"{row['set']}/n"] = float(row["n"])
        for col, value in row.items():
            if isinstance(col, str) and col.endswith("_mean") and col != "enhance_ms_mean" \
                    and value == value:
                out[f"{row['set']}/{col[:-5]}"] = float(value)
    return out


def score_pair(champion, candidate, sets, cfg: EvalConfig | None = None
               ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(champion, candidate, input) scores on the same sets with the same measures.
    ``champion`` / ``candidate``: enhancers or weights folders (loaded with their name)."""
    from varlide.evaluation import evaluate

    cfg = cfg or EvalConfig()
    models = {"champion": _load(champion, cfg.device), "candidate": _load(candidate, cfg.device)}
    summary = evaluate(models, sets, device=cfg.device, batch_size=cfg.batch_size,
                       paired_metrics=cfg.paired_metrics, unpaired_metrics=cfg.unpaired_metrics)
    return (summary_scores(summary, "champion"), summary_scores(summary, "candidate"),
            summary_scores(summary, "input"))


def _load(model, device: str):
    """A weights folder -> its enhancer on the full path (routing off): the gate compares the
    models, as ``varlide eval`` does; with routing on, images the router skips would score the
    same for both and dilute the difference."""
    if not isinstance(model, str):
        return model
    import json

    from varlide.evaluation import load_enhancer
    from varlide.storage.uri import filesystem, join

    fs, p = filesystem(join(model, "config.json"))
    name = json.loads(fs.cat_file(p))["enhancer"]
    return load_enhancer(name, weights=model, device=device)


# --------------------------------------------------------------------------- training / records


def finetune_config(champion_dir: str, overrides: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """TrainConfig fields that continue training the champion: its enhancer, architecture
    and trained prior, ``init_from`` its weights; ``overrides`` (steps, crop ...) on top.
    varlide-lite: the backbone slot during training is the one the champion was trained
    with (its training record; empty if none), the final weights name the champion's."""
    import json

    from varlide.models import ENHANCERS
    from varlide.storage.uri import filesystem, join
    from varlide.training import default_loss

    fs, p = filesystem(join(champion_dir, "config.json"))
    meta = json.loads(fs.cat_file(p))
    model = dict(meta.get("model", {}))
    fields: dict[str, Any] = {"enhancer": meta["enhancer"]}
    if ENHANCERS.info(meta["enhancer"]).get("backbone_slot"):  # the curve as it was trained
        trained = meta.get("training", {}).get("config", {}).get("model", {})
        fields["final_backbone"] = model.get("backbone", "identity")
        model["backbone"] = trained.get("backbone", "identity")
    fields.update({
        "model": model,
        "loss": default_loss(meta["enhancer"]),
        "prior": meta.get("trained_prior") or "analytic",
    })
    fields.update(overrides or {})
    fields["init_from"] = champion_dir
    return fields


def record_decision(tracker, summary: dict[str, Any], scores: dict[str, Any]) -> None:
    """Both scores, the improvement per gated measure and the decision, in the MLflow run."""
    metrics: dict[str, float] = {}
    for who in ("champion", "candidate", "input"):
        for key, value in (scores.get(who) or {}).items():
            metrics[f"{who}/{key}"] = value
    gate = summary["gate"]
    for key, value in gate["improvement"].items():
        metrics[f"improvement/{key}"] = value
    metrics["gate/promote"] = 1.0 if summary["decision"] == "promote" else 0.0
    metrics["gate/margin"] = gate["margin"]
    tracker.log_metrics(metrics)
    tracker.set_tags({"varlide.gate.decision": summary["decision"],
                      "varlide.gate.reason": summary["reason"],
                      "varlide.gate.primary": gate["primary"],
                      "varlide.model": summary["model_name"],
                      "varlide.champion_version_before": summary["champion_version_before"],
                      "varlide.candidate_version": summary["candidate_version"],
                      "varlide.champion_version_after": summary["champion_version_after"]})
    tracker.log_dict({**summary, "scores": scores}, "decision.json")


def register_and_gate(candidate_dir: str, model_name: str, champion_version: str,
                      scores: dict[str, Any], gate: GateConfig, tracker, *,
                      alias: str = "champion", source: str = "retrain") -> dict[str, Any]:
    """Register the candidate (always), decide, move ``alias`` only on promote (and only if it
    still points at the champion that was measured), record everything in ``tracker``'s
    MLflow run. Returns the summary (decision, reason, versions, gate details)."""
    from varlide import registry_mlflow as registry

    decision = decide(scores["champion"], scores["candidate"], gate)
    mv = registry.register_weights(
        candidate_dir, model_name, run_id=tracker.mlflow_run_id,
        tags={registry.TAG_SOURCE: source,
              "gate.decision": "promote" if decision.promote else "keep",
              "gate.champion_version": str(champion_version)},
        description=decision.reason)
    moved = False
    if decision.promote:
        now = registry.get_alias(model_name, alias)
        if now is not None and str(now.version) != str(champion_version):
            decision.reason += f" (but {alias} moved to version {now.version} meanwhile: kept)"
        else:
            registry.set_alias(model_name, mv.version, alias)
            moved = True
    summary = {"decision": "promote" if moved else "keep", "reason": decision.reason,
               "champion_version_before": str(champion_version),
               "candidate_version": str(mv.version),
               "champion_version_after": str(mv.version) if moved else str(champion_version),
               "model_name": model_name, "alias": alias, "gate": decision.as_dict()}
    record_decision(tracker, summary, scores)
    return summary
