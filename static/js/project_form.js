// Project settings: the flags list editor. Without this script the form still
// works (blank rows to fill, a row emptied is a flag removed); with it, rows
// are added, removed and moved, and posted in the order shown.
(function () {
  "use strict";
  const editor = document.querySelector("[data-flag-editor]");
  if (!editor) return;
  const list = editor.querySelector("[data-flag-rows]");
  const template = editor.querySelector("[data-flag-template]");
  const rowLabel = editor.dataset.rowLabel || "Flag";

  function rows() {
    return Array.from(list.querySelectorAll("[data-flag-row]"));
  }

  function renumber() {
    rows().forEach((row, index) => {
      row.querySelector("input").setAttribute("aria-label", rowLabel + " " + (index + 1));
    });
  }

  function addRow() {
    const row = template.content.firstElementChild.cloneNode(true);
    list.appendChild(row);
    renumber();
    row.querySelector("input").focus();
  }

  editor.querySelectorAll("[hidden]").forEach((element) => { element.hidden = false; });
  // Trailing blank rows are for people without the script; the Add button replaces them.
  const blanks = rows().filter((row) => row.querySelector("input").value === "");
  blanks.slice(rows().length > blanks.length ? 0 : 1).forEach((row) => row.remove());
  renumber();

  editor.querySelector("[data-flag-add]").addEventListener("click", addRow);
  list.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const row = button.closest("[data-flag-row]");
    if (button.hasAttribute("data-flag-remove")) {
      row.remove();
    } else if (button.hasAttribute("data-flag-up") && row.previousElementSibling) {
      list.insertBefore(row, row.previousElementSibling);
    } else if (button.hasAttribute("data-flag-down") && row.nextElementSibling) {
      list.insertBefore(row.nextElementSibling, row);
    }
    renumber();
  });
  list.addEventListener("keydown", (event) => {
    // Enter in a flag adds a row instead of submitting the whole form half-typed.
    if (event.key === "Enter" && event.target.tagName === "INPUT") {
      event.preventDefault();
      addRow();
    }
  });
})();
