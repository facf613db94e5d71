// api.js: what every page shares. The access token (kept from ?token= in sessionStorage, sent as the
// X-Sdtune-Token header and added to image and file URLs), JSON requests to /api, small DOM and
// formatting helpers, and the header nav.

const TOKEN_KEY = "sdtune_token";

/** The token of this tab: from the page URL's ?token= (then remembered), else the remembered one. */
export function token() {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) sessionStorage.setItem(TOKEN_KEY, fromUrl);
  return sessionStorage.getItem(TOKEN_KEY);
}

/** A same-origin URL with ?token= added when this tab has one (images, downloads, links). */
export function withToken(url) {
  if (!url) return url;
  const t = token();
  if (!t) return url;
  const u = new URL(url, location.origin);
  if (u.origin !== location.origin) return url;
  u.searchParams.set("token", t);
  return u.pathname + u.search + u.hash;
}

/** fetch + JSON both ways: {status, ok, data}; a body that is not JSON becomes {error: text}. Every
 * write is sent as JSON (the server refuses other writes: a guard against cross-site forms). */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers["X-Sdtune-Token"] = t;
  if (method !== "GET" && method !== "HEAD" && body === undefined) body = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    return { status: 0, ok: false, data: { error: `the server did not answer (${err.message}); is it still running?` } };
  }
  const text = await res.text();
  let data;
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    const plain = text && !text.trimStart().startsWith("<") ? text : `${res.status} ${res.statusText}`;
    data = { error: plain };
  }
  return { status: res.status, ok: res.ok, data };
}

/** The message of a failed answer: its {error}, else its errors' messages, else the status. */
export function errorText(res) {
  const d = res.data || {};
  if (d.error) return d.error;
  if (Array.isArray(d.errors)) return d.errors.map((e) => e.message).join("\n");
  return `request failed (${res.status})`;
}

/** document.createElement with attributes ({class, text, dataset, on*} handled) and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (sel, root = document) => root.querySelector(sel);

/** The run page of a run folder (its path relative to outputs). */
export function runHref(run) {
  return withToken("/run/" + encodeURIComponent(run));
}

export function fmtNumber(x, digits = 4) {
  if (x === null || x === undefined || x === "") return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  const abs = Math.abs(x);
  return abs !== 0 && (abs < 1e-3 || abs >= 1e5) ? x.toExponential(2) : x.toPrecision(digits).replace(/\.?0+$/, "");
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(r)}` : `${m}:${pad(r)}`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtTime(value) {
  if (!value) return "–";
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return isNaN(d) ? String(value) : d.toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
}

/** A state badge: <span class="badge STATE">STATE</span>. */
export function badge(state) {
  return el("span", { class: `badge ${state || ""}`, text: state || "unknown" });
}

/** The header nav, its links carrying the token; the current page's link marked. */
export function header(active) {
  const links = [["/", "Runs"], ["/new", "New run"], ["/dataset", "Dataset"]];
  const nav = el("nav", {}, links.map(([href, label]) =>
    el("a", { href: withToken(href), class: href === active ? "active" : null, text: label })));
  const bar = el("header", { class: "topbar" }, el("a", { class: "brand", href: withToken("/"), text: "sdtune" }), nav);
  document.body.prepend(bar);
}

/** Call fn() now and then every `ms()` milliseconds (ms re-read after each call, so pages can slow down). */
export function poll(fn, ms) {
  let timer = null;
  const tick = async () => {
    try { await fn(); } finally { timer = setTimeout(tick, ms()); }
  };
  tick();
  return () => clearTimeout(timer);
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}
