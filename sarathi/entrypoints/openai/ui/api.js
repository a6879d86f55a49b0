// Talking to the server this page came from: the API key, JSON calls and OpenAI SSE streams.
// Every request goes to a relative path (same origin); the CSP's connect-src 'self' enforces it.

const KEY_STORE = "sarathi.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

// Called with the error when the server answers 401 (app.js asks for the key).
let onUnauthorized = () => {};
export function handleUnauthorized(fn) {
  onUnauthorized = fn;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

/** fetch() with the key; throws ApiError on a non-2xx answer. */
export async function request(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const resp = await fetch(path, {
    method, headers, signal, cache: "no-store", credentials: "omit",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) {
    const err = new ApiError(resp.status, await errorMessage(resp));
    if (resp.status === 401) onUnauthorized(err);
    throw err;
  }
  return resp;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

/** The JSON payloads of an SSE response (`data: ...` events) until `data: [DONE]`. */
export async function* sseEvents(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}
