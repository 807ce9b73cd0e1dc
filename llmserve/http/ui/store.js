// What the page keeps in localStorage: conversations, settings per model, the API key.
// Stored data is treated like model output (rendered as text only), and checked for shape.

const PREFIX = "llmserve.";
export const KEYS = {
  conversations: `${PREFIX}conversations`,
  current: `${PREFIX}current`,
  settings: `${PREFIX}settings`,
  model: `${PREFIX}model`,
  apiKey: `${PREFIX}apiKey`,
};

export function load(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

export function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (err) {
    console.warn("localStorage is full or unavailable:", err);
  }
}

export function loadText(key) {
  try { return localStorage.getItem(key) ?? ""; } catch { return ""; }
}

export function saveText(key, value) {
  try {
    if (value) localStorage.setItem(key, value); else localStorage.removeItem(key);
  } catch (err) {
    console.warn("localStorage is unavailable:", err);
  }
}

const str = (v) => (typeof v === "string" ? v : v == null ? "" : String(v));
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

function cleanMessage(m) {
  const role = m && m.role === "assistant" ? "assistant" : "user";
  const out = { role, content: str(m && m.content) };
  if (role === "assistant") {
    out.reasoning = str(m.reasoning);
    out.model = str(m.model);
    out.error = str(m.error);
    out.id = str(m.id);
    out.tool_calls = Array.isArray(m.tool_calls)
      ? m.tool_calls.map((t) => ({ id: str(t && t.id), name: str(t && t.name),
        arguments: str(t && t.arguments) }))
      : [];
    const s = (m.stats && typeof m.stats === "object") ? m.stats : {};
    out.stats = {
      prompt_tokens: num(s.prompt_tokens), cached_tokens: num(s.cached_tokens),
      completion_tokens: num(s.completion_tokens), ttft_ms: num(s.ttft_ms),
      tokens_per_s: num(s.tokens_per_s), finish_reason: str(s.finish_reason),
    };
  }
  return out;
}

export function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

/** Conversations from localStorage, newest first, malformed entries dropped. */
export function loadConversations() {
  const raw = load(KEYS.conversations, []);
  if (!Array.isArray(raw)) return [];
  return raw.filter((c) => c && typeof c === "object").map((c) => ({
    id: str(c.id) || newId(),
    title: str(c.title),
    updated: num(c.updated) ?? 0,
    messages: Array.isArray(c.messages) ? c.messages.map(cleanMessage) : [],
  })).sort((a, b) => b.updated - a.updated);
}

export function saveConversations(conversations) {
  save(KEYS.conversations, conversations);
}

/** Sampling settings and system prompt of one model; empty fields use the server's default. */
export function settingsFor(model) {
  const all = load(KEYS.settings, {});
  const s = (all && typeof all === "object" && all[model]) || {};
  return {
    system: str(s.system),
    temperature: num(s.temperature),
    top_p: num(s.top_p),
    max_tokens: num(s.max_tokens),
  };
}

export function saveSettings(model, settings) {
  const all = load(KEYS.settings, {});
  const next = (all && typeof all === "object") ? all : {};
  next[model] = settings;
  save(KEYS.settings, next);
}
