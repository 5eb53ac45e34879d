// Dataset build page: while the build is queued or running, poll its status
// and move the progress bar; reload once it has finished to show the files.
(function () {
  "use strict";
  const panel = document.querySelector("[data-build-status-url]");
  if (!panel || panel.dataset.buildFinished === "true") return;

  const url = panel.dataset.buildStatusUrl;
  const bar = panel.querySelector("progress");
  const statusLabel = panel.querySelector("[data-build-status-label]");
  const progressLabel = panel.querySelector("[data-build-progress-label]");
  const labelsElement = document.getElementById("build-status-labels");
  const labels = labelsElement ? JSON.parse(labelsElement.textContent) : {};
  const INTERVAL_MS = 1500;
  const MAX_INTERVAL_MS = 30000;
  let interval = INTERVAL_MS;

  function show(state) {
    const percent = Math.round(state.progress * 100);
    if (bar) {
      bar.value = state.progress;
      bar.textContent = percent + "%";
    }
    if (progressLabel) progressLabel.textContent = percent + "%";
    if (statusLabel) {
      statusLabel.textContent = labels[state.status] || state.status;
      statusLabel.className = "status status-" + state.status;
    }
  }

  async function poll() {
    try {
      const response = await fetch(url, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
      });
      if (!response.ok) throw new Error("status " + response.status);
      const state = await response.json();
      show(state);
      if (state.finished) {
        window.location.reload();
        return;
      }
      interval = INTERVAL_MS;
    } catch (error) {
      // The server or the network hiccupped: try again, less often.
      interval = Math.min(interval * 2, MAX_INTERVAL_MS);
    }
    window.setTimeout(poll, interval);
  }

  window.setTimeout(poll, INTERVAL_MS);
})();
