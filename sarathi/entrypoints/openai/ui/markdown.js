// A small markdown renderer that builds DOM nodes and never parses HTML: every piece of the
// model's text ends up in a text node, so tags in it (<script>, <img onerror=...>) are shown,
// never run. Links are shown as text with their address (the UI navigates nowhere), images
// are not loaded.
//
// Blocks: ``` fenced code, # headings, > quotes, - * + and 1. lists, --- rules, paragraphs.
// Inline: `code`, **bold**, *italic*, ~~strike~~, [text](address).

const INLINE = [
  { re: /`([^`\n]+)`/, make: (m) => el("code", m[1]) },
  { re: /\*\*([^*\n]+?)\*\*/, make: (m) => inlineInto(el("strong"), m[1]) },
  { re: /\*([^*\s][^*\n]*?)\*/, make: (m) => inlineInto(el("em"), m[1]) },
  { re: /~~([^~\n]+?)~~/, make: (m) => inlineInto(el("del"), m[1]) },
  { re: /!?\[([^\]\n]*)\]\(([^)\s]*)\)/, make: link },
];

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

function link(m) {
  const span = el("span");
  span.className = "md-link";
  inlineInto(span, m[1] || m[2]);
  const addr = el("span", ` <${m[2]}>`);
  addr.className = "md-addr";
  span.append(addr);
  return span;
}

/** Append `text` with inline markup to `parent`; returns parent. */
export function inlineInto(parent, text) {
  let rest = text;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(rest);
      if (m && (best === null || m.index < best.m.index)) best = { m, rule };
    }
    if (best === null) {
      parent.append(document.createTextNode(rest));
      break;
    }
    if (best.m.index > 0) parent.append(document.createTextNode(rest.slice(0, best.m.index)));
    parent.append(best.rule.make(best.m));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
  return parent;
}

const FENCE = /^\s{0,3}(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    BULLET.test(line) || NUMBERED.test(line);
}

/** Render markdown `text` into a new element (class "md"). An unclosed fence runs to the end,
 *  so a code block being streamed shows as code already. */
export function renderMarkdown(text) {
  const root = el("div");
  root.className = "md";
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const body = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(m[1]) && FENCE.test(lines[i]))) body.push(lines[i++]);
      i++;
      const pre = el("pre");
      const code = el("code", body.join("\n"));
      if (m[2]) code.dataset.lang = m[2];
      pre.append(code);
      root.append(pre);
    } else if ((m = HEADING.exec(line))) {
      root.append(inlineInto(el(`h${Math.min(m[1].length + 2, 6)}`), m[2]));
      i++;
    } else if (RULE.test(line)) {
      root.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
      const quote = el("blockquote");
      quote.append(...renderMarkdown(body.join("\n")).childNodes);
      root.append(quote);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const list = el(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number(NUMBERED.exec(line)[1]);
        if (start !== 1) list.start = start;
      }
      while (i < lines.length && (m = pattern.exec(lines[i]))) {
        let item = ordered ? m[2] : m[1];
        i++;
        // continuation lines: indented, not a new item
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !pattern.test(lines[i])) item += " " + lines[i++].trim();
        list.append(inlineInto(el("li"), item));
      }
      root.append(list);
    } else {
      const para = [line.trim()];
      i++;
      while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i])) para.push(lines[i++].trim());
      const p = el("p");
      para.forEach((text, k) => {
        if (k) p.append(el("br"));
        inlineInto(p, text);
      });
      root.append(p);
    }
  }
  return root;
}
