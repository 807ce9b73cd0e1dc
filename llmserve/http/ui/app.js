// The chat page: conversations, the model picker, streaming replies, stats, the cache panel.
// Text from the model or from localStorage only ever reaches the page as text nodes
// (markdown.js builds elements; no HTML parsing API is used anywhere on the page).

import { Api, ApiError, errorText, sseData } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import {
  KEYS, load, loadConversations, newId, save, saveConversations, saveSettings, settingsFor,
} from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $("sidebar"), list: $("conversations"), newChat: $("new-chat"),
  cachePanel: $("cache-panel"), cacheStats: $("cache-stats"), cacheRefresh: $("cache-refresh"),
  model: $("model"), modelState: $("model-state"), settingsToggle: $("settings-toggle"),
  keyButton: $("key-button"), settings: $("settings"), system: $("system"),
  temperature: $("temperature"), topP: $("top_p"), maxTokens: $("max_tokens"),
  settingsReset: $("settings-reset"), messages: $("messages"), empty: $("empty"),
  composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  banner: $("banner"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
  keyReason: $("key-reason"), keyInput: $("key-input"),
};

const state = {
  conversations: loadConversations(),
  current: load(KEYS.current, null),
  model: load(KEYS.model, null),
  details: new Map(),       // model name -> its /models entry
  streaming: null,          // {controller, conversation, message, element}
  switching: false,
};

const api = new Api(askKey);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(cls, text, onClick, title) {
  const b = el("button", cls, text);
  b.type = "button";
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function showBanner(text) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
}

// ---------------------------------------------------------------- API key

function askKey(reason) {
  ui.keyReason.textContent = reason;
  ui.keyInput.value = "";
  ui.keyButton.hidden = false;
  return new Promise((resolve) => {
    ui.keyDialog.addEventListener("close", () => {
      const key = ui.keyDialog.returnValue === "save" ? ui.keyInput.value.trim() : "";
      resolve(key || null);
    }, { once: true });
    ui.keyDialog.returnValue = "";
    if (!ui.keyDialog.open) ui.keyDialog.showModal();
    ui.keyInput.focus();
  });
}

ui.keyButton.addEventListener("click", async () => {
  if (await api.newKey("Enter a new API key.")) refreshAll();
});

// ---------------------------------------------------------------- conversations

function currentConversation() {
  return state.conversations.find((c) => c.id === state.current) || null;
}

function persist() {
  saveConversations(state.conversations);
  save(KEYS.current, state.current);
}

function renderSidebar() {
  ui.list.replaceChildren();
  for (const conv of state.conversations) {
    const li = el("li");
    li.dataset.id = conv.id;
    if (conv.id === state.current) li.classList.add("active");
    const open = button("open", conv.title || "New chat", () => openConversation(conv.id));
    open.title = conv.title;
    const del = button("delete", "×", () => deleteConversation(conv.id), "Delete conversation");
    del.setAttribute("aria-label", `Delete conversation ${conv.title}`);
    li.append(open, del);
    ui.list.appendChild(li);
  }
}

function openConversation(id) {
  if (state.streaming) return;
  state.current = id;
  persist();
  renderSidebar();
  renderMessages();
}

function newConversation() {
  if (state.streaming) return;
  state.current = null;
  persist();
  renderSidebar();
  renderMessages();
  ui.input.focus();
}

function deleteConversation(id) {
  if (state.streaming && state.streaming.conversation.id === id) stop();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.conversations[0]?.id ?? null;
  persist();
  renderSidebar();
  renderMessages();
}

function touch(conv) {
  conv.updated = Date.now();
  state.conversations = [conv, ...state.conversations.filter((c) => c !== conv)];
}

// ---------------------------------------------------------------- messages

function renderMessages() {
  const conv = currentConversation();
  ui.messages.replaceChildren();
  const messages = conv ? conv.messages : [];
  messages.forEach((m, i) => ui.messages.appendChild(messageElement(conv, m, i)));
  ui.empty.hidden = messages.length > 0;
}

function messageElement(conv, message, index) {
  const art = el("article", `msg ${message.role}`);
  art.dataset.index = String(index);
  const meta = el("div", "meta");
  meta.appendChild(el("span", "role", message.role === "user" ? "You" : "Assistant"));
  if (message.role === "assistant" && message.model) {
    meta.appendChild(el("span", "model-name", message.model));
  }
  art.appendChild(meta);
  if (message.role === "user") {
    art.appendChild(el("div", "text", message.content));
    const actions = el("div", "actions");
    actions.appendChild(button("edit", "Edit", () => editMessage(conv, index, art)));
    art.appendChild(actions);
  } else {
    fillAssistant(art, conv, message, index);
  }
  return art;
}

function fillAssistant(art, conv, message, index) {
  for (const node of art.querySelectorAll(":scope > :not(.meta)")) node.remove();
  const live = state.streaming && state.streaming.message === message;
  art.dataset.streaming = live ? "true" : "false";
  if (message.id) art.dataset.completionId = message.id;
  if (message.reasoning) {
    const details = el("details", "reasoning");
    details.appendChild(el("summary", null, live && !message.content ? "Thinking…" : "Reasoning"));
    const body = el("div", "md");
    body.appendChild(renderMarkdown(message.reasoning));
    details.appendChild(body);
    art.appendChild(details);
  }
  const content = el("div", "md content");
  content.appendChild(renderMarkdown(message.content));
  if (live) {
    // the cursor goes at the end of the last paragraph or list item, not on a line of its own
    let end = content;
    while (end.lastElementChild && /^(P|UL|OL|LI|BLOCKQUOTE|H[1-6])$/.test(end.lastElementChild.tagName)) {
      end = end.lastElementChild;
    }
    end.appendChild(el("span", "cursor", "▍"));
  }
  art.appendChild(content);
  if (message.tool_calls.length) {
    const calls = el("div", "tool-calls");
    for (const call of message.tool_calls) {
      const box = el("div", "tool-call");
      box.appendChild(el("div", "tool-name", `Tool call: ${call.name || "(unnamed)"}`));
      box.appendChild(el("pre", "tool-args", prettyJson(call.arguments)));
      calls.appendChild(box);
    }
    art.appendChild(calls);
  }
  if (message.error) art.appendChild(el("p", "error", message.error));
  if (!live) {
    art.appendChild(statsElement(message.stats));
    const actions = el("div", "actions");
    actions.appendChild(button("copy", "Copy", (e) => copyText(message.content, e.target)));
    actions.appendChild(button("regenerate", "Regenerate", () => regenerate(conv, index)));
    art.appendChild(actions);
  }
}

function prettyJson(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text; }
}

function statsElement(stats) {
  const box = el("div", "stats");
  const add = (key, label, value) => {
    if (value === null || value === undefined || value === "") return;
    const span = el("span", "stat");
    span.dataset.stat = key;
    span.appendChild(el("b", null, String(value)));
    span.appendChild(document.createTextNode(` ${label}`));
    box.appendChild(span);
  };
  add("prompt_tokens", "prompt", stats.prompt_tokens);
  add("cached_tokens", "cached", stats.cached_tokens);
  add("completion_tokens", "completion", stats.completion_tokens);
  add("ttft_ms", "ms to first token", stats.ttft_ms === null ? null : Math.round(stats.ttft_ms));
  add("tokens_per_s", "tokens/s", stats.tokens_per_s === null ? null
    : stats.tokens_per_s.toFixed(1));
  add("finish_reason", "", stats.finish_reason);
  return box;
}

async function copyText(text, target) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    const area = el("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    ok = document.execCommand("copy");
    area.remove();
  }
  if (target) {
    const before = target.textContent;
    target.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { target.textContent = before; }, 1200);
  }
}

ui.messages.addEventListener("click", (e) => {
  const b = e.target.closest("button.copy-code");
  if (b) copyText(b.closest(".code-block").querySelector("code").textContent, b);
});

function editMessage(conv, index, art) {
  if (state.streaming) return;
  const text = art.querySelector(".text");
  const actions = art.querySelector(".actions");
  const area = el("textarea", "edit-area");
  area.value = conv.messages[index].content;
  area.rows = Math.min(12, Math.max(2, area.value.split("\n").length));
  const sendEdit = button("save-edit", "Send", () => {
    const value = area.value.trim();
    if (!value) return;
    conv.messages = conv.messages.slice(0, index);
    conv.messages.push({ role: "user", content: value });
    if (index === 0) conv.title = titleOf(value);
    generate(conv);
  });
  const cancel = button("cancel-edit", "Cancel", () => renderMessages());
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendEdit.click();
    }
    if (e.key === "Escape") { e.stopPropagation(); cancel.click(); }
  });
  const row = el("div", "actions");
  row.append(sendEdit, cancel);
  text.replaceWith(area);
  actions.replaceWith(row);
  area.focus();
}

function regenerate(conv, index) {
  if (state.streaming) return;
  conv.messages = conv.messages.slice(0, index);
  generate(conv);
}

function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

// ---------------------------------------------------------------- sending and streaming

function requestMessages(conv) {
  const out = [];
  const system = settingsFor(state.model).system.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of conv.messages) {
    if (m.role === "assistant" && !m.content) continue;  // stopped before any text, or failed
    out.push({ role: m.role, content: m.content });
  }
  return out;
}

function send(text) {
  if (state.streaming || !text.trim()) return;
  let conv = currentConversation();
  if (!conv) {
    conv = { id: newId(), title: titleOf(text), updated: Date.now(), messages: [] };
    state.conversations.unshift(conv);
    state.current = conv.id;
  }
  conv.messages.push({ role: "user", content: text });
  ui.input.value = "";
  generate(conv);
}

function setStreaming(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  document.body.classList.toggle("streaming", on);
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

async function generate(conv) {
  const message = {
    role: "assistant", content: "", reasoning: "", tool_calls: [], model: state.model || "",
    error: "",
    stats: { prompt_tokens: null, cached_tokens: null, completion_tokens: null, ttft_ms: null,
      tokens_per_s: null, finish_reason: "" },
  };
  const settings = settingsFor(state.model);
  const body = {
    messages: requestMessages(conv), stream: true, stream_options: { include_usage: true },
  };
  if (state.model) body.model = state.model;
  for (const k of ["temperature", "top_p", "max_tokens"]) {
    if (settings[k] !== null) body[k] = settings[k];
  }
  conv.messages.push(message);
  const controller = new AbortController();
  state.streaming = { controller, conversation: conv, message };
  touch(conv);
  persist();
  renderSidebar();
  renderMessages();
  const element = ui.messages.lastElementChild;
  setStreaming(true);
  showBanner("");
  element.scrollIntoView({ block: "end" });

  const started = performance.now();
  let first = null;
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (state.streaming && state.streaming.message === message) {
        // follow the reply only while the user has not scrolled up to read
        const box = ui.messages;
        const follow = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
        fillAssistant(element, conv, message, conv.messages.indexOf(message));
        if (follow) box.scrollTop = box.scrollHeight;
      }
    });
  };
  try {
    const res = await api.post("v1/chat/completions", body, { signal: controller.signal });
    if (!res.ok) throw new ApiError(await errorText(res), res.status);
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || "stream error", 500);
      if (chunk.model) message.model = chunk.model;
      if (chunk.id) message.id = String(chunk.id);
      for (const choice of chunk.choices || []) {
        if (choice.index) continue;  // the page asks for one choice
        const delta = choice.delta || {};
        if (delta.content) message.content += delta.content;
        if (delta.reasoning_content) message.reasoning += delta.reasoning_content;
        for (const call of delta.tool_calls || []) mergeToolCall(message.tool_calls, call);
        if (first === null && (delta.content || delta.reasoning_content || delta.tool_calls)) {
          first = performance.now();
          message.stats.ttft_ms = first - started;
        }
        if (choice.finish_reason) message.stats.finish_reason = choice.finish_reason;
      }
      if (chunk.usage) {
        const u = chunk.usage;
        message.stats.prompt_tokens = u.prompt_tokens ?? null;
        message.stats.completion_tokens = u.completion_tokens ?? null;
        message.stats.cached_tokens = u.prompt_tokens_details?.cached_tokens ?? null;
      }
      redraw();
    }
    const end = performance.now();
    const n = message.stats.completion_tokens;
    if (first !== null && n && n > 1 && end > first) {
      // NOTE: the first token's time is the TTFT; the rate counts the tokens after it.
      message.stats.tokens_per_s = (n - 1) / ((end - first) / 1000);
    }
  } catch (err) {
    if (err.name === "AbortError") {
      message.stats.finish_reason = "stopped";
    } else {
      message.error = err.message || String(err);
      if (err.status === 401) showBanner("An API key is needed to chat.");
    }
  } finally {
    state.streaming = null;
    setStreaming(false);
    touch(conv);
    persist();
    renderSidebar();
    if (currentConversation() === conv) renderMessages();
    refreshCache();
    refreshStatus();
  }
}

function mergeToolCall(calls, delta) {
  const i = Number.isInteger(delta.index) ? delta.index : calls.length;
  while (calls.length <= i) calls.push({ id: "", name: "", arguments: "" });
  const call = calls[i];
  if (delta.id) call.id = String(delta.id);
  if (delta.function?.name) call.name += String(delta.function.name);
  if (delta.function?.arguments) call.arguments += String(delta.function.arguments);
}

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send(ui.input.value);
});
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send(ui.input.value);
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.streaming) {
    e.preventDefault();
    stop();
  }
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newConversation);

// ---------------------------------------------------------------- models and settings

function setModelState(name, text) {
  ui.modelState.dataset.state = name;
  ui.modelState.textContent = text;
}

async function refreshStatus() {
  try {
    const res = await fetch(api.url("/"), { headers: { Accept: "application/json" } });
    const s = await res.json();
    if (state.switching) return s;
    if (s.state === "ready") setModelState("ready", `ready: ${s.model}`);
    else if (s.state === "error") setModelState("error", `error: ${s.error || "load failed"}`);
    else setModelState(s.state, `${s.state}…`);
    return s;
  } catch {
    setModelState("offline", "server unreachable");
    return null;
  }
}

function optionLabel(name) {
  const d = state.details.get(name);
  if (!d) return name;
  const bits = [d.size_label, d.loaded ? "loaded" : null].filter(Boolean);
  return bits.length ? `${name} (${bits.join(", ")})` : name;
}

async function loadModels() {
  const [list, catalog] = await Promise.all([
    api.json("v1/models"),
    api.json("models").catch(() => null),
  ]);
  const ids = (list.data || []).map((m) => String(m.id));
  state.details.clear();
  for (const m of (catalog && catalog.models) || []) {
    if (m && m.present) state.details.set(String(m.file || m.name), m);
  }
  if (!state.model || !ids.includes(state.model)) state.model = ids[0] || null;
  ui.model.replaceChildren();
  for (const id of ids) {
    const opt = el("option", null, optionLabel(id));
    opt.value = id;
    const d = state.details.get(id);
    if (d && d.description) opt.title = String(d.description);
    ui.model.appendChild(opt);
  }
  ui.model.value = state.model || "";
  save(KEYS.model, state.model);
  fillSettings();
}

async function switchModel(name) {
  state.model = name;
  save(KEYS.model, name);
  fillSettings();
  state.switching = true;
  ui.model.disabled = true;
  setModelState("loading", `loading ${name}…`);
  const poll = setInterval(async () => {
    try {
      const s = await (await fetch(api.url("/"), { headers: { Accept: "application/json" } }))
        .json();
      if (state.switching && s.state !== "ready") setModelState("loading", `${s.state} ${name}…`);
    } catch { /* the POST below reports errors */ }
  }, 300);
  try {
    const res = await api.post("setModel", { modelName: name });
    if (!res.ok) throw new ApiError(await errorText(res), res.status);
    showBanner("");
  } catch (err) {
    showBanner(`Could not switch to ${name}: ${err.message}`);
  } finally {
    clearInterval(poll);
    state.switching = false;
    ui.model.disabled = false;
    await refreshStatus();
    loadModels().catch(() => {});
  }
}

ui.model.addEventListener("change", () => switchModel(ui.model.value));

function fillSettings() {
  const s = settingsFor(state.model || "");
  ui.system.value = s.system;
  ui.temperature.value = s.temperature ?? "";
  ui.topP.value = s.top_p ?? "";
  ui.maxTokens.value = s.max_tokens ?? "";
  ui.temperature.placeholder = ui.topP.placeholder = ui.maxTokens.placeholder = "default";
  ui.settings.setAttribute("aria-label", `Settings for ${state.model || "the model"}`);
}

function readNumber(input) {
  if (input.value === "") return null;
  const v = Number(input.value);
  return Number.isFinite(v) ? v : null;
}

function storeSettings() {
  if (!state.model) return;
  saveSettings(state.model, {
    system: ui.system.value,
    temperature: readNumber(ui.temperature),
    top_p: readNumber(ui.topP),
    max_tokens: readNumber(ui.maxTokens),
  });
}

for (const input of [ui.system, ui.temperature, ui.topP, ui.maxTokens]) {
  input.addEventListener("input", storeSettings);
}
ui.settingsReset.addEventListener("click", () => {
  for (const input of [ui.system, ui.temperature, ui.topP, ui.maxTokens]) input.value = "";
  storeSettings();
});
ui.settingsToggle.addEventListener("click", () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.settingsToggle.setAttribute("aria-expanded", String(!ui.settings.hidden));
});

// ---------------------------------------------------------------- prompt cache panel

function formatBytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function refreshCache() {
  if (!ui.cachePanel.open) return;
  try {
    const s = await api.json("cache");
    const rows = [
      ["mode", s.mode],
      ["hits", s.hits], ["misses", s.misses],
      ["tokens reused", s.tokens_reused], ["tokens evaluated", s.tokens_evaluated],
    ];
    if (s.ram) rows.push(["RAM entries", s.ram.entries], ["RAM size", formatBytes(s.ram.bytes)]);
    if (s.disk) {
      rows.push(["disk entries", s.disk.entries], ["disk size", formatBytes(s.disk.bytes)]);
    }
    ui.cacheStats.replaceChildren();
    for (const [k, v] of rows) {
      const dt = el("dt", null, k);
      const dd = el("dd", null, v === undefined || v === null ? "–" : String(v));
      dd.dataset.key = k;
      ui.cacheStats.append(dt, dd);
    }
  } catch (err) {
    ui.cacheStats.replaceChildren(el("dd", "error", err.message));
  }
}

ui.cachePanel.addEventListener("toggle", refreshCache);
ui.cacheRefresh.addEventListener("click", refreshCache);

// ---------------------------------------------------------------- start

async function refreshAll() {
  try {
    await loadModels();
    showBanner("");
  } catch (err) {
    showBanner(`Could not list models: ${err.message}`);
  }
  refreshCache();
}

renderSidebar();
renderMessages();
refreshStatus();
refreshAll();
setInterval(() => { if (!state.switching && !document.hidden) refreshStatus(); }, 15000);
document.body.dataset.ready = "true";
