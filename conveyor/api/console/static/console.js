// Live refresh: a block marked data-refresh="N" is fetched again every N seconds and
// swapped in place. Without JavaScript the pages read the same, refreshed by hand.
(function () {
  "use strict";
  function schedule() {
    var live = document.getElementById("live");
    if (!live) return;
    var seconds = parseInt(live.getAttribute("data-refresh") || "0", 10);
    if (!seconds) return;
    window.setTimeout(refresh, seconds * 1000);
  }
  function refresh() {
    if (document.hidden) { schedule(); return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("stopped"); }
        return response.text();
      })
      .then(function (html) {
        var next = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (next && live) { live.replaceWith(next); }
        schedule();
      })
      .catch(function () { /* signed out or the API is away: stop refreshing */ });
  }
  document.addEventListener("DOMContentLoaded", schedule);
})();
