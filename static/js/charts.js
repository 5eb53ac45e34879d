// Charts drawn by Chart.js (static/vendor/chart.js/, pinned in package-lock.json).
//
// The server says what a chart shows (annotation/chart_data.py) as JSON in a
// json_script element; a <canvas data-chart="ELEMENT-ID"> is drawn from it.
// Scales, tick positions, hover values and layout are the library's; tick
// labels get as many decimals as the spacing between ticks needs (0.65 stays
// "0.65", 1200 reads "1,200"), and value axes take negative values as they come.
// Pages with live data (the run page) redraw through window.rankwiseCharts.
(function () {
  "use strict";
  const Chart = window.Chart;
  if (!Chart) return;

  const locale = document.documentElement.lang || undefined;
  const css = getComputedStyle(document.documentElement);
  const colour = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const ACCENT = colour("--accent", "#3557c4");
  const MUTED = colour("--muted", "#6b6f76");
  const LINE = colour("--line", "#d9dce1");
  const TARGET = "#1f7a4d";
  const SERIES = [ACCENT, TARGET, "#b5542a", MUTED];
  const valueFormat = new Intl.NumberFormat(locale, { maximumFractionDigits: 3 });

  function formatValue(value, percent) {
    if (value === null || value === undefined) return "–";
    return valueFormat.format(value) + (percent ? "%" : "");
  }

  // Decimals that the step between two ticks needs; float noise (0.00999…
  // for 0.01) is rounded off first, which Chart.js's own formatter does not
  // do (it labels such ticks "0.640").
  function decimalsOf(step) {
    const clean = Number(Math.abs(step).toPrecision(12));
    if (!(clean > 0)) return 0;
    for (let decimals = 0; decimals < 20; decimals += 1) {
      const scaled = clean * 10 ** decimals;
      if (Math.abs(scaled - Math.round(scaled)) < 1e-6) return decimals;
    }
    return 20;
  }

  function tickLabel(suffix) {
    return function (value, index, ticks) {
      const step = ticks.length > 1 ? ticks[1].value - ticks[0].value : value;
      const decimals = decimalsOf(step);
      const format = new Intl.NumberFormat(locale, { minimumFractionDigits: decimals, maximumFractionDigits: decimals });
      return format.format(value) + suffix;
    };
  }

  function valueAxis(spec) {
    const axis = {
      grid: { color: LINE },
      // Few enough ticks that none is skipped for room: labels are made
      // before skipping, so a skipped tick's spacing would set the decimals.
      ticks: { color: MUTED, maxTicksLimit: 6, callback: tickLabel(spec.percent ? "%" : "") },
      beginAtZero: Boolean(spec.zero),
      title: spec.value_title ? { display: true, text: spec.value_title, color: MUTED } : { display: false },
    };
    if (spec.integer) axis.ticks.precision = 0;
    if (spec.percent) {
      axis.suggestedMin = 0;
      axis.suggestedMax = 100;
    }
    return axis;
  }

  function scaled(values, percent) {
    return values.map((value) => (value === null || !percent ? value : value * 100));
  }

  function categoryConfig(spec) {
    const datasets = spec.series.map((series) => ({
      type: spec.kind,
      label: series.label,
      data: scaled(series.values, spec.percent),
      backgroundColor: ACCENT,
      borderColor: ACCENT,
      pointRadius: 3,
      maxBarThickness: 56,
    }));
    if (spec.target !== null && spec.target !== undefined) {
      datasets.push({
        type: "line",
        label: spec.target_label,
        data: spec.labels.map(() => (spec.percent ? spec.target * 100 : spec.target)),
        borderColor: TARGET,
        borderDash: [4, 3],
        borderWidth: 1.5,
        pointRadius: 0,
        pointHitRadius: 4,
      });
    }
    return {
      data: { labels: spec.labels, datasets: datasets },
      scales: {
        x: { grid: { display: false }, ticks: { color: MUTED, autoSkip: true, maxRotation: 0 } },
        y: valueAxis(spec),
      },
    };
  }

  // A metric against the training step: both axes are numbers.
  function stepConfig(spec) {
    return {
      data: {
        datasets: spec.series.map((series, index) => ({
          type: "line",
          label: series.label,
          data: series.points.map((point) => ({ x: point[0], y: point[1] })),
          // Several series on one chart (score percentiles, proxy and true score) need telling apart.
          borderColor: SERIES[index % SERIES.length],
          backgroundColor: SERIES[index % SERIES.length],
          pointRadius: series.points.length > 60 ? 0 : 2,
          pointHitRadius: 4,
        })),
      },
      scales: {
        x: {
          type: "linear",
          grid: { color: LINE },
          ticks: { color: MUTED, precision: 0, maxTicksLimit: 8, callback: tickLabel("") },
          title: spec.step_title ? { display: true, text: spec.step_title, color: MUTED } : { display: false },
        },
        y: valueAxis(spec),
      },
    };
  }

  // An estimate with its interval per row (A/B ratings): a floating bar from
  // the low to the high end and a dot at the estimate.
  function intervalConfig(spec) {
    const rows = spec.rows;
    return {
      indexAxis: "y",
      data: {
        labels: rows.map((row) => row.label),
        datasets: [
          {
            type: "bar",
            label: spec.interval_label,
            data: rows.map((row) => [row.low, row.high]),
            backgroundColor: ACCENT + "55",
            borderColor: ACCENT,
            borderWidth: 1,
            maxBarThickness: 12,
          },
          {
            type: "line",
            label: spec.value_label,
            data: rows.map((row) => row.value),
            showLine: false,
            pointRadius: 5,
            backgroundColor: ACCENT,
            borderColor: ACCENT,
          },
        ],
      },
      scales: {
        x: valueAxis(spec),
        y: { grid: { display: false }, ticks: { color: MUTED } },
      },
    };
  }

  const BUILDERS = { line: categoryConfig, bar: categoryConfig, steps: stepConfig, interval: intervalConfig };

  function config(spec) {
    const built = BUILDERS[spec.kind](spec);
    const horizontal = built.indexAxis === "y";
    return {
      type: spec.kind === "bar" ? "bar" : "line",
      data: built.data,
      options: {
        locale: locale,
        indexAxis: built.indexAxis || "x",
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "nearest", intersect: false, axis: horizontal ? "y" : "x" },
        scales: built.scales,
        plugins: {
          legend: { display: spec.legend === true, labels: { color: MUTED } },
          tooltip: {
            callbacks: {
              label: function (context) {
                const raw = context.raw;
                const name = context.dataset.label ? context.dataset.label + ": " : "";
                if (Array.isArray(raw)) {
                  return name + formatValue(raw[0], spec.percent) + " – " + formatValue(raw[1], spec.percent);
                }
                const value = horizontal ? context.parsed.x : context.parsed.y;
                return name + formatValue(value, spec.percent);
              },
            },
          },
        },
      },
    };
  }

  // Draws the chart, or redraws it in place when the canvas has one already.
  function draw(canvas, spec) {
    const existing = Chart.getChart(canvas);
    const next = config(spec);
    if (existing) {
      existing.data = next.data;
      existing.options = next.options;
      existing.update();
      return existing;
    }
    return new Chart(canvas, next);
  }

  function specOf(canvas) {
    const source = document.getElementById(canvas.dataset.chart);
    return source ? JSON.parse(source.textContent) : null;
  }

  function drawAll(root) {
    (root || document).querySelectorAll("canvas[data-chart]").forEach((canvas) => {
      const spec = specOf(canvas);
      if (spec) draw(canvas, spec);
    });
  }

  window.rankwiseCharts = { draw: draw, drawAll: drawAll };
  drawAll(document);
})();
