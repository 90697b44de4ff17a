// kling-relay dashboard: while the page shows tasks that are still running, fetch the page again
// every two seconds and swap in the fresh region. No framework, no network beyond this service.
(function () {
  "use strict";
  var INTERVAL = 2000;
  function running() {
    var region = document.querySelector("[data-refresh]");
    return region && region.getAttribute("data-refresh") === "running" ? region : null;
  }
  function tick() {
    var region = running();
    if (!region) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { "x-refresh": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-refresh]");
        var current = document.querySelector("[data-refresh]");
        if (fresh && current) current.replaceWith(fresh);
      })
      .catch(function () {})
      .then(function () { setTimeout(tick, INTERVAL); });
  }
  setTimeout(tick, INTERVAL);
})();
