"""What a chart shows, as JSON for static/js/charts.js, which draws it with Chart.js.

The server decides the data and what it means (a share, a count, a target);
scales, tick labels, hover values and layout are the library's. Pages embed a
spec with `json_script` and point a `<canvas data-chart="ID">` at it
(templates/_chart.html), so no inline script is needed under the CSP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict


class CategorySeries(TypedDict):
    label: str
    values: list[float | None]


class StepSeries(TypedDict):
    label: str
    points: list[tuple[int, float]]


def category_chart(
    *,
    kind: Literal["line", "bar"],
    labels: Sequence[str],
    series: Sequence[CategorySeries],
    percent: bool = False,
    integer: bool = False,
    target: float | None = None,
    target_label: str = "",
    value_title: str = "",
) -> dict[str, object]:
    """Values per category (a day, a labeler).

    `percent` values are shares in [0, 1], shown as percentages; `integer`
    values are counts, so the value axis gets no fractional ticks.
    """
    return {
        "kind": kind,
        "labels": list(labels),
        "series": list(series),
        "percent": percent,
        "integer": integer,
        "zero": True,
        "target": target,
        "target_label": target_label,
        "value_title": value_title,
        "legend": len(series) > 1,
        "empty": not labels,
    }


def step_chart(*, series: Sequence[StepSeries], step_title: str, value_title: str = "") -> dict[str, object]:
    """Metrics against the training step; the value axis follows the data, below zero included."""
    return {
        "kind": "steps",
        "series": [
            {"label": item["label"], "points": [list(point) for point in item["points"]]} for item in series
        ],
        "step_title": step_title,
        "value_title": value_title,
        "zero": False,
        "legend": len(series) > 1,
        "empty": not any(item["points"] for item in series),
    }


def interval_chart(
    *, rows: Sequence[dict[str, object]], value_label: str, interval_label: str
) -> dict[str, object]:
    """An estimate with its interval per row: `rows` of label, value, low, high."""
    return {
        "kind": "interval",
        "rows": [
            {"label": str(row["label"]), "value": row["value"], "low": row["low"], "high": row["high"]}
            for row in rows
        ],
        "value_label": value_label,
        "interval_label": interval_label,
        "zero": False,
        "legend": False,
        "empty": not rows,
    }
