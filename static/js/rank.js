// The ranking page: claim a task, rank its responses (keyboard first), submit, repeat.
//
// The server renders each task as an HTML fragment (model outputs already
// sanitized there); this script only wires controls to state and talks JSON
// to the API. No drag and drop: ranks are set by buttons or digits, so a
// scroll on a touch screen can never reorder anything.
(function () {
  "use strict";

  const app = document.getElementById("rank-app");
  if (!app) return;
  const slot = document.getElementById("task");
  const helpDialog = document.getElementById("help-dialog");
  const skipDialog = document.getElementById("skip-dialog");
  const _ = window.gettext || ((text) => text);
  const interpolate = window.interpolate || ((format, values) => format.replace(/%\(\w+\)s/g, (m) => values[m.slice(2, -2)]));

  let state = null;

  const { post, newToken, typingInField } = window.Rankwise;
  const timer = window.Rankwise.activeTimer();

  // --- loading tasks
  async function loadNext() {
    slot.setAttribute("aria-busy", "true");
    let response;
    try {
      response = await post(app.dataset.nextUrl, null, false);
    } catch (error) {
      showSlotError(_("The server cannot be reached. Check your connection and reload the page."));
      return;
    }
    if (!response.ok) {
      showSlotError(interpolate(_("The next task could not be loaded (error %(status)s). Reload the page to try again."), { status: response.status }, true));
      return;
    }
    slot.innerHTML = await response.text();
    slot.setAttribute("aria-busy", "false");
    start(slot.querySelector("#current-task"));
  }

  function showSlotError(message) {
    slot.setAttribute("aria-busy", "false");
    slot.textContent = "";
    const paragraph = document.createElement("p");
    paragraph.className = "error card";
    paragraph.setAttribute("role", "alert");
    paragraph.textContent = message;
    slot.appendChild(paragraph);
  }

  function start(section) {
    state = null;
    if (!section) return;
    const cards = Array.from(section.querySelectorAll(".response"));
    state = {
      section: section,
      cards: cards,
      k: cards.length,
      tiesAllowed: section.dataset.tiesAllowed === "true",
      likertOn: section.dataset.likert === "true",
      rationaleRequired: section.dataset.rationaleRequired === "true",
      ranks: {},
      likert: {},
      selected: null,
      token: newToken(),
      busy: false,
      problemsShown: false,
    };
    timer.reset();
    cards.forEach((card) => {
      card.addEventListener("focus", () => select(card, false));
      card.addEventListener("click", (event) => {
        const rank = event.target.closest("button.rank");
        const likert = event.target.closest("button.likert");
        const read = event.target.closest("[data-action=read]");
        select(card, false);
        if (rank) setRank(card, Number(rank.dataset.rank));
        else if (likert) setLikert(card, Number(likert.dataset.likert));
        else if (read) toggleReading(card);
      });
    });
    section.querySelector("[data-action=submit]").addEventListener("click", submit);
    section.querySelector("[data-action=skip]").addEventListener("click", openSkip);
    section.querySelector("#none-acceptable").addEventListener("change", render);
    section.querySelector("#rationale").addEventListener("input", render);
    section.querySelectorAll(".flag-box").forEach((box) =>
      box.addEventListener("keydown", (event) => {
        if (event.key === "Escape") select(box.closest(".response"), true);
      })
    );
    select(cards[0], false);
    render();
  }

  // --- state changes
  function select(card, focus) {
    if (!state || !card) return;
    state.selected = card;
    state.cards.forEach((other) => other.classList.toggle("selected", other === card));
    if (focus) card.focus({ preventScroll: false });
  }

  function setRank(card, rank) {
    const uid = card.dataset.uid;
    if (!rank) {
      delete state.ranks[uid];
    } else {
      if (!state.tiesAllowed) {
        // Without ties a rank belongs to one response: taking it frees the other.
        Object.keys(state.ranks).forEach((other) => {
          if (other !== uid && state.ranks[other] === rank) delete state.ranks[other];
        });
      }
      state.ranks[uid] = rank;
    }
    render();
  }

  function setLikert(card, value) {
    if (!state.likertOn) return;
    state.likert[card.dataset.uid] = value;
    render();
  }

  function toggleReading(card) {
    const reading = !card.classList.contains("reading");
    state.cards.forEach((other) => {
      other.classList.remove("reading");
      other.querySelector("[data-action=read]").setAttribute("aria-expanded", "false");
    });
    state.section.classList.toggle("reading-mode", reading);
    if (reading) {
      card.classList.add("reading");
      card.querySelector("[data-action=read]").setAttribute("aria-expanded", "true");
      card.scrollIntoView({ block: "start" });
    }
  }

  // A ranking read back by the letters shown: "B > A = D > C".
  function rankingText(ranks) {
    const ranked = state.cards.filter((card) => ranks[card.dataset.uid]);
    const levels = Array.from(new Set(ranked.map((card) => ranks[card.dataset.uid]))).sort((a, b) => a - b);
    return levels
      .map((level) => ranked.filter((card) => ranks[card.dataset.uid] === level).map((card) => card.dataset.letter).join(" = "))
      .join(" > ");
  }

  function summaryText() {
    if (state.section.querySelector("#none-acceptable").checked) {
      const ranking = rankingText(state.ranks);
      return ranking ? ranking + " · " + _("none acceptable") : _("none acceptable");
    }
    let text = rankingText(state.ranks);
    const unranked = state.cards.filter((card) => !state.ranks[card.dataset.uid]).map((card) => card.dataset.letter);
    if (unranked.length) {
      text += (text ? " · " : "") + interpolate(_("not ranked yet: %(letters)s"), { letters: unranked.join(", ") }, true);
    }
    return text;
  }

  function render() {
    if (!state) return;
    state.cards.forEach((card) => {
      const uid = card.dataset.uid;
      const rank = state.ranks[uid];
      card.querySelectorAll("button.rank").forEach((button) =>
        button.setAttribute("aria-pressed", String(Number(button.dataset.rank) === rank))
      );
      card.querySelectorAll("button.likert").forEach((button) =>
        button.setAttribute("aria-pressed", String(Number(button.dataset.likert) === state.likert[uid]))
      );
      card.querySelector(".rank-badge").textContent = rank ? interpolate(_("rank %(rank)s"), { rank: rank }, true) : "";
      card.classList.toggle("ranked", Boolean(rank));
    });
    state.section.querySelector("#summary").textContent = summaryText();
    // Problems shown at a submit stay only while they are still true.
    if (state.problemsShown) {
      const found = problems(currentAnswer());
      showErrors(found);
      state.problemsShown = found.length > 0;
    }
  }

  function collectFlags() {
    const flags = {};
    state.cards.forEach((card) => {
      const checked = Array.from(card.querySelectorAll(".flag-box:checked")).map((box) => box.value);
      if (checked.length) flags[card.dataset.uid] = checked;
    });
    return flags;
  }

  // --- submit and skip
  function problems(answer) {
    const found = [];
    const rankedCount = Object.keys(answer.ranks).length;
    if (!answer.none_acceptable && rankedCount < state.k) found.push(_("Give every response a rank (1 is best)."));
    if (answer.none_acceptable && rankedCount > 0 && rankedCount < state.k) found.push(_("Rank every response, or clear the ranks you gave."));
    if (state.likertOn && !answer.none_acceptable && Object.keys(answer.likert).length < state.k) found.push(_("Rate every response from 1 to 7."));
    if (state.rationaleRequired && !answer.rationale.trim()) found.push(_("This project asks why: write a short rationale."));
    return found;
  }

  function showErrors(messages) {
    const box = state.section.querySelector("#task-errors");
    box.textContent = "";
    messages.forEach((message) => {
      const line = document.createElement("p");
      line.textContent = message;
      box.appendChild(line);
    });
  }

  function currentAnswer() {
    const noneAcceptable = state.section.querySelector("#none-acceptable").checked;
    return {
      ranks: Object.assign({}, state.ranks),
      likert: state.likertOn ? Object.assign({}, state.likert) : {},
      flags: collectFlags(),
      none_acceptable: noneAcceptable,
      rationale: state.section.querySelector("#rationale").value,
      active_seconds: timer.seconds(),
      client_token: state.token,
    };
  }

  async function submit() {
    if (!state || state.busy) return;
    const answer = currentAnswer();
    const found = problems(answer);
    showErrors(found);
    state.problemsShown = found.length > 0;
    if (found.length) {
      // The box can sit under the sticky bar: bring it to the middle and focus it.
      if (state.rationaleRequired && !answer.rationale.trim()) {
        const rationale = state.section.querySelector("#rationale");
        rationale.scrollIntoView({ block: "center" });
        rationale.focus({ preventScroll: true });
      }
      return;
    }
    state.busy = true;
    let response;
    try {
      response = await post(state.section.dataset.judgmentUrl, answer, true);
    } catch (error) {
      state.busy = false;
      showErrors([_("The answer could not be sent: the server cannot be reached. Your ranking is still here; try again.")]);
      return;
    }
    state.busy = false;
    if (response.status === 201 || response.status === 200) {
      const body = await response.json();
      if (body.gold) showGoldFeedback(body.gold, answer);
      else loadNext();
    } else if (response.status === 409) {
      showConflict(await response.json(), answer);
    } else if (response.status === 400) {
      const body = await response.json();
      // Problem details (RFC 9457): errors maps a field to its messages.
      const fields = Object.entries(body.errors || {});
      showErrors(fields.length ? fields.map(([field, messages]) => field + ": " + [].concat(messages).join(" ")) : [body.detail || String(response.status)]);
    } else {
      showErrors([interpolate(_("The server refused the answer (error %(status)s). Your ranking is still here; try again."), { status: response.status }, true)]);
    }
  }

  // A gold task, in a project that shows its expected ranking: say what it
  // was next to the person's own answer, then go on when they are ready.
  function showGoldFeedback(gold, answer) {
    const panel = document.createElement("section");
    panel.className = "gold-feedback card " + (gold.matched ? "matched" : "differs");
    panel.id = "gold-feedback";
    panel.setAttribute("role", "status");
    const title = document.createElement("h2");
    title.textContent = gold.matched ? _("Gold task: you gave the expected ranking") : _("Gold task: the expected ranking differs from yours");
    const expected = document.createElement("p");
    expected.className = "gold-expected";
    expected.textContent = interpolate(_("Expected: %(ranking)s"), { ranking: rankingText(gold.expected) }, true);
    const yours = document.createElement("p");
    yours.className = "gold-yours";
    yours.textContent = interpolate(_("Yours: %(ranking)s"), { ranking: answer.none_acceptable ? _("none acceptable") : rankingText(answer.ranks) }, true);
    const next = document.createElement("button");
    next.type = "button";
    next.className = "primary";
    next.textContent = _("Go to the next task");
    next.addEventListener("click", loadNext);
    panel.append(title, expected, yours, next);
    state.section.replaceWith(panel);
    state = null;
    next.focus();
  }

  function showConflict(body, answer) {
    const summary = summaryText();
    const panel = document.createElement("section");
    panel.className = "conflict card";
    panel.setAttribute("role", "alert");
    const title = document.createElement("h2");
    title.textContent = body.reason === "taken_over"
      ? _("Your time on this task ran out and someone else took it over")
      : _("This answer was not saved");
    const detail = document.createElement("p");
    detail.textContent = body.detail || "";
    const yours = document.createElement("p");
    yours.className = "echo";
    yours.textContent = interpolate(_("Your answer was: %(summary)s"), { summary: answer.none_acceptable ? _("none acceptable") : summary }, true);
    panel.append(title, detail, yours);
    if (answer.rationale) {
      const rationale = document.createElement("blockquote");
      rationale.textContent = answer.rationale;
      panel.appendChild(rationale);
    }
    const next = document.createElement("button");
    next.type = "button";
    next.className = "primary";
    next.textContent = _("Go to the next task");
    next.addEventListener("click", loadNext);
    panel.appendChild(next);
    state.section.replaceWith(panel);
    state = null;
    next.focus();
  }

  function openSkip() {
    if (!state) return;
    skipDialog.showModal();
  }

  skipDialog.addEventListener("close", async () => {
    if (skipDialog.returnValue !== "skip" || !state) return;
    const reason = document.getElementById("skip-reason").value;
    const response = await post(state.section.dataset.skipUrl, { reason: reason }, true);
    if (response.ok || response.status === 409) loadNext();
    else showErrors([interpolate(_("The task could not be skipped (error %(status)s)."), { status: response.status }, true)]);
  });

  // --- keyboard
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      submit();
      return;
    }
    if (helpDialog.open || skipDialog.open) return;
    if (typingInField(event.target) || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "?") {
      event.preventDefault();
      helpDialog.showModal();
      return;
    }
    if (!state) return;
    const key = event.key.toLowerCase();
    const digit = /^Digit[0-9]$/.test(event.code) ? Number(event.code.slice(5)) : null;
    if (digit !== null && event.shiftKey) {
      if (state.selected && digit >= 1 && digit <= 7) setLikert(state.selected, digit);
      event.preventDefault();
      return;
    }
    if (digit !== null) {
      if (state.selected && digit <= state.k) setRank(state.selected, digit);
      event.preventDefault();
      return;
    }
    const letterIndex = key.length === 1 ? key.charCodeAt(0) - 97 : -1;
    if (key === "s") {
      event.preventDefault();
      openSkip();
    } else if (key === "n") {
      const box = state.section.querySelector("#none-acceptable");
      box.checked = !box.checked;
      render();
    } else if (key === "x") {
      // The selected response's flags: Space ticks one, Tab moves on, Esc goes back.
      const flag = state.selected && state.selected.querySelector(".flag-box");
      if (flag) {
        event.preventDefault();
        flag.focus();
      }
    } else if (key === "r") {
      if (state.selected) toggleReading(state.selected);
    } else if (event.key === "Escape") {
      if (state.section.classList.contains("reading-mode") && state.selected) toggleReading(state.selected);
    } else if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      const index = state.cards.indexOf(state.selected);
      const step = event.key === "ArrowRight" ? 1 : -1;
      select(state.cards[(index + step + state.k) % state.k], true);
      event.preventDefault();
    } else if (letterIndex >= 0 && letterIndex < state.k) {
      select(state.cards[letterIndex], true);
      event.preventDefault();
    }
  });

  app.querySelector("[data-action=help]").addEventListener("click", () => helpDialog.showModal());
  loadNext();
})();
