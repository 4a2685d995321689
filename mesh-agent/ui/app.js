// The mesh dashboard: reads the agent's API (/v1) with its bearer token, follows the
// event feed (/v1/events, server-sent events read through fetch so that the token goes
// in a header, never in a URL), and drains, undrains or removes tasks after a
// confirmation. Every value from the API is put in the page as text, never as HTML:
// service and task names come from other hosts.
"use strict";

const TOKEN_KEY = "mesh-token";
const REFRESH_EVERY_MS = 5000;
const MAX_EVENTS = 200;
// A call that takes longer is abandoned, so one hung request cannot stop the refreshes.
const CALL_TIMEOUT_MS = 10000;
// The agent sends a keep-alive every 15 s: a stream silent for longer is dead.
const STREAM_SILENCE_MS = 45000;

let token = null;
let lastEventId = null;
let refreshTimer = null;
let refreshing = false;
let refreshAgain = false;

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key === "onclick") node.addEventListener("click", value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function say(text, isError) {
  const m = $("#message");
  m.textContent = text;
  m.className = isError ? "error" : "";
  m.hidden = !text;
}

class ApiError extends Error {
  constructor(status, text) {
    super(text);
    this.status = status;
  }
}

// Every call carries the token, the event stream's included.
function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(method, path) {
  const headers = authHeaders();
  const response = await fetch(path, {
    method,
    headers,
    cache: "no-store",
    signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
  });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new ApiError(response.status, `${method} ${path}: ${detail}`);
  }
  return body;
}

// The token comes from the URL fragment once (`/ui#token=...`, which browsers never
// send to a server), then lives in this tab's session storage only.
function takeToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    try {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    } catch (e) {
      // A malformed escape: the form asks for the token instead.
    }
    history.replaceState(null, "", location.pathname);
  }
  token = sessionStorage.getItem(TOKEN_KEY);
}

function showLogin(error) {
  $("#main").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = error || "";
}

function human(bytes) {
  if (bytes === undefined || bytes === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let n = bytes;
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function ports(spec) {
  return spec.ports
    .map((p) => {
      // A name other than the default `<protocol><target>` is what SRV answers to.
      const name = p.name && p.name !== `${p.protocol}${p.target}` ? ` (${p.name})` : "";
      const published = p.published ? `${p.published}→` : "";
      return `${published}${p.target}/${p.protocol}${name}`;
    })
    .join(", ");
}

function fill(table, rows) {
  const body = $(table + " tbody");
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const columns = $(table + " thead tr").children.length;
    body.append(el("tr", {}, el("td", { colSpan: columns, class: "muted" }, "none")));
  }
}

function card(label, value, bad) {
  return el("div", { class: bad ? "card bad" : "card" }, el("b", {}, value), label);
}

function renderSummary(status, nodes, services) {
  const members = status.cluster.members;
  const conflicts = status.cluster.conflicts || [];
  const notAlive = (members.suspect || 0) + (members.down || 0);
  const noHealthy = services.filter((s) => s.tasks + (s.suspended || 0) > 0 && s.routable === 0);
  $("#summary").replaceChildren(
    card("hosts alive", `${members.alive || 0}/${nodes.length}`, notAlive > 0),
    card("services", services.length),
    card("routable tasks", `${status.routable_tasks}/${status.tasks}`, status.routable_tasks < status.tasks),
    card("services without a routable task", noHealthy.length, noHealthy.length > 0),
    card("conflicts", conflicts.length, conflicts.length > 0),
  );
  $("#agent").textContent = `agent ${status.node} · mesh ${status.version} · snapshot ${status.snapshot}`;
  $("#conflicts").replaceChildren(...conflicts.map((c) => el("li", {}, c)));
  if (conflicts.length === 0) {
    $("#conflicts").append(el("li", { class: "muted" }, "none"));
  }
}

function renderNodes(nodes) {
  fill("#nodes", nodes.map((n) =>
    el("tr", { "data-node": n.name },
      el("td", {}, n.name, n.local ? " (this agent)" : ""),
      el("td", {}, n.address),
      el("td", { class: "status status-" + n.status }, n.status),
      el("td", { class: "version" }, n.version || "–"),
      el("td", {}, n.started),
      el("td", { class: "num" }, n.tasks))));
}

function conflictText(c) {
  if (c.kind === "port") return `port ${c.port}/${c.protocol} is held by ${c.holder}: not published`;
  if (c.kind === "task_id") return `task ${c.task} of ${c.host} is not routed: the id is kept on ${c.kept_on}`;
  return c.kind;
}

function renderServices(services) {
  fill("#services", services.map((s) => {
    const vip = [s.vips.v4, s.vips.v6].filter(Boolean).join(" ") || "–";
    const problems = [
      ...(s.conflicts || []).map(conflictText),
      ...(s.errors || []),
    ];
    const suspended = s.suspended ? ` +${s.suspended} suspended` : "";
    return el("tr", { "data-service": s.name },
      el("td", {}, s.name),
      el("td", {}, s.mode),
      el("td", {}, vip),
      el("td", {}, ports(s)),
      el("td", { class: s.routable === 0 && s.tasks > 0 ? "routable health-unhealthy" : "routable" },
        `${s.routable}/${s.tasks}${suspended}`),
      el("td", { class: problems.length ? "error" : "muted" }, problems.join("; ") || "–"));
  }));
}

function actionButton(label, kind, task, enabled, why) {
  return el("button", {
    type: "button",
    class: kind,
    disabled: !enabled,
    title: why || "",
    onclick: () => act(kind, task),
  }, label);
}

function renderTasks(tasks, here) {
  fill("#tasks", tasks.map((t) => {
    const local = t.node === here;
    const why = local ? "" : `run this on ${t.node}'s agent, which owns the task`;
    const draining = t.state === "draining";
    const health = t.suspended ? `suspended (${t.suspended})` : t.health;
    const healthClass = t.suspended ? "suspended" : "health-" + t.health;
    return el("tr", { "data-service": t.service, "data-task": t.id, "data-host": t.node },
      el("td", {}, t.service),
      el("td", {}, t.id),
      el("td", {}, t.node),
      el("td", {}, t.port ? `${t.ip}:${t.port}` : t.ip),
      el("td", { class: "state state-" + t.state }, t.state),
      el("td", { class: "health " + healthClass }, health),
      el("td", { class: "num connections" }, t.active_connections),
      el("td", { class: "num bytes" }, `${human(t.bytes_in)} / ${human(t.bytes_out)}`),
      el("td", {},
        draining
          ? actionButton("Undrain", "undrain", t, local, why)
          : actionButton("Drain", "drain", t, local, why),
        actionButton("Remove", "remove", t, local && t.source === "api",
          local ? "only tasks added through the API can be removed here; the others belong to their source" : why)));
  }));
}

const ACTIONS = {
  drain: {
    method: "POST",
    path: (t) => `/v1/services/${encodeURIComponent(t.service)}/tasks/${encodeURIComponent(t.id)}/drain`,
    ask: (t) => `Drain task ${t.id} of ${t.service}? It gets no new connections; open ones continue until the service's drain timeout.`,
    done: (t) => `Task ${t.id} is draining.`,
  },
  undrain: {
    method: "POST",
    path: (t) => `/v1/services/${encodeURIComponent(t.service)}/tasks/${encodeURIComponent(t.id)}/undrain`,
    ask: (t) => `Undrain task ${t.id} of ${t.service}? It takes new connections again.`,
    done: (t) => `Task ${t.id} takes new connections again.`,
  },
  remove: {
    method: "DELETE",
    path: (t) => `/v1/services/${encodeURIComponent(t.service)}/tasks/${encodeURIComponent(t.id)}`,
    ask: (t) => `Remove task ${t.id} of ${t.service}? It leaves the cluster's tables on every host.`,
    done: (t) => `Task ${t.id} removed.`,
  },
};

function confirmAction(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function act(kind, task) {
  const action = ACTIONS[kind];
  if (!(await confirmAction(action.ask(task)))) return;
  try {
    await api(action.method, action.path(task));
    say(action.done(task), false);
  } catch (e) {
    say(e.message, true);
  }
  refreshSoon();
}

async function refresh() {
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  refreshing = true;
  try {
    const [status, nodes, services, tasks] = await Promise.all([
      api("GET", "/v1/status"),
      api("GET", "/v1/nodes"),
      api("GET", "/v1/services"),
      api("GET", "/v1/tasks"),
    ]);
    $("#login").hidden = true;
    $("#main").hidden = false;
    renderSummary(status, nodes, services);
    renderNodes(nodes);
    renderServices(services);
    renderTasks(tasks, status.node);
  } catch (e) {
    if (e.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      token = null;
      showLogin(e.message);
    } else {
      say(e.message, true);
    }
  } finally {
    refreshing = false;
    if (refreshAgain) {
      refreshAgain = false;
      refreshSoon();
    }
  }
}

// Events come in bursts (a host down withdraws all its tasks): one refresh per burst.
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 250);
}

function addEvent(event) {
  const list = $("#events");
  const at = new Date(event.at_ms).toLocaleTimeString();
  const item = el("li", { class: event.level, "data-kind": event.kind, "data-task": event.task },
    el("time", {}, at), event.text);
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function setStream(state) {
  const badge = $("#stream");
  badge.textContent = state;
  badge.className = "badge " + (state === "live" ? "live" : state === "reconnecting" ? "down" : "");
}

// Reads /v1/events as text/event-stream: blocks separated by a blank line, with
// `id:`, `event:` and `data:` lines; comments (keep-alives) start with a colon.
async function follow() {
  for (;;) {
    try {
      const headers = authHeaders();
      if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
      const abort = new AbortController();
      let silence = setTimeout(() => abort.abort(), STREAM_SILENCE_MS);
      const response = await fetch("/v1/events", { headers, cache: "no-store", signal: abort.signal });
      if (response.status === 401) {
        showLogin("the token was refused");
        return;
      }
      if (!response.ok || !response.body) throw new Error(response.statusText);
      setStream("live");
      refreshSoon();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        clearTimeout(silence);
        silence = setTimeout(() => abort.abort(), STREAM_SILENCE_MS);
        buffer += value;
        // An event is a few hundred bytes; a block this long is not one.
        if (buffer.length > 1 << 20) throw new Error("an event stream block over 1 MiB");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          handleBlock(block);
        }
      }
    } catch (e) {
      // The agent restarted or the network blinked: try again below.
    }
    setStream("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function handleBlock(block) {
  let id = null;
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (id !== null) lastEventId = id;
  if (data.length === 0) return; // a keep-alive
  if (type === "lagged") {
    addEvent({ at_ms: Date.now(), level: "warn", kind: "feed", text: `${data.join("")} events were missed (the page fell behind, or the agent no longer keeps them)` });
  } else {
    try {
      addEvent(JSON.parse(data.join("\n")));
    } catch (e) {
      return;
    }
  }
  refreshSoon();
}

function start() {
  takeToken();
  $("#login").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("#token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#login").hidden = true;
    refresh();
    follow();
  });
  refresh();
  follow();
  setInterval(refresh, REFRESH_EVERY_MS);
}

document.addEventListener("DOMContentLoaded", start);
