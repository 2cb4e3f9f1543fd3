// Shared by every page: API calls, HTML escaping, formatting and the live (SSE) feed.

export class ApiError extends Error {
  constructor(status, message, detail) { super(message); this.status = status; this.detail = detail; } // detail: FastAPI's
}

/** GET (or other method) a JSON API path; a 401 means the session ended, so show the login form again. */
export async function api(path, { method = "GET", body } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const early = method === "GET" && window.__early && window.__early[path];
  if (early) delete window.__early[path]; // started by app.html before the modules loaded; used once
  const response = await (early || fetch(path, init));
  if (response.status === 401) { location.reload(); throw new ApiError(401, "not logged in"); }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const detail = data && data.detail !== undefined ? JSON.stringify(data.detail) : text;
    throw new ApiError(response.status, `${method} ${path}: HTTP ${response.status} ${detail}`, data && data.detail);
  }
  return data;
}

/** Sizes written as data-width / data-height ("40%", "120px") set through the DOM: the hub's CSP refuses style
 * attributes in markup (an injected one could restyle the page), not styles set by its own scripts. */
export function applySizes(root) {
  for (const el of root.querySelectorAll("[data-width]")) el.style.width = el.dataset.width;
  for (const el of root.querySelectorAll("[data-height]")) el.style.height = el.dataset.height;
}

/** A list from an API answer that is either the list itself or an object holding it under one of `keys`. */
export function listOf(data, ...keys) {
  if (Array.isArray(data)) return data;
  for (const key of [...keys, "items"]) if (data && Array.isArray(data[key])) return data[key];
  return [];
}

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
export const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => ESCAPES[c]);

export function num(value, digits = 1) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}

export function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function ago(ts, now = Date.now() / 1000) {
  if (!ts) return "never";
  const s = Math.max(0, now - ts);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

export const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "–");
export const short = (id, n = 12) => (id ? String(id).slice(0, n) : "–"); // plain text: escape it where it goes into HTML
export const state = (name) => `<span class="state ${esc(name)}">${esc(String(name).replace("_", " "))}</span>`;

export function labels(map) {
  return Object.entries(map || {}).map(([k, v]) => `<span class="label">${esc(v === "" || v === true ? k : `${k}=${v}`)}</span>`).join("");
}

/** Refresh every relative-time cell (`data-ts`) once a second, so "last seen" ages without new data. */
export function tickAges(root) {
  const update = () => {
    const now = Date.now() / 1000;
    for (const cell of root.querySelectorAll("[data-ts]")) cell.textContent = ago(Number(cell.dataset.ts), now);
  };
  update();
  return setInterval(update, 1000);
}

/**
 * The live feed: one EventSource per page on /api/stream; each message is
 * {ts, devices: {id: {changed cells}}, events?: [...], samples?: {id: [[ts, p50, p95, fps, cpu, temp], ...]}}.
 */
export function live(onMessage, { device } = {}) {
  const indicator = document.getElementById("live");
  const url = device ? `/api/stream?device=${encodeURIComponent(device)}` : "/api/stream";
  const source = new EventSource(url);
  const show = (cls, title) => { indicator.className = `live ${cls}`; indicator.title = `live updates: ${title}`; };
  indicator.hidden = false; // only pages with a feed show the indicator
  source.addEventListener("hello", () => show("on", "connected"));
  source.onopen = () => show("on", "connected");
  source.onerror = () => show("off", "reconnecting…");
  source.onmessage = (event) => {
    window.__liveMessages = (window.__liveMessages || 0) + 1;
    onMessage(JSON.parse(event.data));
  };
  addEventListener("pagehide", () => source.close());
  return source;
}

export function setTitle(text) { document.title = `${text} · edgekit hub`; }

export function fail(main, error) {
  main.insertAdjacentHTML("afterbegin", `<p class="error card">${esc(error.message || error)}</p>`);
  console.error(error);
}
