"""Quality measures: analytic statistics and pyiqa metrics behind one registry."""

from varlide.iqa import analytic, piqe, pyiqa_metrics  # noqa: F401  (register the measures)
from varlide.iqa.base import METRICS, Metric, MetricInfo, create_metric, metric_info

__all__ = ["METRICS", "Metric", "MetricInfo", "create_metric", "metric_info"]
