// Small SVG charts drawn with DOM calls (no library, nothing inline for the CSP to refuse).
// Each function redraws an <svg> with a viewBox; colours come from classes in style.css.

const NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, cls) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (cls) node.setAttribute("class", cls);
  return node;
}

/** Draw in CSS pixels (no stretched text): the viewBox follows the element's size. */
function size(svg) {
  let [, , w, h] = svg.getAttribute("viewBox").split(/\s+/).map(Number);
  if (svg.clientWidth && svg.clientHeight) {
    w = Math.round(svg.clientWidth);
    h = Math.round(svg.clientHeight);
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  }
  return { w, h };
}

function title(node, text) {
  const t = document.createElementNS(NS, "title");
  t.textContent = text;
  node.append(t);
  return node;
}

/** Lines over time: series = [{values: [...], cls}], one value per sample, newest last. */
export function lines(svg, series, { max } = {}) {
  const { w, h } = size(svg);
  const top = Math.max(max ?? 0, ...series.flatMap((s) => s.values), 1e-9);
  const n = Math.max(...series.map((s) => s.values.length), 2);
  const nodes = [svgEl("line", { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5 }, "axis")];
  for (const s of series) {
    if (!s.values.length) continue;
    const pts = s.values.map((v, i) => {
      const x = (w * (n - s.values.length + i)) / (n - 1);
      return `${x.toFixed(1)},${(h - 2 - ((h - 4) * v) / top).toFixed(1)}`;
    });
    nodes.push(svgEl("polyline", { points: pts.join(" ") }, `line ${s.cls}`));
  }
  const tick = svgEl("text", { x: 2, y: 10 }, "tick");
  tick.textContent = formatTick(top);
  nodes.push(tick);
  svg.replaceChildren(...nodes);
}

/** The last steps as stacked bars (prefill below decode) and the budget as a line. */
export function steps(svg, list) {
  const { w, h } = size(svg);
  const slots = 64;
  const bw = w / slots;
  // scaled to the busiest step shown, so decode-only steps stay visible under a large budget
  const top = Math.max(1, ...list.map((s) => s.prefill_tokens + s.decode_tokens));
  const y = (v) => h - ((h - 12) * v) / top;
  const nodes = [svgEl("line", { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5 }, "axis")];
  list.slice(-slots).forEach((s, i) => {
    const x = (slots - Math.min(list.length, slots) + i) * bw;
    const pre = svgEl("rect", { x: x + 0.5, y: y(s.prefill_tokens), width: bw - 1, height: h - y(s.prefill_tokens) },
      "prefill");
    const dec = svgEl("rect", {
      x: x + 0.5, y: y(s.prefill_tokens + s.decode_tokens), width: bw - 1,
      height: y(s.prefill_tokens) - y(s.prefill_tokens + s.decode_tokens),
    }, "decode");
    const label = `${s.prefill_tokens} prefill + ${s.decode_tokens} decode tokens, ${s.num_seqs} sequences, ` +
      `${(s.step_time_s * 1000).toFixed(1)} ms`;
    nodes.push(title(pre, label), title(dec, label));
  });
  const budget = list.length ? list[list.length - 1].budget : null;
  if (budget && budget <= top) nodes.push(svgEl("line", { x1: 0, y1: y(budget), x2: w, y2: y(budget) }, "budget"));
  const tick = svgEl("text", { x: 2, y: 10 }, "tick");
  tick.textContent = `${top} tokens` + (budget > top ? ` (budget ${budget}: above the chart)` : "");
  nodes.push(tick);
  svg.replaceChildren(...nodes);
}

/** A latency histogram from cumulative Prometheus buckets [[le, count], ...] (le null = +Inf). */
export function histogram(svg, hist) {
  const { w, h } = size(svg);
  const counts = hist.buckets.map(([, c], i) => c - (i ? hist.buckets[i - 1][1] : 0));
  const top = Math.max(1, ...counts);
  const bw = w / Math.max(counts.length, 1);
  const nodes = [svgEl("line", { x1: 0, y1: h - 12.5, x2: w, y2: h - 12.5 }, "axis")];
  counts.forEach((c, i) => {
    const bh = ((h - 24) * c) / top;
    const lo = i ? hist.buckets[i - 1][0] : 0;
    const hi = hist.buckets[i][0];
    const rect = svgEl("rect", { x: i * bw + 0.5, y: h - 12 - bh, width: bw - 1, height: bh }, "bucket");
    nodes.push(title(rect, `${formatSeconds(lo)}–${hi === null ? "∞" : formatSeconds(hi)}: ${c}`));
    if (i % 3 === 0) {
      const t = svgEl("text", { x: i * bw + 1, y: h - 2 }, "tick");
      t.textContent = hi === null ? "∞" : formatSeconds(hi);
      nodes.push(t);
    }
  });
  svg.replaceChildren(...nodes);
}

/** Quantile q of a cumulative histogram, interpolated inside its bucket (as Prometheus does). */
export function quantile(hist, q) {
  const total = hist.count;
  if (!total) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of hist.buckets) {
    if (count >= rank) {
      if (le === null) return prevLe;
      return prevLe + ((le - prevLe) * (rank - prevCount)) / Math.max(count - prevCount, 1e-9);
    }
    prevLe = le ?? prevLe;
    prevCount = count;
  }
  return prevLe;
}

/** α per token (optimal sampling) as a small line in [0, 1]. */
export function alphaLine(svg, values) {
  lines(svg, [{ values, cls: "alpha" }], { max: 1 });
}

export function formatSeconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "–";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}

export function formatBytes(b) {
  if (b === null || b === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i && b < 10 ? 1 : 0)} ${units[i]}`;
}

function formatTick(v) {
  return v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2);
}
