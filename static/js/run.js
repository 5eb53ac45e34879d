// Training run page: while the run is queued or running, poll its status and
// move the progress bar, step count, ETA and log, and redraw the curves with
// the points logged since (static/js/charts.js); reload once it has finished
// so the metrics and files show.
(function () {
  "use strict";
  const panel = document.querySelector("[data-run-status-url]");
  if (!panel || panel.dataset.runTerminal === "true") return;
  const _ = window.gettext || ((text) => text);
  const bar = panel.querySelector("progress");
  const statusLabel = panel.querySelector("[data-run-status]");
  const steps = panel.querySelector("[data-run-steps]");
  const eta = panel.querySelector("[data-run-eta]");
  const log = document.querySelector("[data-run-log]");
  const curvesSection = document.querySelector("[data-run-curves-url]");
  let interval = 2000;

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function curveCanvas(grid, name) {
    const existing = Array.from(grid.querySelectorAll("[data-curve]")).find((item) => item.dataset.curve === name);
    if (existing) return existing.querySelector("canvas");
    const item = document.createElement("div");
    item.dataset.curve = name;
    const heading = document.createElement("h3");
    const code = document.createElement("code");
    code.textContent = name;
    heading.appendChild(code);
    const box = document.createElement("div");
    box.className = "chart-box";
    const canvas = document.createElement("canvas");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", name);
    box.appendChild(canvas);
    item.append(heading, box);
    grid.appendChild(item);
    return canvas;
  }

  async function refreshCurves() {
    if (!curvesSection || !window.rankwiseCharts) return;
    const response = await fetch(curvesSection.dataset.runCurvesUrl, { credentials: "same-origin" });
    if (!response.ok) throw new Error(String(response.status));
    const body = await response.json();
    const grid = curvesSection.querySelector("[data-run-curves]");
    body.curves.forEach((curve) => window.rankwiseCharts.draw(curveCanvas(grid, curve.name), curve.chart));
    if (body.curves.length) curvesSection.hidden = false;
  }

  async function poll() {
    try {
      const response = await fetch(panel.dataset.runStatusUrl, { credentials: "same-origin" });
      if (!response.ok) throw new Error(String(response.status));
      const state = await response.json();
      if (state.terminal) {
        window.location.reload();
        return;
      }
      bar.value = state.progress;
      statusLabel.textContent = state.status_display;
      statusLabel.className = "status status-" + state.status;
      steps.textContent = state.step + " / " + state.total_steps;
      eta.textContent = state.eta_seconds === null ? "" : duration(state.eta_seconds);
      if (log) log.textContent = state.log_tail;
      await refreshCurves();
      interval = 2000;
    } catch (error) {
      interval = Math.min(interval * 2, 30000);  // back off while the server is unreachable
    }
    setTimeout(poll, interval);
  }
  setTimeout(poll, interval);
})();
