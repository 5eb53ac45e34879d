// Helpers shared by the labeling pages: CSRF-protected POSTs, client tokens, active time.
(function () {
  "use strict";

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function post(url, body, isJson) {
    const headers = { "X-CSRFToken": csrfToken(), "X-Requested-With": "fetch" };
    if (isJson) headers["Content-Type"] = "application/json";
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: headers,
      body: isJson ? JSON.stringify(body) : undefined,
    });
  }

  function newToken() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
  }

  // Active time: counted while the page is visible and the person did something in the last minute.
  function activeTimer() {
    const IDLE_AFTER_MS = 60000;
    let lastActivity = Date.now();
    let activeMs = 0;
    let lastTick = Date.now();
    function tick() {
      const now = Date.now();
      if (document.visibilityState === "visible" && now - lastActivity < IDLE_AFTER_MS) activeMs += now - lastTick;
      lastTick = now;
    }
    setInterval(tick, 1000);
    ["keydown", "pointerdown", "scroll", "mousemove"].forEach((name) =>
      document.addEventListener(name, () => { tick(); lastActivity = Date.now(); }, { passive: true })
    );
    return {
      reset() { activeMs = 0; lastTick = Date.now(); lastActivity = Date.now(); },
      seconds() { tick(); return Math.round(activeMs / 100) / 10; },
    };
  }

  function typingInField(target) {
    return Boolean(target) && (target.tagName === "TEXTAREA" || target.tagName === "SELECT" ||
      (target.tagName === "INPUT" && target.type !== "checkbox"));
  }

  window.Rankwise = { csrfToken: csrfToken, post: post, newToken: newToken, activeTimer: activeTimer, typingInField: typingInField };
})();
