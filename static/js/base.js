// Every page: picking a language applies it at once (the button stays for people without scripts).
(function () {
  "use strict";
  const form = document.querySelector("form.language");
  if (!form) return;
  const select = form.querySelector("select");
  const button = form.querySelector("button");
  if (button) button.hidden = true;
  select.addEventListener("change", () => form.submit());
})();
