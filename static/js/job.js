// A job's page (dataset build, training run, generation or scoring job): while the
// job is queued or running, poll its status URL (every kind answers the same
// shape, training.selectors.job_status_payload) and move the progress bar, the
// status, the step count, the ETA and the log; on a run's page, redraw its curves
// with the points logged since (static/js/charts.js). Reload once the job has
// ended, so the page shows its outcome.
//
// The page marks the parts it has: [data-job-status-url] (with
// data-job-terminal), and inside or beside it <progress>, [data-job-status],
// [data-job-progress-label], [data-job-steps], [data-job-eta], [data-job-log],
// [data-job-curves-url] holding [data-job-curves].
(function () {
  "use strict";
  const panel = document.querySelector("[data-job-status-url]");
  if (!panel || panel.dataset.jobTerminal === "true") return;
  const bar = panel.querySelector("progress");
  const statusLabel = panel.querySelector("[data-job-status]");
  const progressLabel = panel.querySelector("[data-job-progress-label]");
  const steps = panel.querySelector("[data-job-steps]");
  const eta = panel.querySelector("[data-job-eta]");
  const log = document.querySelector("[data-job-log]");
  const curvesSection = document.querySelector("[data-job-curves-url]");
  const INTERVAL_MS = 2000;
  const MAX_INTERVAL_MS = 30000;
  let interval = INTERVAL_MS;

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
    const response = await fetch(curvesSection.dataset.jobCurvesUrl, { credentials: "same-origin" });
    if (!response.ok) throw new Error(String(response.status));
    const body = await response.json();
    const grid = curvesSection.querySelector("[data-job-curves]");
    body.curves.forEach((curve) => window.rankwiseCharts.draw(curveCanvas(grid, curve.name), curve.chart));
    if (body.curves.length) curvesSection.hidden = false;
  }

  function show(state) {
    const percent = Math.round(state.progress * 100);
    if (bar) {
      bar.value = state.progress;
      bar.textContent = percent + "%";
    }
    if (progressLabel) progressLabel.textContent = percent + "%";
    if (statusLabel) {
      statusLabel.textContent = state.status_display;
      statusLabel.className = "status status-" + state.status;
    }
    if (steps && state.total_steps !== null) steps.textContent = state.step + " / " + state.total_steps;
    if (eta) eta.textContent = duration(state.eta_seconds);
    if (log) log.textContent = state.log_tail;
  }

  async function poll() {
    try {
      const response = await fetch(panel.dataset.jobStatusUrl, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (!response.ok) throw new Error(String(response.status));
      const state = await response.json();
      if (state.terminal) {
        window.location.reload();
        return;
      }
      show(state);
      await refreshCurves();
      interval = INTERVAL_MS;
    } catch (error) {
      // The server or the network hiccupped: try again, less often.
      interval = Math.min(interval * 2, MAX_INTERVAL_MS);
    }
    window.setTimeout(poll, interval);
  }

  window.setTimeout(poll, interval);
})();
