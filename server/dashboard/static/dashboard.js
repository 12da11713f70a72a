// Nightjar dashboard: live updates without reloading, and the rollback confirmation.
// Every few seconds the page's main block is fetched again as a fragment and swapped in place.
"use strict";
(function () {
  const live = document.getElementById("live");
  const stamp = document.getElementById("updated");
  const dialog = document.getElementById("confirm-rollback");
  const period = Number(live && live.dataset.pollMs) || 2000;

  async function refresh() {
    if (!live || live.querySelector("[data-static]") || (dialog && dialog.open)) return;
    try {
      const response = await fetch(location.pathname + location.search,
        { headers: { "X-Dashboard-Fragment": "1" }, credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) { location.assign("/dashboard/login"); return; }
      if (!response.ok) throw new Error("HTTP " + response.status);
      live.innerHTML = await response.text();
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
      stamp.className = "";
    } catch (e) {
      stamp.textContent = "not updated (" + e.message + ")";
      stamp.className = "stale";
    }
  }
  setInterval(refresh, period);

  document.addEventListener("click", function (event) {
    const button = event.target.closest("[data-rollback]");
    if (button && dialog) {
      dialog.querySelector(".target").textContent = button.dataset.rollback;
      dialog.querySelector(".from").textContent = button.dataset.liveVersion;
      dialog.querySelector("input[name=to]").value = button.dataset.rollback;
      dialog.showModal();
    }
    if (event.target.closest("dialog .cancel")) dialog.close();
  });
})();
