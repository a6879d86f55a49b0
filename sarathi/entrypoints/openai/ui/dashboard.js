// The dashboard: renders one /ui/stats reading at a time and keeps a minute of history
// for the time charts. Figures that /metrics also exports carry data-metric (the series'
// name) and data-value (the exact number), so they can be checked against it.

import * as charts from "./charts.js";

const HISTORY_S = 60;
const RATE_WINDOW_S = 2;     // output tok/s: tokens over about the last two seconds
const HIT_WINDOW_S = 10;

const $ = (id) => document.getElementById(id);

function show(id, text, value) {
  const node = $(id);
  node.textContent = text;
  if (value !== undefined && value !== null) node.dataset.value = String(value);
}

function num(v) {
  return v === undefined || v === null ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: 1 });
}

function pct(v) {
  return v === undefined || v === null || Number.isNaN(v) ? "–" : `${(100 * v).toFixed(1)}%`;
}

function duration(s) {
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${Math.floor(s % 60)} s` : `${Math.floor(s)} s`;
}

/** The reading `seconds` before the newest (or the oldest one kept). */
function readingBefore(history, seconds) {
  const newest = history[history.length - 1];
  for (let i = history.length - 2; i >= 0; i--) {
    if (newest.time - history[i].time >= seconds) return history[i];
  }
  return history[0];
}

export class Dashboard {
  constructor() {
    this.history = [];      // {time, running, waiting, outRate, gen, prompt, hits, queries}
    this.adapters = [];     // registered adapter names (from /v1/models)
    this.maxSlot = 7;       // the heat map grows to the highest slot seen
  }

  /** Take one reading; `render` false keeps history only (the dashboard is not on screen). */
  update(stats, render) {
    const e = stats.engine;
    const reading = {
      time: stats.time, running: e.num_running ?? 0, waiting: e.num_waiting_requests ?? 0,
      gen: e.generation_tokens_total ?? 0, prompt: e.prompt_tokens_total ?? 0,
      hits: e.prefix_cache_hits ?? 0, queries: e.prefix_cache_queries ?? 0, outRate: 0, inRate: 0,
    };
    this.history.push(reading);
    while (this.history.length > 2 && reading.time - this.history[0].time > HISTORY_S) this.history.shift();
    const past = readingBefore(this.history, RATE_WINDOW_S);
    const dt = reading.time - past.time;
    if (dt > 0) {
      reading.outRate = (reading.gen - past.gen) / dt;
      reading.inRate = (reading.prompt - past.prompt) / dt;
    }
    if (render) this.render(stats, reading);
  }

  render(stats, now) {
    const e = stats.engine;
    show("d-running", num(e.num_running), e.num_running);
    show("d-waiting", num(e.num_waiting_requests), e.num_waiting_requests);
    show("d-preemptions", num(e.num_preemptions_total), e.num_preemptions_total);
    charts.lines($("c-requests"), [
      { values: this.history.map((r) => r.running), cls: "run" },
      { values: this.history.map((r) => r.waiting), cls: "wait" },
    ], { max: 1 });

    show("d-out-rate", num(now.outRate), now.outRate.toFixed(3));
    show("d-in-rate", num(now.inRate), now.inRate.toFixed(3));
    show("d-gen-total", num(e.generation_tokens_total), e.generation_tokens_total);
    show("d-prompt-total", num(e.prompt_tokens_total), e.prompt_tokens_total);
    charts.lines($("c-throughput"), [{ values: this.history.map((r) => r.outRate), cls: "run" }]);

    this.renderLatency(stats.latency);
    this.renderKV(e, stats.max_model_len);

    show("d-hit-rate", pct(e.prefix_cache_queries ? e.prefix_cache_hits / e.prefix_cache_queries : null));
    const before = readingBefore(this.history, HIT_WINDOW_S);
    const queried = now.queries - before.queries;
    show("d-hit-recent", queried > 0 ? pct((now.hits - before.hits) / queried) : "–");
    show("d-cached-blocks", num(e.prefix_cache_blocks), e.prefix_cache_blocks);
    show("d-hits", num(e.prefix_cache_hits), e.prefix_cache_hits);
    show("d-queries", num(e.prefix_cache_queries), e.prefix_cache_queries);

    this.renderSteps(e.steps);
    this.renderLora(e.lora);
    this.renderModel(stats);
    this.renderReplicas(e.replicas);
    $("dash-updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
  }

  renderLatency(latency) {
    const { ttft, itl } = latency;
    show("d-ttft-p50", charts.formatSeconds(charts.quantile(ttft, 0.5)));
    show("d-ttft-p90", charts.formatSeconds(charts.quantile(ttft, 0.9)));
    show("d-tpot-p50", charts.formatSeconds(charts.quantile(itl, 0.5)));
    show("d-tpot-p90", charts.formatSeconds(charts.quantile(itl, 0.9)));
    show("d-ttft-count", num(ttft.count), ttft.count);
    charts.histogram($("c-ttft"), ttft);
    charts.histogram($("c-tpot"), itl);
  }

  renderKV(e, maxModelLen) {
    show("d-kv-usage", pct(e.kv_usage), e.kv_usage);
    $("c-kv-bar").firstElementChild.style.width = `${(100 * (e.kv_usage || 0)).toFixed(1)}%`;
    show("d-kv-reserved", charts.formatBytes(e.kv_cache_kv_bytes_reserved_virtual), e.kv_cache_kv_bytes_reserved_virtual);
    show("d-kv-mapped", charts.formatBytes(e.kv_cache_kv_bytes_mapped), e.kv_cache_kv_bytes_mapped);
    show("d-kv-committed", charts.formatBytes(e.kv_cache_kv_bytes_committed), e.kv_cache_kv_bytes_committed);
    show("d-kv-free", charts.formatBytes(e.kv_cache_kv_bytes_free), e.kv_cache_kv_bytes_free);
    show("d-kv-blocks", e.kv_blocks_total === undefined ? "–" : `${num(e.kv_blocks_free)} / ${num(e.kv_blocks_total)}`,
      e.kv_blocks_free);

    const slots = Array.isArray(e.kv_slots) ? e.kv_slots : null;
    const map = $("c-slots");
    if (slots === null) {
      map.replaceChildren(Object.assign(document.createElement("p"), {
        className: "note", textContent: "This engine does not report its slots.",
      }));
      return;
    }
    const bySlot = new Map(slots.map((s) => [s.slot, s]));
    for (const s of slots) this.maxSlot = Math.max(this.maxSlot, s.slot);
    const cells = Math.ceil((this.maxSlot + 1) / 8) * 8;
    const blockTokens = e.kv_block_tokens || 16;
    const fullBlocks = Math.max(1, Math.ceil((maxModelLen || blockTokens) / blockTokens));
    const nodes = [];
    for (let i = 0; i < cells; i++) {
      const s = bySlot.get(i);
      const cell = document.createElement("div");
      cell.className = s ? "slot used" : "slot";
      cell.setAttribute("role", "listitem");
      cell.textContent = String(i);
      const label = s ? `slot ${i}: ${s.tokens} tokens in ${s.blocks} blocks` : `slot ${i}: free`;
      cell.title = label;
      cell.setAttribute("aria-label", label);
      cell.style.setProperty("--heat", s ? Math.min(1, 0.15 + (0.85 * s.blocks) / fullBlocks).toFixed(3) : "0");
      nodes.push(cell);
    }
    map.replaceChildren(...nodes);
    map.dataset.used = String(slots.length);
  }

  renderSteps(steps) {
    if (!Array.isArray(steps)) {
      show("d-budget", "not reported");
      return;
    }
    charts.steps($("c-steps"), steps);
    const last = steps[steps.length - 1];
    show("d-budget", last && last.budget ? `${num(last.budget)} tokens` : last ? "none" : "–");
    const mean = (f) => steps.reduce((a, s) => a + f(s), 0) / Math.max(steps.length, 1);
    show("d-step-time", steps.length ? charts.formatSeconds(mean((s) => s.step_time_s)) : "–");
    show("d-step-seqs", steps.length ? mean((s) => s.num_seqs).toFixed(1) : "–");
    $("c-steps").dataset.steps = String(steps.length);
  }

  renderLora(lora) {
    $("d-lora-none").hidden = !!lora;
    $("d-lora").hidden = !lora;
    if (!lora) return;
    show("d-lora-max", num(lora.max_lora), lora.max_lora);
    const items = [];
    for (let i = 0; i < lora.max_lora; i++) {
      const li = document.createElement("li");
      const name = lora.running[i];
      li.className = name ? "lora used" : "lora";
      li.textContent = name || "free";
      items.push(li);
    }
    $("d-lora-slots").replaceChildren(...items);
    show("d-lora-waiting", lora.waiting.length ? lora.waiting.join(", ") : "none");
    show("d-lora-registered", this.adapters.length ? this.adapters.join(", ") : "none");
  }

  renderModel(stats) {
    const info = stats.engine.model_info || {};
    const text = (v) => (v === undefined || v === null ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v));
    show("d-model", stats.models.join(", "));
    show("d-quant", text(info.quantization));
    show("d-isa", text(info.kernel_isa));
    show("d-formats", text(info.weight_formats));
    show("d-maxlen", num(stats.max_model_len));
    show("d-uptime", duration(stats.uptime_s));
    const done = Object.entries(stats.requests_finished).map(([k, v]) => `${k} ${num(v)}`);
    show("d-finished", done.length ? done.join(", ") : "none");
  }

  renderReplicas(replicas) {
    $("card-replicas").hidden = !Array.isArray(replicas);
    if (!Array.isArray(replicas)) return;
    const rows = replicas.map((r, i) => {
      const tr = document.createElement("tr");
      const cells = [i, r.up ? "yes" : "restarting", num(r.outstanding_requests), num(r.num_running),
        num(r.num_waiting_requests), pct(r.kv_usage), num(r.routed_total), num(r.restarts_total)];
      for (const c of cells) tr.append(Object.assign(document.createElement("td"), { textContent: String(c) }));
      return tr;
    });
    $("d-replicas").replaceChildren(...rows);
  }
}
