// The blind A/B page: claim a pair, vote (keyboard first), submit, repeat.
//
// The server renders each pair as an HTML fragment that names no policy; the
// sides were chosen per assignment on the server. This script sends the vote
// as a K=2 ranking: left better, right better, a tie, or "both bad".
(function () {
  "use strict";

  const app = document.getElementById("ab-app");
  if (!app) return;
  const { post, newToken, typingInField } = window.Rankwise;
  const timer = window.Rankwise.activeTimer();
  const slot = document.getElementById("task");
  const helpDialog = document.getElementById("help-dialog");
  const _ = window.gettext || ((text) => text);
  let state = null;

  async function loadNext() {
    slot.setAttribute("aria-busy", "true");
    let response;
    try {
      response = await post(app.dataset.nextUrl, null, false);
    } catch (error) {
      slot.textContent = _("The server cannot be reached. Check your connection and reload the page.");
      return;
    }
    slot.innerHTML = await response.text();
    slot.setAttribute("aria-busy", "false");
    start(slot.querySelector("#current-task"));
  }

  function start(section) {
    state = null;
    if (!section) return;
    state = { section: section, verdict: null, token: newToken(), busy: false };
    timer.reset();
    section.querySelectorAll("button.verdict").forEach((button) =>
      button.addEventListener("click", () => choose(button.dataset.verdict))
    );
    section.querySelector("[data-action=submit]").addEventListener("click", submit);
    section.querySelector("[data-action=skip]").addEventListener("click", skip);
  }

  function choose(verdict) {
    state.verdict = verdict;
    state.section.querySelectorAll("button.verdict").forEach((button) =>
      button.setAttribute("aria-pressed", String(button.dataset.verdict === verdict))
    );
  }

  function showError(message) {
    state.section.querySelector("#task-errors").textContent = message;
  }

  async function submit() {
    if (!state || state.busy) return;
    if (!state.verdict) {
      showError(_("Choose left, right, tie or both bad first."));
      return;
    }
    const left = state.section.dataset.left;
    const right = state.section.dataset.right;
    const decisive = state.verdict === "left" || state.verdict === "right";
    const ranks = {
      left: { [left]: 1, [right]: 2 },
      right: { [left]: 2, [right]: 1 },
      tie: { [left]: 1, [right]: 1 },
      both_bad: {},
    }[state.verdict];
    const answer = {
      ranks: ranks,
      none_acceptable: state.verdict === "both_bad",
      strength: decisive ? (state.section.querySelector("#clearly").checked ? 2 : 1) : null,
      rationale: state.section.querySelector("#rationale").value,
      active_seconds: timer.seconds(),
      client_token: state.token,
    };
    state.busy = true;
    let response;
    try {
      response = await post(state.section.dataset.judgmentUrl, answer, true);
    } catch (error) {
      state.busy = false;
      showError(_("The answer could not be sent: the server cannot be reached. Your ranking is still here; try again."));
      return;
    }
    state.busy = false;
    if (response.ok) {
      loadNext();
    } else if (response.status === 409) {
      const body = await response.json();
      showError((body.detail || _("This answer was not saved")) + " " + _("Go to the next task"));
      state.section.querySelector("[data-action=submit]").addEventListener("click", loadNext, { once: true });
    } else {
      const body = await response.json().catch(() => ({}));
      // Problem details (RFC 9457): errors maps a field to its messages.
      showError(Object.values(body.errors || {}).flat().join(" ") || body.detail || String(response.status));
    }
  }

  async function skip() {
    if (!state) return;
    await post(state.section.dataset.skipUrl, { reason: "" }, true);
    loadNext();
  }

  document.addEventListener("keydown", (event) => {
    if (helpDialog.open) return;
    // Enter submits; inside the rationale box it needs Ctrl (or Cmd) so new lines stay possible.
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey || !typingInField(event.target))) {
      event.preventDefault();
      submit();
      return;
    }
    if (typingInField(event.target) || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "?") {
      event.preventDefault();
      helpDialog.showModal();
      return;
    }
    if (!state) return;
    const verdicts = { "1": "left", ArrowLeft: "left", "2": "right", ArrowRight: "right", t: "tie", T: "tie", b: "both_bad", B: "both_bad" };
    if (verdicts[event.key]) {
      event.preventDefault();
      choose(verdicts[event.key]);
    } else if (event.key === "c" || event.key === "C") {
      const box = state.section.querySelector("#clearly");
      box.checked = !box.checked;
    } else if (event.key === "s" || event.key === "S") {
      event.preventDefault();
      skip();
    }
  });

  app.querySelector("[data-action=help]").addEventListener("click", () => helpDialog.showModal());
  loadNext();
})();
