"""Chart geometry for server-rendered SVG (templates/annotation/_chart_*.html).

No chart library and no script: the view computes bar and line coordinates
here, the template draws them with auto-escaped labels, so the dashboard
works under the strict Content-Security-Policy and without a network.
"""

from __future__ import annotations

from dataclasses import dataclass

WIDTH = 640
HEIGHT = 220
MARGIN_LEFT = 44
MARGIN_BOTTOM = 36
MARGIN_TOP = 12
PLOT_WIDTH = WIDTH - MARGIN_LEFT - 12
PLOT_HEIGHT = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
MAX_BAR_WIDTH = 56


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value_text: str


@dataclass(frozen=True)
class Tick:
    y: float
    text: str


def _ticks(maximum: float, *, scale: float, unit: str) -> list[Tick]:
    return [
        Tick(
            y=MARGIN_TOP + PLOT_HEIGHT * (1 - fraction),
            text=f"{maximum * fraction * scale:.0f}{unit}",
        )
        for fraction in (0.0, 0.5, 1.0)
    ]


def bar_chart(
    *,
    labels: list[str],
    values: list[float],
    unit: str = "",
    scale: float = 1.0,
    maximum: float | None = None,
) -> dict[str, object]:
    top = maximum if maximum is not None else max(values, default=0) or 1
    slot = PLOT_WIDTH / max(len(values), 1)
    width = min(slot * 0.7, MAX_BAR_WIDTH)
    bars = []
    for index, (label, value) in enumerate(zip(labels, values, strict=True)):
        height = PLOT_HEIGHT * (value / top) if top else 0
        bars.append(
            Bar(
                x=MARGIN_LEFT + index * slot + (slot - width) / 2,
                y=MARGIN_TOP + PLOT_HEIGHT - height,
                width=width,
                height=height,
                label=label,
                value_text=f"{value * scale:.0f}{unit}" if scale != 1 else f"{value:g}{unit}",
            )
        )
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "bars": bars,
        "ticks": _ticks(top, scale=scale, unit=unit),
        "axis_y": MARGIN_TOP + PLOT_HEIGHT,
        "axis_x": MARGIN_LEFT,
        "label_y": HEIGHT - 12,
        "empty": not values,
    }


def line_chart(*, labels: list[str], values: list[float], target: float | None = None) -> dict[str, object]:
    top = max([*values, target or 0], default=0) or 1
    step = PLOT_WIDTH / max(len(values) - 1, 1)
    points = [
        (MARGIN_LEFT + index * step, MARGIN_TOP + PLOT_HEIGHT * (1 - value / top))
        for index, value in enumerate(values)
    ]
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "points": " ".join(f"{x:.1f},{y:.1f}" for x, y in points),
        "dots": [
            {"x": x, "y": y, "label": label, "value": value}
            for (x, y), label, value in zip(points, labels, values, strict=True)
        ],
        "target_y": MARGIN_TOP + PLOT_HEIGHT * (1 - target / top) if target else None,
        "target": target,
        "ticks": _ticks(top, scale=1, unit=""),
        "axis_y": MARGIN_TOP + PLOT_HEIGHT,
        "axis_x": MARGIN_LEFT,
        "label_y": HEIGHT - 12,
        "right": WIDTH - 12,
        "empty": not values,
    }


def interval_chart(*, rows: list[dict[str, object]]) -> dict[str, object]:
    """Horizontal rating bars: a dot at the estimate and a whisker over its interval, one row per policy."""
    if not rows:
        return {"empty": True}
    low = min(float(row["low"]) for row in rows)  # type: ignore[arg-type]
    high = max(float(row["high"]) for row in rows)  # type: ignore[arg-type]
    span = (high - low) or 1.0
    left, width, row_height = 150, WIDTH - 150 - 20, 28

    def x(value: object) -> float:
        return left + width * (float(value) - low) / span  # type: ignore[arg-type]

    return {
        "empty": False,
        "width": WIDTH,
        "height": row_height * len(rows) + 30,
        "rows": [
            {
                "label": row["policy"],
                "y": 20 + index * row_height,
                "x": x(row["rating"]),
                "x_low": x(row["low"]),
                "x_high": x(row["high"]),
                "text": f"{float(row['rating']):.0f} [{float(row['low']):.0f}, {float(row['high']):.0f}]",  # type: ignore[arg-type]
            }
            for index, row in enumerate(rows)
        ],
        "label_x": left - 8,
    }
