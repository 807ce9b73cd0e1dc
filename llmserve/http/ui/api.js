// The server's HTTP API as the page uses it: the API key, 401 handling, and SSE over fetch.

import { KEYS, loadText, saveText } from "./store.js";

// The page lives at <root>/ui/; the API at <root>/.
const ROOT = new URL("../", document.baseURI);

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export class Api {
  /** askKey(reason) resolves to a key, or null when the user gives up. */
  constructor(askKey) {
    this.askKey = askKey;
    this.pendingKey = null;
    this.keyRequired = false;
  }

  get key() { return loadText(KEYS.apiKey); }

  url(path) { return new URL(path.replace(/^\//, ""), ROOT).href; }

  // One dialog for every request that got a 401 at the same time.
  async newKey(reason) {
    if (!this.pendingKey) {
      this.pendingKey = Promise.resolve(this.askKey(reason)).finally(() => {
        this.pendingKey = null;
      });
    }
    const key = await this.pendingKey;
    if (key) saveText(KEYS.apiKey, key);
    return key;
  }

  /** fetch() with the key; a 401 asks for a key and tries again. */
  async request(path, options = {}) {
    for (;;) {
      const headers = new Headers(options.headers || {});
      if (!headers.has("Accept")) headers.set("Accept", "application/json");
      const key = this.key;
      if (key) headers.set("Authorization", `Bearer ${key}`);
      const res = await fetch(this.url(path), { ...options, headers });
      if (res.status !== 401) return res;
      this.keyRequired = true;
      const reason = key ? "The server rejected the stored API key." : "This server needs an API key.";
      const sentKey = key;
      if (this.key !== sentKey && this.key) continue;  // another request got a new key meanwhile
      const fresh = await this.newKey(reason);
      if (!fresh) throw new ApiError(await errorText(res), 401);
    }
  }

  async json(path, options = {}) {
    const res = await this.request(path, options);
    if (!res.ok) throw new ApiError(await errorText(res), res.status);
    return res.json();
  }

  post(path, body, options = {}) {
    return this.request(path, {
      ...options, method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", ...(options.headers || {}) },
    });
  }
}

/** The `error.message` of an OpenAI-style error body, or the status line. */
export async function errorText(res) {
  try {
    const body = await res.clone().json();
    if (body && body.error && body.error.message) return String(body.error.message);
  } catch { /* not JSON */ }
  return `HTTP ${res.status} ${res.statusText}`.trim();
}

/** The `data:` payloads of a text/event-stream response, as they arrive. */
export async function* sseData(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // NOTE: split on "\n" only, so a "\r\n" cut between two reads stays one line end.
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line[5] === " " ? 6 : 5));
        }
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.cancel().catch(() => {});  // NOTE: ends the body when the caller stops early
  }
}
