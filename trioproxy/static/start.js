// trioproxy's start page: follows a starting server by the API's server-sent events (state,
// output), then goes on to the page that was asked for; offers a restart when it failed.
//
// Every URL comes from the page's data attributes, relative to the page, so it works under any
// base URL and behind any other proxy's prefix.
"use strict";

(() => {
  const main = document.getElementById("start");
  const state = document.getElementById("state");
  const elapsed = document.getElementById("elapsed");
  const estimate = document.getElementById("estimate");
  const reason = document.getElementById("reason");
  const output = document.getElementById("output");
  const restart = document.getElementById("restart");
  const MAX_BATCHES = 2000; // pieces of output kept on the page (each a batch of lines)
  const STOPPED = new Set(["failed", "stopped"]);
  let since = null; // trio's seconds since the start, and when we learnt it
  let stream = null;

  function goOn() {
    if (stream) stream.close();
    location.replace(main.dataset.next + location.hash);
  }

  function estimateText(server) {
    if (server.estimate === null || server.estimate === undefined) return "first start: no estimate yet";
    const seconds = Math.max(1, Math.ceil(server.estimate));
    return server.estimate_from > 1 ? `usually ready in ~${seconds} s` : `ready in ~${seconds} s last time`;
  }

  function tick() {
    if (since === null) {
      elapsed.textContent = "";
      return;
    }
    const seconds = since.value + (performance.now() - since.at) / 1000;
    elapsed.textContent = `for ${Math.floor(seconds)} s`;
  }
  setInterval(tick, 500);

  function showStatus(server) {
    main.dataset.state = server.state;
    state.textContent = server.state;
    estimate.textContent = estimateText(server);
    since = server.starting_for === null || server.starting_for === undefined
      ? null : { value: server.starting_for, at: performance.now() };
    tick();
    reason.textContent = server.reason || "";
    restart.hidden = !(STOPPED.has(server.state) && server.managed !== false);
    restart.disabled = false;
    if (server.state === "ready") goOn();
  }

  function addLines(lines) {
    const atBottom = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    output.append(lines.map((line) => line + "\n").join(""));
    while (output.childNodes.length > MAX_BATCHES) output.firstChild.remove();
    if (atBottom) output.scrollTop = output.scrollHeight;
  }

  function follow() {
    const url = new URL(main.dataset.events, location.href);
    url.searchParams.set("since", main.dataset.total || "0");
    stream = new EventSource(url.href);
    stream.addEventListener("status", (event) => showStatus(JSON.parse(event.data)));
    stream.addEventListener("output", (event) => {
      addLines(JSON.parse(event.data));
      main.dataset.total = event.lastEventId;
    });
    stream.addEventListener("error", () => {
      if (stream.readyState === EventSource.CLOSED) {
        // Not an event stream (a 403 once the login expired): EventSource gives up.
        reason.textContent = "Lost contact with trioproxy: reload the page (you may have to log in again).";
      }
    });
  }

  restart.addEventListener("click", async () => {
    restart.disabled = true;
    try {
      const response = await fetch(main.dataset.restart, {
        method: "POST",
        cache: "no-store",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!response.ok) {
        let message = `HTTP ${response.status}`;
        try {
          message = (await response.json()).message || message;
        } catch (error) {
          // not JSON: the status says it
        }
        throw new Error(message);
      }
      // The stream goes on: it brings the restarted server's state and output.
    } catch (error) {
      reason.textContent = `Cannot restart: ${error.message}`;
      restart.disabled = false;
    }
  });

  follow();
})();
