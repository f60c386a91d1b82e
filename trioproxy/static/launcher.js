// trioproxy's launcher: keeps each server's state live by polling the management API, and
// sends the start, restart and stop buttons to it; a template's form creates an instance.
//
// Every URL here is relative to the page (the root of trioproxy's base URL), so the page
// works under any base URL and behind any other proxy's prefix.
"use strict";

(() => {
  const API = "server-proxy/api/servers";
  const POLL_MS = 3000;
  const FAST_POLL_MS = 300; // while a server is changing state, or an action was just sent
  const FAST_FOR_MS = 5000;
  const LOG_LINES = 20;
  const CHANGING = new Set(["starting", "stopping", "backoff"]);
  // Which buttons make sense in which state.
  const ALLOWED = {
    start: new Set(["stopped", "failed"]),
    restart: new Set(["ready", "starting", "backoff", "failed"]),
    stop: new Set(["ready", "starting", "backoff"]),
  };

  const main = document.querySelector("main");
  const items = new Map();
  function index() {
    items.clear();
    for (const item of document.querySelectorAll("li.server")) {
      items.set(item.dataset.server, item);
    }
    // An icon that fails to load leaves the server's initial in its place.
    for (const icon of document.querySelectorAll("img.icon")) {
      icon.addEventListener("error", () => {
        const letter = document.createElement("span");
        letter.className = "icon letter";
        letter.textContent = (icon.closest("li.server").querySelector(".title").textContent || "?")[0];
        icon.replaceWith(letter);
      });
    }
  }
  index();

  // After a reload of trioproxy's configuration (servers added, removed or changed), the
  // page's list is fetched again and put in place of the old one.
  async function takeNewList(generation) {
    // The page itself, wherever it is served (the root, or server-proxy/launcher when the root
    // sends browsers to a default URL).
    const response = await fetch(location.href, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.querySelector("main");
    if (!fresh) throw new Error("the launcher page has no list");
    // What someone is typing in a template's form survives the new list.
    const typed = new Map(Array.from(main.querySelectorAll("form.template-form [id]"), (field) => [field.id, field.value]));
    main.replaceChildren(...Array.from(fresh.childNodes, (node) => document.importNode(node, true)));
    for (const [id, value] of typed) {
      const field = document.getElementById(id);
      if (field) field.value = value;
    }
    main.dataset.generation = fresh.dataset.generation || String(generation);
    index();
  }
  const statusLine = document.getElementById("status");
  const busy = new Set(); // servers with an action in flight
  let fastUntil = 0;
  let timer = null;

  function serverUrl(name, action) {
    return `${API}/${encodeURIComponent(name)}${action ? "/" + action : ""}`;
  }

  async function getJson(url, options = {}) {
    const { contentType, ...rest } = options;
    const headers = { Accept: "application/json" };
    if (contentType) headers["Content-Type"] = contentType;
    const response = await fetch(url, {
      cache: "no-store",
      credentials: "same-origin",
      ...rest,
      headers,
    });
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      // An answer that is not JSON (a proxy's error page): reported by its status alone.
    }
    if (!response.ok) {
      const reason = (body && body.message) || `HTTP ${response.status}`;
      throw new Error(response.status === 403 ? `${reason} Reload the page to log in again.` : reason);
    }
    return body;
  }

  async function refresh() {
    clearTimeout(timer);
    let changing = false;
    try {
      const { servers, generation } = await getJson(API);
      if (generation !== undefined && String(generation) !== main.dataset.generation) {
        await takeNewList(generation);
      }
      for (const server of servers) {
        const item = items.get(server.name);
        if (item) {
          show(item, server);
          changing = changing || CHANGING.has(server.state);
        }
      }
      setStatus(`Updated ${new Date().toLocaleTimeString()}`, false);
    } catch (error) {
      setStatus(`Cannot get the servers' state: ${error.message}`, true);
    }
    const fast = changing || busy.size > 0 || Date.now() < fastUntil;
    timer = setTimeout(refresh, fast ? FAST_POLL_MS : POLL_MS);
  }

  function setStatus(text, failed) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", failed);
  }

  function show(item, server) {
    const previous = item.dataset.state;
    if (previous !== server.state) item.classList.remove("has-error");
    item.dataset.state = server.state;
    item.querySelector(".state").textContent = server.state;
    if (!item.classList.contains("has-error")) {
      item.querySelector(".detail").textContent = describe(server);
    }
    const managed = server.managed !== false;
    item.dataset.managed = String(managed);
    for (const button of item.querySelectorAll("button[data-action]")) {
      const action = button.dataset.action;
      button.hidden = !managed;
      button.disabled = busy.has(server.name) || !ALLOWED[action].has(server.state);
    }
    const lastLine = item.querySelector(".last-line");
    const starting = CHANGING.has(server.state) && server.state !== "stopping";
    lastLine.textContent = starting && server.last_line ? server.last_line : "";
    lastLine.hidden = !lastLine.textContent;
    const log = item.querySelector(".log");
    if (server.state === "failed") {
      if (previous !== "failed" || log.hidden) {
        showLog(item, server);
      }
    } else {
      log.hidden = true;
    }
  }

  function describe(server) {
    const parts = [];
    if (server.pid) parts.push(`pid ${server.pid}`);
    if (server.unix_socket) parts.push(`socket ${server.unix_socket}`);
    else if (server.port) parts.push(`port ${server.port}`);
    if (server.uptime !== null && server.uptime !== undefined) parts.push(`up ${duration(server.uptime)}`);
    if (server.state === "ready" && server.idle_seconds !== undefined) {
      parts.push(`last active ${duration(server.idle_seconds)} ago`);
    }
    if (server.restarts) parts.push(`${server.restarts} restart${server.restarts === 1 ? "" : "s"}`);
    if (server.last_exit_code !== null && server.last_exit_code !== undefined && server.state !== "ready") {
      parts.push(`last exit code ${server.last_exit_code}`);
    }
    if (server.reason && server.state !== "ready") parts.push(server.reason);
    if (server.starting_for !== null && server.starting_for !== undefined) {
      // The same progress as the start page: time since the start, the estimate.
      parts.unshift(`starting for ${Math.floor(server.starting_for)} s`, estimateText(server));
    }
    return parts.join(" · ");
  }

  function estimateText(server) {
    if (server.estimate === null || server.estimate === undefined) return "first start: no estimate yet";
    const seconds = Math.max(1, Math.ceil(server.estimate));
    return server.estimate_from > 1 ? `usually ready in ~${seconds} s` : `ready in ~${seconds} s last time`;
  }

  function duration(seconds) {
    if (seconds < 60) return `${Math.floor(seconds)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
    const hours = Math.floor(seconds / 3600);
    if (hours < 48) return `${hours} h ${Math.floor((seconds % 3600) / 60)} min`;
    return `${Math.floor(hours / 24)} days`;
  }

  async function showLog(item, server) {
    const log = item.querySelector(".log");
    try {
      const response = await fetch(`${serverUrl(server.name)}/logs?tail=${LOG_LINES}`, {
        cache: "no-store",
        credentials: "same-origin",
      });
      const text = response.ok ? await response.text() : `(no output: HTTP ${response.status})`;
      log.textContent = text.trim() || "(the server printed nothing)";
    } catch (error) {
      log.textContent = `(cannot get its output: ${error.message})`;
    }
    log.hidden = item.dataset.state !== "failed";
  }

  async function act(item, action) {
    const name = item.dataset.server;
    const detail = item.querySelector(".detail");
    busy.add(name);
    fastUntil = Date.now() + FAST_FOR_MS;
    item.classList.remove("has-error");
    for (const button of item.querySelectorAll("button[data-action]")) button.disabled = true;
    const url = action === "stop" ? `${serverUrl(name)}?wait=0` : `${serverUrl(name, action)}?wait=0`;
    try {
      await getJson(url, { method: action === "stop" ? "DELETE" : "POST" });
    } catch (error) {
      item.classList.add("has-error");
      detail.textContent = `Cannot ${action} ${name}: ${error.message}`;
    } finally {
      busy.delete(name);
      refresh();
    }
  }

  // A template's form: one field per parameter; empty optional fields take their default.
  async function create(form) {
    const error = form.querySelector(".form-error");
    const button = form.querySelector("button[type=submit]");
    const args = {};
    for (const field of form.querySelectorAll("input[name], select[name]")) {
      if (field.value !== "" || field.required) args[field.name] = field.value;
    }
    error.hidden = true;
    button.disabled = true;
    fastUntil = Date.now() + FAST_FOR_MS;
    try {
      const server = await getJson(`${API}?wait=0`, {
        method: "POST",
        body: JSON.stringify({ template: form.dataset.template, args }),
        contentType: "application/json",
      });
      setStatus(server.created ? `Started ${server.name}` : `${server.name} was already there`, false);
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  document.addEventListener("submit", (event) => {
    const form = event.target.closest("form.template-form");
    if (!form) return;
    event.preventDefault();
    create(form);
  });

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    const item = button && button.closest("li.server");
    if (item) act(item, button.dataset.action);
  });
  // No polling while nobody looks; catch up at once when someone does.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(timer);
    else refresh();
  });
  refresh();
})();
