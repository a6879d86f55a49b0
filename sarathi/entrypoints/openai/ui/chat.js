// The chat playground: conversations kept in localStorage, streamed answers from
// /v1/chat/completions (or /v1/completions in raw mode), a stop button that aborts the
// fetch (the server then aborts the request), and a per-token view of logprobs.

import { ApiError, request, sseEvents } from "./api.js";
import { alphaLine } from "./charts.js";
import { renderMarkdown } from "./markdown.js";

const STORE = "sarathi.conversations";
const SETTINGS = "sarathi.settings";
const SAMPLING = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "presence_penalty",
  "frequency_penalty", "repetition_penalty"];
const KEPT_WITH_TARGET = ["max_tokens", "seed"];
const EXPORT_FORMAT = "sarathi-ui-conversations";

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

/** A conversation as stored and exported. */
function conversation(mode = "chat", system = "") {
  return { id: newId(), title: "New conversation", created: Date.now(), mode, system, messages: [] };
}

/** Keep only the fields we know, with the types we expect (imported files are untrusted data). */
function cleanConversation(c) {
  if (!c || typeof c !== "object" || !Array.isArray(c.messages)) return null;
  const str = (v, max = 1e6) => (typeof v === "string" ? v.slice(0, max) : "");
  const messages = c.messages.filter((m) => m && typeof m.role === "string" && typeof m.content === "string")
    .map((m) => {
      const out = { role: str(m.role, 20), content: str(m.content) };
      if (typeof m.model === "string") out.model = str(m.model, 200);
      // a stream cut by a reload or saved mid-way does not go on
      if (typeof m.finish === "string") out.finish = m.finish === "streaming" ? "stopped" : str(m.finish, 40);
      if (Number.isInteger(m.promptChars)) out.promptChars = m.promptChars;
      if (Array.isArray(m.tokens)) {
        out.tokens = m.tokens.filter((t) => t && typeof t.text === "string").map((t) => ({
          text: t.text, logprob: typeof t.logprob === "number" ? t.logprob : null, prompt: !!t.prompt,
          top: Array.isArray(t.top) ? t.top.filter((a) => Array.isArray(a) && typeof a[0] === "string" &&
            typeof a[1] === "number").map((a) => [a[0], a[1]]) : [],
        }));
      }
      if (Array.isArray(m.alpha)) out.alpha = m.alpha.filter((a) => typeof a === "number");
      const numbers = (o, keys) => Object.fromEntries(keys.map((k) => [k, typeof o[k] === "number" ? o[k] : null]));
      if (m.usage && typeof m.usage === "object") {
        out.usage = numbers(m.usage, ["prompt_tokens", "completion_tokens", "total_tokens"]);
      }
      if (m.stats && typeof m.stats === "object") out.stats = numbers(m.stats, ["ttft_ms", "seconds"]);
      return out;
    });
  return {
    id: typeof c.id === "string" ? str(c.id, 64) : newId(), title: str(c.title, 200) || "Imported conversation",
    created: Number.isFinite(c.created) ? c.created : Date.now(), mode: c.mode === "completion" ? "completion" : "chat",
    system: str(c.system), messages,
  };
}

export class Chat {
  constructor() {
    this.conversations = this.load();
    this.current = this.conversations[0] || this.addConversation();
    this.controller = null;           // the AbortController of the request in flight
    this.renderQueued = new Set();
    this.models = [];
    this.ntokens = new Set();         // AdaptiVocab n-tokens, by the text logprobs give them
    this.loadSettings();
    this.bind();
    this.renderAll();
  }

  // ---- storage ---------------------------------------------------------------
  load() {
    try {
      const list = JSON.parse(localStorage.getItem(STORE) || "[]");
      return Array.isArray(list) ? list.map(cleanConversation).filter(Boolean) : [];
    } catch {
      return [];
    }
  }

  save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(this.conversations));
    } catch (err) {
      this.showError(`Could not save conversations in this browser: ${err.message}`);
    }
  }

  loadSettings() {
    let s = {};
    try { s = JSON.parse(localStorage.getItem(SETTINGS) || "{}") || {}; } catch { /* defaults */ }
    for (const name of SAMPLING) if (typeof s[name] === "string") $(name).value = s[name];
    for (const name of ["markdown", "logprobs"]) if (typeof s[name] === "boolean") $(name).checked = s[name];
    if (typeof s.top_logprobs === "string") $("top_logprobs").value = s.top_logprobs;
    this.savedModel = s.model;
    this.savedTarget = s.os_target;
  }

  saveSettings() {
    const s = { model: $("model").value, os_target: $("os_target").value, top_logprobs: $("top_logprobs").value,
      markdown: $("markdown").checked, logprobs: $("logprobs").checked };
    for (const name of SAMPLING) s[name] = $(name).value;
    localStorage.setItem(SETTINGS, JSON.stringify(s));
  }

  addConversation(mode = "chat") {
    const c = conversation(mode);
    this.conversations.unshift(c);
    this.current = c;
    this.save();
    return c;
  }

  // ---- wiring ----------------------------------------------------------------
  bind() {
    $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); this.send(); });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        this.send();
      }
    });
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && this.controller) {
        ev.preventDefault();
        this.stop();
      }
    });
    $("stop").addEventListener("click", () => this.stop());
    $("conv-new").addEventListener("click", () => {
      this.addConversation($("mode").value);
      this.renderAll();
      $("prompt").focus();
    });
    $("conv-delete").addEventListener("click", () => this.deleteCurrent());
    $("conv-export").addEventListener("click", () => this.exportAll());
    $("conv-import").addEventListener("change", (ev) => this.importFile(ev.target));
    $("mode").addEventListener("change", () => {
      const mode = $("mode").value;
      if (this.current.messages.length) this.addConversation(mode);
      else { this.current.mode = mode; this.save(); }
      this.renderAll();
    });
    $("system").addEventListener("input", () => { this.current.system = $("system").value; this.save(); });
    for (const id of [...SAMPLING, "model", "os_target", "top_logprobs", "markdown", "logprobs"]) {
      $(id).addEventListener("change", () => {
        this.saveSettings();
        if (id === "markdown") this.renderMessages();
      });
    }
    $("side-toggle").addEventListener("click", () => {
      const open = document.body.classList.toggle("side-open");
      $("side-toggle").setAttribute("aria-expanded", String(open));
    });
  }

  /** /v1/models: base models and adapters for the picker, targets for optimal sampling. */
  setModels(models) {
    this.models = models;
    const pick = $("model");
    const previous = pick.value || this.savedModel;
    pick.replaceChildren();
    for (const m of models.filter((x) => !x.optimal_sampling_target)) {
      const label = m.parent ? `${m.id} (LoRA adapter of ${m.parent})` : m.id;
      pick.append(new Option(label, m.id));
    }
    if ([...pick.options].some((o) => o.value === previous)) pick.value = previous;
    const target = $("os_target");
    const prevTarget = target.value || this.savedTarget || "";
    target.replaceChildren(new Option("off", ""));
    for (const m of models.filter((x) => x.optimal_sampling_target || x.parent)) target.append(new Option(m.id, m.id));
    target.value = [...target.options].some((o) => o.value === prevTarget) ? prevTarget : "";
  }

  setNtokens(texts) {
    this.ntokens = new Set(texts);
    this.renderMessages();
  }

  // ---- sending ---------------------------------------------------------------
  samplingFields() {
    // optimal sampling draws from q* of the two models as they are: nothing may reshape them
    const target = $("os_target").value;
    const body = {};
    for (const name of SAMPLING) {
      const raw = $(name).value.trim();
      if (raw === "" || (target && !KEPT_WITH_TARGET.includes(name))) continue;
      body[name] = ["top_k", "max_tokens", "seed"].includes(name) ? parseInt(raw, 10) : parseFloat(raw);
    }
    if (target) body.optimal_sampling = { target_model: target, alpha: "auto" };
    return body;
  }

  async send() {
    const text = $("prompt").value;
    if (this.controller || !text.trim()) return;
    const conv = this.current;
    const model = $("model").value;
    if (!model) {
      this.showError("No model to send to yet (is the server still loading?)");
      return;
    }
    this.showError("");
    const chat = conv.mode === "chat";
    const wantLogprobs = $("logprobs").checked;
    const top = Math.max(0, parseInt($("top_logprobs").value || "0", 10));
    let path;
    let body;
    if (chat) {
      conv.messages.push({ role: "user", content: text });
      const messages = [];
      if (conv.system.trim()) messages.push({ role: "system", content: conv.system });
      for (const m of conv.messages) messages.push({ role: m.role, content: m.content });
      path = "/v1/chat/completions";
      body = { model, messages, stream: true, stream_options: { include_usage: true }, ...this.samplingFields() };
      if (wantLogprobs) Object.assign(body, { logprobs: true, top_logprobs: top });
    } else {
      conv.messages.push({ role: "prompt", content: text });
      path = "/v1/completions";
      // echo: the server sends the prompt back first, so everything shown is what it returned
      body = { model, prompt: text, echo: true, stream: true, stream_options: { include_usage: true },
        ...this.samplingFields() };
      if (wantLogprobs) body.logprobs = top;
    }
    if (conv.title === "New conversation") conv.title = text.trim().slice(0, 60);
    const msg = { role: chat ? "assistant" : "completion", content: "", model, tokens: wantLogprobs ? [] : undefined,
      finish: "streaming" };
    conv.messages.push(msg);
    $("prompt").value = "";
    this.save();
    this.renderAll();
    await this.stream(path, body, msg, chat);
  }

  async stream(path, body, msg, chat) {
    const controller = new AbortController();
    this.controller = controller;
    this.setBusy(true);
    const started = performance.now();
    let first = null;
    let echoed = !chat;     // raw mode: the first chunk is the echoed prompt
    try {
      const resp = await request(path, { method: "POST", body, signal: controller.signal });
      for await (const event of sseEvents(resp)) {
        if (event.error) throw new ApiError(event.error.code || 500, event.error.message);
        if (event.usage) {
          const { prompt_tokens, completion_tokens, total_tokens } = event.usage;
          msg.usage = { prompt_tokens, completion_tokens, total_tokens };
        }
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        const delta = chat ? choice.delta.content || "" : choice.text || "";
        if (echoed) {
          msg.promptChars = delta.length;
        } else if (delta && first === null) {
          first = performance.now();
        }
        msg.content += delta;
        this.addTokens(msg, choice.logprobs, chat, echoed);
        if (choice.optimal_sampling) msg.alpha = (msg.alpha || []).concat(choice.optimal_sampling.alpha_history);
        if (choice.finish_reason) msg.finish = choice.finish_reason;
        echoed = false;
        this.queueRender(msg);
      }
      if (msg.finish === "streaming") msg.finish = "ended";
    } catch (err) {
      if (err.name === "AbortError") {
        msg.finish = "stopped";
      } else {
        msg.finish = "error";
        this.showError(err.message);
      }
    } finally {
      const end = performance.now();
      msg.stats = { ttft_ms: first === null ? null : first - started,
        seconds: first === null ? null : (end - first) / 1000 };
      this.controller = null;
      this.setBusy(false);
      this.save();
      this.renderMessages();
      $("prompt").focus();
    }
  }

  addTokens(msg, logprobs, chat, prompt) {
    if (!msg.tokens || !logprobs) return;
    if (chat) {
      for (const t of logprobs.content || []) {
        msg.tokens.push({ text: t.token, logprob: t.logprob, prompt: false,
          top: (t.top_logprobs || []).map((a) => [a.token, a.logprob]) });
      }
    } else {
      (logprobs.tokens || []).forEach((text, i) => {
        const top = logprobs.top_logprobs[i] ? Object.entries(logprobs.top_logprobs[i]) : [];
        top.sort((a, b) => b[1] - a[1]);
        msg.tokens.push({ text, logprob: logprobs.token_logprobs[i], top, prompt });
      });
    }
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    document.body.classList.toggle("streaming", busy);
  }

  showError(text) {
    $("chat-error").textContent = text;
    $("chat-error").hidden = !text;
  }

  // ---- conversations ---------------------------------------------------------
  deleteCurrent() {
    if (this.controller) return;
    this.conversations = this.conversations.filter((c) => c !== this.current);
    this.current = this.conversations[0] || this.addConversation($("mode").value);
    this.save();
    this.renderAll();
  }

  exportAll() {
    const data = JSON.stringify({ format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(),
      conversations: this.conversations }, null, 2);
    const url = URL.createObjectURL(new Blob([data], { type: "application/json" }));
    const a = el("a");
    a.href = url;
    a.download = `sarathi-conversations-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")}.json`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  async importFile(input) {
    const file = input.files && input.files[0];
    input.value = "";
    if (!file) return;
    try {
      const data = JSON.parse(await file.text());
      const list = Array.isArray(data) ? data : data.conversations;
      if (!Array.isArray(list)) throw new Error("no conversations in this file");
      const imported = list.map(cleanConversation).filter(Boolean);
      const ids = new Set(this.conversations.map((c) => c.id));
      for (const c of imported) if (ids.has(c.id)) c.id = newId();
      this.conversations = imported.concat(this.conversations);
      if (imported.length) this.current = imported[0];
      this.save();
      this.renderAll();
      this.showError("");
    } catch (err) {
      this.showError(`Import failed: ${err.message}`);
    }
  }

  // ---- rendering -------------------------------------------------------------
  renderAll() {
    $("mode").value = this.current.mode;
    $("system").value = this.current.system;
    $("system").disabled = this.current.mode !== "chat";
    const list = $("conv-list");
    list.replaceChildren(...this.conversations.map((c) => {
      const li = el("li");
      const b = el("button", "conv", c.title);
      b.type = "button";
      if (c === this.current) b.setAttribute("aria-current", "true");
      b.addEventListener("click", () => {
        if (this.controller) return;
        this.current = c;
        this.renderAll();
      });
      li.append(b);
      return li;
    }));
    this.renderMessages();
  }

  renderMessages() {
    const box = $("messages");
    box.replaceChildren(...this.current.messages.map((m) => this.renderMessage(m)));
    if (!this.current.messages.length) {
      box.append(el("p", "note empty", this.current.mode === "chat"
        ? "Type a message below. The answer streams in; Esc stops it."
        : "Raw completion: the text below is sent as the prompt, and the model continues it."));
    }
    box.scrollTop = box.scrollHeight;
  }

  queueRender(msg) {
    if (this.renderQueued.has(msg)) return;
    this.renderQueued.add(msg);
    requestAnimationFrame(() => {
      this.renderQueued.delete(msg);
      const old = document.querySelector(`[data-msg="${this.current.messages.indexOf(msg)}"]`);
      if (old) {
        const box = $("messages");
        const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
        old.replaceWith(this.renderMessage(msg));
        if (atBottom) box.scrollTop = box.scrollHeight;
      }
    });
  }

  renderMessage(msg) {
    const index = this.current.messages.indexOf(msg);
    const art = el("article", `msg ${msg.role}`);
    art.dataset.msg = String(index);
    art.dataset.finish = msg.finish || "";
    if (msg.finish === "streaming") art.setAttribute("aria-busy", "true");   // read once it is complete
    const head = el("header", "msg-head");
    head.append(el("span", "role", msg.model ? `${msg.role} · ${msg.model}` : msg.role));
    const meta = [];
    if (msg.usage) meta.push(`${msg.usage.completion_tokens} tokens`);
    if (msg.stats && msg.stats.ttft_ms !== null) meta.push(`first token ${msg.stats.ttft_ms.toFixed(0)} ms`);
    if (msg.stats && msg.stats.seconds && msg.usage) {
      meta.push(`${(msg.usage.completion_tokens / Math.max(msg.stats.seconds, 1e-3)).toFixed(1)} tok/s`);
    }
    if (msg.finish && msg.finish !== "stop") meta.push(msg.finish);
    head.append(el("span", "meta", meta.join(" · ")));
    art.append(head);
    art.setAttribute("aria-label", `${msg.role} message`);

    const output = msg.role === "assistant" || msg.role === "completion";
    let body;
    if (output && $("markdown").checked) body = renderMarkdown(msg.content);
    else body = el("div", "plain", msg.content);
    body.classList.add("body");
    art.append(body);

    if (output && msg.tokens && msg.tokens.length) {
      const toggle = el("button", "secondary small", msg.showTokens ? "Show text" : "Show tokens");
      toggle.type = "button";
      toggle.setAttribute("aria-pressed", String(!!msg.showTokens));
      toggle.addEventListener("click", () => {
        msg.showTokens = !msg.showTokens;
        this.queueRender(msg);
      });
      head.append(toggle);
      if (msg.showTokens) {
        body.hidden = true;
        art.append(...this.renderTokens(msg));
      }
    }
    if (output && msg.alpha && msg.alpha.length) {
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("viewBox", "0 0 300 40");
      svg.setAttribute("class", "chart alpha-chart");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", "optimal sampling α per token");
      alphaLine(svg, msg.alpha);
      const fig = el("figure", "alpha-fig");
      fig.append(el("figcaption", "note", `α per token (optimal sampling), mean ${
        (msg.alpha.reduce((a, b) => a + b, 0) / msg.alpha.length).toFixed(2)}`), svg);
      art.append(fig);
    }
    return art;
  }

  /** The tokens as spans coloured by probability; hover, tap or arrow keys show the details. */
  renderTokens(msg) {
    const wrap = el("div", "tokens");
    wrap.tabIndex = 0;
    wrap.setAttribute("aria-label", "Tokens: use the arrow keys to read each token's probability");
    const info = el("div", "token-info");
    info.setAttribute("aria-live", "polite");
    info.textContent = "Hover, tap or use the arrow keys on a token to see its logprob and the top alternatives." +
      (this.ntokens.size ? " Underlined: AdaptiVocab n-tokens (one token for several base tokens)." : "");
    const firstGenerated = msg.tokens.filter((t) => t.prompt).length;   // α is per generated token
    const spans = msg.tokens.map((t, i) => {
      const p = t.logprob === null ? null : Math.exp(t.logprob);
      const cls = p === null ? "p-none" : p >= 0.9 ? "p-hi" : p >= 0.5 ? "p-mid" : p >= 0.1 ? "p-lo" : "p-vlo";
      const ntoken = this.ntokens.has(t.text) ? " ntoken" : "";
      const span = el("span", `tok ${cls}${t.prompt ? " prompt" : ""}${ntoken}`, t.text.replace(/\n/g, "↵\n"));
      span.dataset.i = String(i);
      return span;
    });
    wrap.append(...spans);
    let selected = -1;
    const select = (i) => {
      if (i < 0 || i >= spans.length) return;
      if (selected >= 0) spans[selected].classList.remove("selected");
      selected = i;
      spans[i].classList.add("selected");
      const t = msg.tokens[i];
      const alpha = msg.alpha && !t.prompt ? msg.alpha[i - firstGenerated] : undefined;
      info.replaceChildren(this.tokenDetails(t, alpha));
    };
    const fromEvent = (ev) => (ev.target.dataset && ev.target.dataset.i !== undefined ? Number(ev.target.dataset.i) : -1);
    wrap.addEventListener("mouseover", (ev) => select(fromEvent(ev)));
    wrap.addEventListener("click", (ev) => select(fromEvent(ev)));
    wrap.addEventListener("keydown", (ev) => {
      if (ev.key === "ArrowRight") { select(Math.min(selected + 1, spans.length - 1)); ev.preventDefault(); }
      if (ev.key === "ArrowLeft") { select(Math.max(selected - 1, 0)); ev.preventDefault(); }
    });
    return [wrap, info];
  }

  tokenDetails(t, alpha) {
    const box = el("div");
    const head = el("p");
    head.append(el("code", "tok-text", JSON.stringify(t.text)));
    const parts = [];
    if (t.logprob !== null) parts.push(`logprob ${t.logprob.toFixed(3)}`, `p ${(100 * Math.exp(t.logprob)).toFixed(1)}%`);
    else parts.push("no logprob (first prompt token)");
    if (t.prompt) parts.push("prompt token");
    if (this.ntokens.has(t.text)) parts.push("n-token (AdaptiVocab)");
    if (alpha !== undefined) parts.push(`α ${alpha.toFixed(3)}`);
    head.append(document.createTextNode(` ${parts.join(" · ")}`));
    box.append(head);
    if (t.top.length) {
      const ol = el("ol", "alternatives");
      ol.setAttribute("aria-label", "Top alternatives");
      for (const [text, lp] of t.top) {
        const li = el("li");
        li.append(el("code", "tok-text", JSON.stringify(text)), document.createTextNode(` ${(100 * Math.exp(lp)).toFixed(1)}%`));
        ol.append(li);
      }
      box.append(ol);
    }
    return box;
  }
}
