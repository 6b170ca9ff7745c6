// Live updates: any event on /dashboard/live reloads the content of <main> (debounced),
// so counts and rows follow the system without a page reload. Actions ask to confirm.
(function () {
  "use strict";
  var dot = document.getElementById("live");
  var pending = null;
  function refresh() {
    pending = null;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html").querySelector("main");
        var main = document.querySelector("main");
        if (next && main && !main.contains(document.activeElement)) { main.innerHTML = next.innerHTML; }
        else if (next && main) { main.dataset.stale = "1"; }
      })
      .catch(function () {});
  }
  function schedule() { if (!pending) { pending = setTimeout(refresh, 300); } }
  if (window.EventSource) {
    var source = new EventSource("/dashboard/live");
    source.onopen = function () { if (dot) { dot.className = "on"; } };
    source.onerror = function () { if (dot) { dot.className = "off"; } };
    source.onmessage = schedule;
  }
  // Heartbeats and queue figures change without events: refresh those every 15 s too.
  setInterval(schedule, 15000);
  document.addEventListener("submit", function (e) {
    var question = e.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { e.preventDefault(); }
  });
})();
