"""A run's rows, manifest and status, and the thumbnail ranking criterion."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from varlide.analysis.query import AnalysisError, canonical, plain_component, score_files
from varlide.storage.uri import filesystem, join

log = logging.getLogger(__name__)

ROUTES = ("skip", "curve", "full", "deblur")


# ---- a run's rows ---------------------------------------------------------------------------


def run_ids_with_scores(output_uri: str) -> list[str]:
    fs, root = filesystem(join(canonical(output_uri), "scores"))
    fs.invalidate_cache()
    return sorted({p.rstrip("/").split("/")[-2] for p in fs.glob(f"{root}/*/*/*.parquet")})


def resolve_run(output_uri: str, run_id: str | None) -> str:
    """``run_id``, or the output's only run; AnalysisError naming the choices otherwise."""
    if run_id:
        return plain_component(run_id, "run id")
    runs = run_ids_with_scores(output_uri)
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise AnalysisError(f"no runs with scores in {canonical(output_uri)}")
    raise AnalysisError(f"{len(runs)} runs in {canonical(output_uri)}; pick one with --run: "
                        f"{', '.join(runs)}")


@dataclass
class RunData:
    """One run's rows and what its store says about it."""

    output_uri: str
    run_id: str
    dataset: str
    df: Any  # pandas.DataFrame, one row per image
    table: Any = None  # the same rows as read (pyarrow.Table)
    manifest: dict = field(default_factory=dict)
    shards_total: int | None = None
    shards_done: int | None = None
    shards_failed: int | None = None

    @property
    def metrics(self) -> list[str]:
        """Quality measures of the run, in the table's order (``q_<m>_in`` columns)."""
        return [m.group(1) for c in self.df.columns if (m := re.fullmatch(r"q_(.+)_in", c))]

    @property
    def ok(self):
        return self.df[self.df["status"] == "ok"]

    @property
    def enhanced(self) -> bool:
        return "enhanced_uri" in self.df and self.df["enhanced_uri"].notna().any()


def load_run(output_uri: str, run_id: str) -> RunData:
    """Rows, manifest and shard status of a run (AnalysisError when it has no scores)."""
    from varlide.run import read_run_scores
    from varlide.storage.runstore import RunStore, run_status

    output_uri = canonical(output_uri)
    run_id = plain_component(run_id, "run id")
    fs, root = filesystem(join(output_uri, "scores"))
    fs.invalidate_cache()
    dirs = sorted({p.rstrip("/").split("/")[-2] for p in fs.glob(f"{root}/*/{run_id}/*.parquet")})
    if not dirs:
        score_files(output_uri, run_id)  # raises with the runs that do have scores
    manifest: dict = {}
    store = RunStore(output_uri, run_id)
    if store.exists():
        manifest = store.read_manifest()
    dataset = manifest.get("dataset") or dirs[0]
    table = read_run_scores(output_uri, dataset, run_id)
    if table is None:
        raise AnalysisError(f"run {run_id!r} has no score files under scores/{dataset}/")
    data = RunData(output_uri, run_id, dataset, table.to_pandas(), table, manifest)
    if manifest:
        status = run_status(output_uri, run_id)
        data.shards_total, data.shards_done = status.shards_total, len(status.done)
        data.shards_failed = len(status.failed)
    return data


def metric_direction(name: str) -> bool | None:
    """``lower_better`` of a measure (None: no preferred direction, or unknown here)."""
    try:
        from varlide.iqa.base import metric_info

        return metric_info(name).lower_better
    except Exception:  # an unknown or unloadable measure: treat as undirected
        return None


@dataclass
class Criterion:
    column: str  # what the values are
    label: str  # short, for captions
    description: str  # one sentence for the page
    values: Any  # pandas Series over ok rows: higher = better
    signed: bool = True  # a change (shown with its sign) rather than a level
    level: Any = None  # the raw column when ``values`` is a level with its sign flipped

    @property
    def shown(self):
        """The values as captions show them."""
        return self.values if self.level is None else self.level


def rank_criterion(data: RunData, rank_by: str | None = None) -> Criterion | None:
    """How thumbnails are ranked (see the module docstring); None when nothing to rank by."""
    ok = data.ok
    if ok.empty:
        return None

    def has(col: str) -> bool:
        return col in ok and ok[col].notna().any()

    def improvement(m: str) -> Criterion | None:
        if not (has(f"q_{m}_in") and has(f"q_{m}_out")):
            return None
        lower = metric_direction(m)
        delta = ok[f"q_{m}_out"] - ok[f"q_{m}_in"]
        if lower is None:
            return Criterion(f"{m} gain", f"Δ{m}", f"{m} after − before (no preferred "
                             "direction; worst = smallest gain)", delta)
        sign = -1.0 if lower else 1.0
        way = "lower" if lower else "higher"
        return Criterion(f"{m} improvement", f"{m} improvement",
                         f"{m} improvement ({way} is better, so "
                         f"{'before − after' if lower else 'after − before'}; worst = least "
                         "improved)", sign * delta)

    def input_value(m: str) -> Criterion | None:
        if m == "visibility":
            if not has("visibility"):
                return None
            return Criterion("visibility", "v", "visibility v of the input (worst = darkest)",
                             ok["visibility"].astype(float), signed=False)
        if not has(f"q_{m}_in"):
            return None
        lower = metric_direction(m)
        sign = -1.0 if lower else 1.0
        return Criterion(f"{m} (input)", m, f"{m} of the input "
                         f"({'lower' if lower else 'higher'} is better)",
                         sign * ok[f"q_{m}_in"], signed=False, level=ok[f"q_{m}_in"])

    enhanced = data.enhanced
    if rank_by:
        if rank_by != "visibility" and rank_by not in data.metrics:
            raise AnalysisError(f"--rank-by {rank_by!r}: not a measure of this run "
                                f"(choose visibility or one of {', '.join(data.metrics)})")
        crit = (improvement(rank_by) if enhanced and rank_by != "visibility"
                else input_value(rank_by))
        if crit is None:
            raise AnalysisError(f"--rank-by {rank_by!r}: no values in this run")
        return crit
    if enhanced:
        order = ["piqe"] + [m for m in data.metrics if m != "piqe"
                            and metric_direction(m) is not None]
        for m in order + ["brightness"]:
            if m in data.metrics and (crit := improvement(m)) is not None:
                return crit
    return input_value("visibility")


