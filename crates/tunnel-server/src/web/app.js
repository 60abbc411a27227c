// tunnel dashboard: live updates. The server sends a `change` event over SSE when tasks
// change; the page then fetches itself again and swaps the #live region. Nothing runs while
// the tab is hidden: the stream is closed and reopened (with a refresh) when it shows again.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || !live.dataset.live) return;
  var source = null, busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("live");
        if (fresh) live.replaceChildren.apply(live, Array.from(fresh.childNodes));
        live.dataset.refreshed = String(Date.now());
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  function open() {
    if (source) return;
    source = new EventSource(live.dataset.live);
    source.addEventListener("change", refresh);
    live.dataset.stream = "open";
  }
  function close() {
    if (source) { source.close(); source = null; }
    live.dataset.stream = "paused";
  }
  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { close(); } else { open(); refresh(); }
  });
  if (!document.hidden) open(); else live.dataset.stream = "paused";
})();
