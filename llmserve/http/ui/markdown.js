// A small Markdown renderer that builds DOM nodes. Model output is untrusted: every piece of
// text enters the page through createTextNode / textContent, no HTML is ever parsed, and only
// absolute http(s) URLs become links (never images: nothing is fetched on the model's behalf).
// Supported: fenced code, headings, lists, blockquotes, rules, tables, paragraphs; inline code,
// bold, italic, strikethrough, links and bare URLs.

const PUNCT = /[!-/:-@[-`{-~]/;
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(\s+|$)(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

/** The URL as a string when it is an absolute http(s) URL, otherwise null. */
export function safeHref(raw) {
  try {
    const url = new URL(String(raw).trim());
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function link(href, parent) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  parent.appendChild(a);
  return a;
}

/** Render Markdown source into a DocumentFragment. */
export function renderMarkdown(source) {
  const frag = document.createDocumentFragment();
  blocks(String(source ?? "").replace(/\r\n?/g, "\n").split("\n"), frag, 0);
  return frag;
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)
    || ITEM.test(line);
}

function blocks(lines, parent, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    let m = FENCE.exec(line);
    if (m) { i = fence(lines, i, m, parent); continue; }
    m = HEADING.exec(line);
    if (m) {
      const h = el(`h${m[1].length}`);
      inline(m[2] ?? "", h);
      parent.appendChild(h);
      i++;
      continue;
    }
    if (RULE.test(line)) { parent.appendChild(el("hr")); i++; continue; }
    if (QUOTE.test(line) && depth < 8) {
      const inner = [];
      while (i < lines.length && lines[i].trim() && (QUOTE.test(lines[i]) || inner.length)) {
        if (!QUOTE.test(lines[i]) && isBlockStart(lines[i])) break;
        inner.push(lines[i].replace(QUOTE, ""));
        i++;
      }
      const q = el("blockquote");
      blocks(inner, q, depth + 1);
      parent.appendChild(q);
      continue;
    }
    if (ITEM.test(line) && depth < 8) { i = list(lines, i, parent, depth); continue; }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])
        && lines[i + 1].includes("-")) {
      i = table(lines, i, parent);
      continue;
    }
    const para = [line];
    i++;
    while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i])) para.push(lines[i++]);
    const p = el("p");
    inline(para.map((l) => l.trim()).join("\n"), p);
    parent.appendChild(p);
  }
}

function fence(lines, start, m, parent) {
  const marker = m[1];
  const body = [];
  let i = start + 1;
  while (i < lines.length) {
    const t = lines[i].trim();
    if (t.startsWith(marker[0].repeat(marker.length)) && /^([`~])\1*$/.test(t)) { i++; break; }
    body.push(lines[i]);
    i++;
  }
  const box = el("div", "code-block");
  const head = el("div", "code-head");
  head.appendChild(el("span", "code-lang", m[2] || "text"));
  const copy = el("button", "copy-code", "Copy");
  copy.type = "button";
  head.appendChild(copy);
  const pre = el("pre");
  const code = el("code", null, body.join("\n"));
  if (m[2]) code.dataset.lang = m[2];
  pre.appendChild(code);
  box.append(head, pre);
  parent.appendChild(box);
  return i;
}

function list(lines, start, parent, depth) {
  const first = ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  const indent = first[1].length;
  let i = start;
  let loose = false;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const width = m[1].length + m[2].length + Math.max(1, m[3].length);
    const body = [m[4]];
    i++;
    while (i < lines.length) {
      const l = lines[i];
      if (!l.trim()) {
        // a blank line continues the item only when indented content follows
        const next = lines[i + 1];
        if (next !== undefined && next.trim() && /^\s{2,}/.test(next)) {
          loose = true;
          body.push("");
          i++;
          continue;
        }
        break;
      }
      const sub = ITEM.exec(l);
      if (sub && sub[1].length <= indent) break;
      if (!sub && !/^\s/.test(l) && isBlockStart(l)) break;
      body.push(l.slice(Math.min(width, l.length - l.trimStart().length)));
      i++;
    }
    const li = el("li");
    if (body.length === 1 || !body.slice(1).some((l) => ITEM.test(l) || FENCE.test(l))) {
      if (loose) { blocks(body, li, depth + 1); } else { inline(body.join("\n").trim(), li); }
    } else {
      blocks(body, li, depth + 1);
    }
    node.appendChild(li);
    if (i < lines.length && !lines[i].trim()) {
      const next = lines[i + 1];
      const again = next !== undefined && ITEM.exec(next);
      if (again && again[1].length === indent) { i++; continue; }
      break;
    }
  }
  parent.appendChild(node);
  return i;
}

function cells(row) {
  let t = row.trim();
  if (t.startsWith("|")) t = t.slice(1);
  if (t.endsWith("|") && !t.endsWith("\\|")) t = t.slice(0, -1);
  return t.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(lines, start, parent) {
  const head = cells(lines[start]);
  const aligns = cells(lines[start + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : "");
  const wrap = el("div", "table-wrap");
  const t = el("table");
  const tr = el("tr");
  head.forEach((c, k) => {
    const th = el("th");
    if (aligns[k]) th.style.textAlign = aligns[k];
    inline(c, th);
    tr.appendChild(th);
  });
  t.appendChild(el("thead")).appendChild(tr);
  const tbody = t.appendChild(el("tbody"));
  let i = start + 2;
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
    const row = el("tr");
    cells(lines[i]).slice(0, head.length).forEach((c, k) => {
      const td = el("td");
      if (aligns[k]) td.style.textAlign = aligns[k];
      inline(c, td);
      row.appendChild(td);
    });
    tbody.appendChild(row);
    i++;
  }
  wrap.appendChild(t);
  parent.appendChild(wrap);
  return i;
}

// [text](url "title") at src[i] === "[": {text, url, end} or null
function matchLink(src, i) {
  let depth = 0;
  let j = i;
  for (; j < src.length; j++) {
    if (src[j] === "\\") { j++; continue; }
    if (src[j] === "[") depth++;
    else if (src[j] === "]" && --depth === 0) break;
  }
  if (j >= src.length || src[j + 1] !== "(") return null;
  let k = j + 2;
  let parens = 1;
  for (; k < src.length; k++) {
    if (src[k] === "\\") { k++; continue; }
    if (src[k] === "(") parens++;
    else if (src[k] === ")" && --parens === 0) break;
    else if (src[k] === "\n") return null;
  }
  if (k >= src.length) return null;
  let url = src.slice(j + 2, k).trim();
  if (url.startsWith("<")) url = url.slice(1, url.indexOf(">") > 0 ? url.indexOf(">") : undefined);
  else url = url.split(/\s+/)[0] ?? "";
  return { text: src.slice(i + 1, j), url, end: k + 1 };
}

// **strong**, __strong__, *em*, _em_, ~~del~~ at src[i]: {tag, inner, end} or null
function matchEmphasis(src, i) {
  const c = src[i];
  const double = src[i + 1] === c;
  if (c === "~" && !double) return null;
  const delim = double ? c + c : c;
  const open = i + delim.length;
  if (open >= src.length || /\s/.test(src[open])) return null;
  if (c === "_" && i > 0 && /[\p{L}\p{N}]/u.test(src[i - 1])) return null;
  let from = open + 1;
  while (from <= src.length) {
    const end = src.indexOf(delim, from);
    if (end < 0) return null;
    const after = src[end + delim.length];
    const ok = !/\s/.test(src[end - 1])
      && !(delim.length === 1 && after === c)
      && !(c === "_" && after !== undefined && /[\p{L}\p{N}]/u.test(after));
    if (ok) {
      const tag = c === "~" ? "del" : double ? "strong" : "em";
      return { tag, inner: src.slice(open, end), end: end + delim.length };
    }
    from = end + 1;
  }
  return null;
}

const BARE_URL = /^https?:\/\/[^\s<>"'`]+/;

function inline(src, parent, links = true, depth = 0) {
  let buf = "";
  const flush = () => {
    if (buf) parent.appendChild(document.createTextNode(buf));
    buf = "";
  };
  let i = 0;
  while (i < src.length) {
    const c = src[i];
    if (c === "\\" && i + 1 < src.length && PUNCT.test(src[i + 1])) {
      buf += src[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      flush();
      parent.appendChild(el("br"));
      i++;
      continue;
    }
    if (c === "`") {
      const run = /^`+/.exec(src.slice(i))[0];
      const end = src.indexOf(run, i + run.length);
      if (end > -1) {
        flush();
        parent.appendChild(el("code", null, src.slice(i + run.length, end)));
        i = end + run.length;
      } else {
        buf += run;
        i += run.length;
      }
      continue;
    }
    if (links && (c === "[" || (c === "!" && src[i + 1] === "["))) {
      const image = c === "!";
      const m = matchLink(src, image ? i + 1 : i);
      const href = m && safeHref(m.url);
      if (m && href) {
        flush();
        const a = link(href, parent);
        if (image) {
          a.className = "image-link";
          a.textContent = `image: ${m.text || href}`;
        } else {
          inline(m.text, a, false, depth + 1);
        }
        i = m.end;
        continue;
      }
      if (m) {  // not an http(s) link: show the source as text
        buf += src.slice(i, m.end);
        i = m.end;
        continue;
      }
    }
    if (links && c === "<") {
      const m = /^<(https?:\/\/[^\s<>]+)>/.exec(src.slice(i));
      const href = m && safeHref(m[1]);
      if (href) {
        flush();
        link(href, parent).textContent = m[1];
        i += m[0].length;
        continue;
      }
    }
    if (links && c === "h" && (i === 0 || /[\s(]/.test(src[i - 1]))) {
      const m = BARE_URL.exec(src.slice(i));
      if (m) {
        const text = m[0].replace(/[.,;:!?)\]]+$/, "");
        const href = safeHref(text);
        if (href) {
          flush();
          link(href, parent).textContent = text;
          i += text.length;
          continue;
        }
      }
    }
    if ((c === "*" || c === "_" || c === "~") && depth < 8) {
      const m = matchEmphasis(src, i);
      if (m) {
        flush();
        inline(m.inner, parent.appendChild(el(m.tag)), links, depth + 1);
        i = m.end;
        continue;
      }
    }
    buf += c;
    i++;
  }
  flush();
}
