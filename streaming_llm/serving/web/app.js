// The streaming-llm chat page: plain JS, no dependencies, same-origin calls to the server's own API.
//
// Storage: the API key lives in sessionStorage (this tab only); the session id, the page's copy of each
// conversation (last MAX_KEPT messages) and its counter history live in localStorage.
"use strict";

const MAX_KEPT = 200; // messages kept on the page (and in localStorage) per session: the page stays bounded too
const MAX_POINTS = 120; // sparkline points kept per session
const PREFIX = "streaming-llm:";
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(PREFIX + "api-key") || "",
  sessionId: localStorage.getItem(PREFIX + "session") || "",
  model: "streaming-llm",
  started: false, // the server knows this session (so no system message is sent)
  busy: false,
  controller: null,
  rate: null, // tokens/s of the last reply
  messages: [], // {role, content} as shown
  points: [], // {turns, mib, evicted} per completed turn
};

// -- helpers ------------------------------------------------------------------------------------------------
function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8)); // works on plain http too (randomUUID does not)
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function load(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(PREFIX + name));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function save(name, value) {
  try {
    localStorage.setItem(PREFIX + name, JSON.stringify(value));
  } catch {
    // storage full or disabled: the page still works, it just forgets on reload
  }
}

function formatInt(n) {
  return Number(n).toLocaleString("en-US");
}

function formatMiB(bytes) {
  const mib = bytes / 1048576;
  if (mib === 0) return "0";
  return mib >= 100 ? mib.toFixed(0) : mib >= 10 ? mib.toFixed(1) : mib.toPrecision(3);
}

function notify(text, kind = "error") {
  const box = $("notice");
  box.textContent = text;
  box.className = "notice " + kind;
  box.hidden = !text;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", "Bearer " + state.key);
  return fetch(path, { ...options, headers, cache: "no-store" });
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error || { message: response.statusText };
  } catch {
    return { message: `${response.status} ${response.statusText}` };
  }
}

// A 401: show the key field, say plainly what is wrong, put the cursor there.
function needKey() {
  $("key-box").hidden = false;
  notify(
    state.key
      ? "Wrong API key: the server refused it (401 Unauthorized). Enter the right key in the API key field."
      : "This server needs an API key. Enter it in the API key field.",
  );
  $("api-key").focus();
}

// -- transcript ---------------------------------------------------------------------------------------------
function bubble(role, content) {
  const item = document.createElement("article");
  item.className = "msg " + role;
  const who = document.createElement("h3");
  who.className = "who";
  who.textContent = role === "user" ? "You" : role === "assistant" ? "Model" : "Note";
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = content;
  item.append(who, text);
  const log = $("transcript");
  $("empty-note").hidden = true;
  log.append(item);
  const shown = log.querySelectorAll(".msg");
  for (let i = 0; i < shown.length - MAX_KEPT; i++) shown[i].remove();
  log.classList.toggle("trimmed", shown.length > MAX_KEPT);
  scrollDown(true);
  return item;
}

function scrollDown(force = false) {
  const log = $("transcript");
  if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
}

function remember(role, content) {
  state.messages.push({ role, content });
  state.messages = state.messages.slice(-MAX_KEPT);
  save("transcript:" + state.sessionId, state.messages);
}

function showTranscript() {
  const log = $("transcript");
  log.querySelectorAll(".msg").forEach((m) => m.remove());
  $("empty-note").hidden = state.messages.length > 0;
  for (const m of state.messages) bubble(m.role, m.content);
}

// -- counters and sparklines ----------------------------------------------------------------------------------
function setCounter(id, value, text) {
  const cell = $(id);
  cell.dataset.value = value;
  cell.textContent = text;
}

function showStats(stats) {
  setCounter("seen", stats.seen_tokens, formatInt(stats.seen_tokens));
  setCounter("evicted", stats.evicted_tokens, formatInt(stats.evicted_tokens));
  setCounter("cached", stats.cached_tokens, formatInt(stats.cached_tokens));
  setCounter("mib", stats.cache_bytes, formatMiB(stats.cache_bytes));
  setCounter("turns", stats.turns, formatInt(stats.turns));
  const rate = state.rate;
  setCounter("rate", rate === null ? "" : rate, rate === null ? "–" : rate >= 100 ? rate.toFixed(0) : rate.toFixed(1));
}

const ZERO = { seen_tokens: 0, evicted_tokens: 0, cached_tokens: 0, cache_bytes: 0, turns: 0 };

function spark(id, values, label, unit, format = formatInt) {
  const svg = $(id);
  const line = svg.querySelector("polyline");
  const range = $(id + "-range");
  if (!values.length) {
    line.setAttribute("points", "");
    svg.setAttribute("aria-label", "no turns yet");
    range.textContent = "";
    return;
  }
  const flat = values.every((v) => v === values[0]);
  const top = Math.max(...values) * (flat ? 2 : 1.1) || 1; // zero at the bottom; a flat series draws mid-height
  const step = values.length > 1 ? 200 / (values.length - 1) : 0;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(34 - (v / top) * 32).toFixed(2)}`);
  if (values.length === 1) points.push(`200,${points[0].split(",")[1]}`);
  line.setAttribute("points", points.join(" "));
  const first = format(values[0]), last = format(values[values.length - 1]);
  svg.setAttribute("aria-label", `${label} over ${values.length} turns: from ${first} to ${last} ${unit}`);
  range.textContent = `${first} → ${last}`;
}

function showSparks() {
  spark("spark-mib", state.points.map((p) => p.bytes), "cache size", "MiB", formatMiB);
  spark("spark-evicted", state.points.map((p) => p.evicted), "evicted tokens", "tokens");
}

// Read the session's counters; after a turn, record a sparkline point. With ``atLeastTurns`` (a stopped
// reply), wait a moment for the server to close the cut turn.
async function refreshStats(record = false, atLeastTurns = 0) {
  let stats = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    const response = await api("/v1/sessions/" + encodeURIComponent(state.sessionId));
    if (response.status === 401) return needKey();
    if (response.ok) stats = await response.json();
    if (response.status === 404 || (stats && stats.turns >= atLeastTurns)) break;
    await new Promise((done) => setTimeout(done, 150));
  }
  state.started = stats !== null;
  showStats(stats || ZERO);
  const last = state.points[state.points.length - 1];
  if (record && stats && (!last || last.turns !== stats.turns)) {
    state.points.push({ turns: stats.turns, bytes: stats.cache_bytes, evicted: stats.evicted_tokens });
    state.points = state.points.slice(-MAX_POINTS);
    save("points:" + state.sessionId, state.points);
  }
  showSparks();
  return stats;
}

// -- sessions -----------------------------------------------------------------------------------------------
function openSession(id) {
  state.sessionId = id;
  localStorage.setItem(PREFIX + "session", id);
  state.messages = load("transcript:" + id, []);
  state.points = load("points:" + id, []);
  state.rate = null;
  $("session-id").textContent = id;
  showTranscript();
  notify("");
}

async function refreshSessions() {
  const response = await api("/v1/sessions");
  if (response.status === 401) return needKey();
  if (!response.ok) return;
  const list = $("sessions");
  list.replaceChildren();
  const sessions = (await response.json()).data.slice(0, 50);
  if (!sessions.length) {
    const none = document.createElement("li");
    none.className = "small";
    none.textContent = "No sessions on the server yet.";
    list.append(none);
  }
  for (const s of sessions) {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "session" + (s.id === state.sessionId ? " current" : "");
    open.dataset.id = s.id;
    if (s.id === state.sessionId) open.setAttribute("aria-current", "true");
    const name = document.createElement("code");
    name.textContent = s.id;
    name.title = s.id;
    const info = document.createElement("span");
    info.className = "small";
    info.textContent = `${formatInt(s.turns)} turn${s.turns === 1 ? "" : "s"} · ${formatInt(s.seen_tokens)} tokens`;
    open.append(name, info);
    open.setAttribute("aria-label", `Open session ${s.id}, ${s.turns} turns`);
    open.addEventListener("click", () => reopen(s.id));
    item.append(open);
    list.append(item);
  }
}

async function reopen(id) {
  if (state.busy) return;
  openSession(id);
  const stats = await refreshStats(true);
  if (stats && !state.messages.length && stats.messages) {
    bubble("note", `This session's ${stats.messages} messages live on the server (this page has no copy of them). ` +
      "Keep talking: the model continues from its cache.");
  }
  refreshSessions();
  $("prompt").focus();
}

async function download() {
  const id = state.sessionId;
  const response = await api(`/v1/sessions/${encodeURIComponent(id)}/export`);
  if (response.status === 401) return needKey();
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 404 && error.code === "session_not_found") {
      return notify("Nothing to download yet: the server has no turn of this session.", "info");
    }
    if (response.status === 404 || response.status === 405) {
      $("download").hidden = true;
      return notify("This server cannot export sessions (it has no /v1/sessions/{id}/export endpoint).", "info");
    }
    return notify(`Download failed: ${error.message}`);
  }
  const disposition = response.headers.get("content-disposition") || "";
  const named = /filename="?([^";]+)"?/.exec(disposition);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = named ? named[1] : `${id}.safetensors`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  notify(`Downloaded ${link.download}.`, "info");
}

// -- a turn -------------------------------------------------------------------------------------------------
function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
  $("transcript").setAttribute("aria-busy", String(busy));
}

// Server-sent events from a fetch body: calls ``onEvent`` with each parsed ``data:`` payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (!data.length) continue;
      if (data.join("\n") === "[DONE]") return;
      onEvent(JSON.parse(data.join("\n")));
    }
    if (done) return;
  }
}

async function send(text) {
  if (state.busy || !text.trim()) return;
  notify("");
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (!state.started && system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: text });
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);

  const turnsBefore = Number($("turns").dataset.value) || 0;
  const asked = bubble("user", text);
  const reply = bubble("assistant", "");
  const out = reply.querySelector(".text");
  reply.setAttribute("aria-busy", "true");
  $("prompt").value = "";
  setBusy(true);
  state.controller = new AbortController();
  const started = performance.now();
  let pieces = 0, usage = null, failure = null, stopped = false, response = null;
  try {
    response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Session-Id": state.sessionId },
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      failure = await errorOf(response);
    } else {
      await readEvents(response, (event) => {
        if (event.error) failure = event.error;
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            out.textContent += piece;
            pieces++;
            scrollDown();
          }
        }
      });
    }
  } catch (error) {
    if (error.name === "AbortError") stopped = true;
    else failure = { message: `The connection failed (${error.message}). Is the server still running?` };
  }
  const seconds = (performance.now() - started) / 1000;
  state.controller = null;
  reply.removeAttribute("aria-busy");
  setBusy(false);

  if (response && !response.ok) { // nothing happened on the server: take the turn back, keep the text
    asked.remove();
    reply.remove();
    $("empty-note").hidden = state.messages.length > 0;
    $("prompt").value = text;
    if (response.status === 401) needKey();
    else notify(`The server refused the message (${response.status}): ${failure.message}`);
    $("prompt").focus();
    return;
  }
  remember("user", text);
  remember("assistant", out.textContent);
  const tokens = usage ? usage.completion_tokens : pieces;
  state.rate = seconds > 0 ? tokens / seconds : null;
  if (stopped) {
    reply.classList.add("stopped");
    notify("Stopped. The server kept the reply so far as this turn.", "info");
  } else if (failure) {
    reply.classList.add("failed");
    notify(`The reply failed: ${failure.message}`);
  }
  await refreshStats(true, stopped ? turnsBefore + 1 : 0);
  refreshSessions();
  $("prompt").focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newConversation() {
  if (state.busy) return;
  openSession(newSessionId());
  state.started = false;
  showStats(ZERO);
  showSparks();
  refreshSessions();
  $("prompt").focus();
}

// -- start --------------------------------------------------------------------------------------------------
// Check the server and the key; true when the API answers.
async function probe() {
  const response = await api("/v1/models");
  if (response.status === 401) return needKey() || false;
  if (!response.ok) return notify(`The server answered ${response.status} to /v1/models.`) || false;
  const models = (await response.json()).data;
  if (models.length) state.model = models[0].id;
  $("model-name").textContent = state.model;
  $("key-box").hidden = true; // the key works (or none is needed); a later 401 shows the field again
  notify("");
  await refreshStats();
  await refreshSessions();
  return true;
}

function start() {
  openSession(state.sessionId || newSessionId());
  $("api-key").value = state.key;
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send($("prompt").value);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send($("prompt").value);
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.busy) stop();
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("download").addEventListener("click", download);
  $("refresh-sessions").addEventListener("click", refreshSessions);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(PREFIX + "api-key", state.key);
    probe().then((ok) => ok && $("prompt").focus());
  });
  probe().catch((error) => notify(`Cannot reach the server (${error.message}).`));
}

start();
