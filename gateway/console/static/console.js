// smtp-gateway console: the only script (no inline ones: the Content-Security-Policy allows none).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Queue page: one box ticks every message shown.
  for (const all of document.querySelectorAll("input.tick-all")) {
    all.addEventListener("change", () => {
      for (const box of all.closest("table").querySelectorAll("tbody input[type=checkbox][name=id]")) {
        box.checked = all.checked;
      }
    });
  }
  // Test send: picking a login proposes its usual sender.
  const login = document.getElementById("login");
  const sender = document.getElementById("sender");
  if (login && sender) {
    login.addEventListener("change", () => {
      const proposed = login.selectedOptions[0]?.dataset.sender;
      if (proposed) sender.value = proposed;
    });
  }
});
