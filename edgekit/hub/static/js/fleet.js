// Fleet table: every device's latest state, filtered and sorted in memory, then patched cell by cell from the live
// feed. Only the rows in view (plus a margin) are in the DOM: a browser takes hundreds of milliseconds to lay out a
// 1,000-row table, and a few to lay out 60 rows; spacer rows keep the scroll bar true to the whole fleet.
import { ago, api, applySizes, esc, labels, listOf, live, num, setTitle, state, tickAges } from "./common.js";

let rowPx = 33; // every row is as tall (app.css); measured on the first draw. A scroll offset maps to a row index.
const MARGIN_ROWS = 20; // rendered above and below the visible ones, so ordinary scrolling never shows a gap
const COLUMNS = [
  { key: "id", title: "Device", width: 12, cell: (d) => `<a href="/devices/${encodeURIComponent(d.id)}">${esc(d.id)}</a>` },
  { key: "online", width: 8, title: "Status", cell: (d) => state(d.online ? "online" : "offline") },
  { key: "bundle_label", width: 14, title: "Bundle", cell: (d) => esc(d.bundle_label || "–") },
  { key: "latency_p50_ms", width: 8, title: "p50 ms", num: true, cell: (d) => num(d.latency_p50_ms, 2) },
  { key: "fps", width: 7, title: "FPS", num: true, cell: (d) => num(d.fps, 1) },
  { key: "cpu_percent", width: 7, title: "CPU %", num: true, cell: (d) => num(d.cpu_percent, 0) },
  { key: "temperature_c", width: 8, title: "Temp °C", num: true, cell: (d) => num(d.temperature_c, 1) },
  { key: "last_seen", width: 10, title: "Last seen", cell: (d) => ago(d.last_seen), attrs: (d) => ` data-ts="${Number(d.last_seen) || 0}"` },
  { key: "labels", width: 26, title: "Labels", cell: (d) => labels(d.labels), sort: false },
];
const COLUMN_INDEX = new Map(COLUMNS.map((c, i) => [c.key, i]));

/** Filter words: `key=value` matches a label, anything else a label key or part of the id or bundle. */
function matcher(query, status) {
  const words = query.trim().split(/\s+/).filter(Boolean);
  return (d) => {
    if (status === "online" && !d.online) return false;
    if (status === "offline" && d.online) return false;
    return words.every((word) => {
      const [key, value] = word.split("=", 2);
      const labelsOf = d.labels || {};
      if (value !== undefined) return key in labelsOf && String(labelsOf[key]) === value;
      const w = word.toLowerCase();
      return word in labelsOf || d.id.toLowerCase().includes(w) || (d.bundle_label || "").toLowerCase().includes(w);
    });
  };
}

function compare(key, direction) {
  return (a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return a.id < b.id ? -1 : 1;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * direction;
  };
}

const pad = (rows) => (rows > 0 ? `<tr class="pad"><td colspan="${COLUMNS.length}" data-height="${rows * rowPx}px"></td></tr>` : "");
const rowHtml = (d) =>
  `<tr data-id="${esc(d.id)}">${COLUMNS.map((c) => `<td class="c-${c.key}${c.num ? " num" : ""}"${c.attrs ? c.attrs(d) : ""}>${c.cell(d)}</td>`).join("")}</tr>`;

export async function render(main) {
  setTitle("Fleet");
  const params = new URLSearchParams(location.search);
  main.innerHTML = `
    <div class="toolbar">
      <h1 class="grow">Fleet</h1>
      <input id="filter" type="search" placeholder="filter: site=lab, id or bundle" value="${esc(params.get("q") || "")}">
      <select id="status"><option value="">all</option><option value="online">online</option><option value="offline">offline</option></select>
      <span id="summary" class="muted"></span>
    </div>
    <div class="table-wrap tall"><table id="fleet" class="fixed">
      <colgroup>${COLUMNS.map((c) => `<col data-width="${c.width}%">`).join("")}</colgroup>
      <thead><tr>${COLUMNS.map((c) => `<th class="${c.num ? "num" : ""}"${c.sort === false ? "" : ` data-sort="${c.key}"`}>${c.title}</th>`).join("")}</tr></thead>
      <tbody></tbody>
    </table></div>`;
  applySizes(main);
  const filter = main.querySelector("#filter");
  const status = main.querySelector("#status");
  const table = main.querySelector("#fleet");
  const tbody = table.querySelector("tbody");
  const wrap = main.querySelector(".table-wrap");
  const summary = main.querySelector("#summary");
  status.value = params.get("status") || "";

  const devices = new Map();
  let shown = []; // the filtered, sorted devices; rows [first, last) of it are in the DOM
  let rows = new Map(); // device id → <tr> in the DOM, for in-place updates
  let first = -1, last = -1;
  let sort = { key: "id", direction: 1 };

  const drawWindow = (force = false) => {
    const top = Math.max(0, Math.floor(wrap.scrollTop / rowPx) - MARGIN_ROWS);
    const bottom = Math.min(shown.length, top + Math.ceil(wrap.clientHeight / rowPx) + 2 * MARGIN_ROWS);
    if (!force && top === first && bottom === last) return;
    [first, last] = [top, bottom];
    tbody.innerHTML = pad(first) + shown.slice(first, last).map(rowHtml).join("") + pad(shown.length - last);
    applySizes(tbody);
    rows = new Map();
    for (const tr of tbody.rows) if (tr.dataset.id) rows.set(tr.dataset.id, tr);
    const height = rows.size ? rows.values().next().value.getBoundingClientRect().height : rowPx;
    if (Math.abs(height - rowPx) > 0.25) { rowPx = height; drawWindow(true); } // fonts differ: use the real height
  };
  let scrolling = false;
  wrap.addEventListener("scroll", () => {
    if (scrolling) return;
    scrolling = true;
    requestAnimationFrame(() => { scrolling = false; drawWindow(); });
  }, { passive: true });

  const draw = () => {
    shown = [...devices.values()].filter(matcher(filter.value, status.value)).sort(compare(sort.key, sort.direction));
    table.dataset.rows = shown.length;
    drawWindow(true);
    drawSummary(shown.length);
    for (const th of main.querySelectorAll("th[data-sort]")) {
      th.className = th.dataset.sort === sort.key ? (sort.direction > 0 ? "sorted-asc" : "sorted-desc") : "";
    }
  };
  const drawSummary = (count = shown.length) => {
    let online = 0;
    for (const d of devices.values()) online += d.online ? 1 : 0;
    const filtered = count === devices.size ? "" : ` · ${count} shown`;
    summary.textContent = `${devices.size} devices · ${online} online · ${devices.size - online} offline${filtered}`;
  };
  const load = async () => {
    const data = await api("/api/devices");
    devices.clear();
    for (const d of listOf(data, "devices")) devices.set(d.id, d);
    draw();
  };

  const syncUrl = () => {
    const next = new URLSearchParams();
    if (filter.value) next.set("q", filter.value);
    if (status.value) next.set("status", status.value);
    history.replaceState(null, "", next.size ? `/?${next}` : "/");
    draw();
  };
  filter.addEventListener("input", syncUrl);
  status.addEventListener("change", syncUrl);
  main.querySelector("thead").addEventListener("click", (event) => {
    const key = event.target.dataset && event.target.dataset.sort;
    if (!key) return;
    sort = { key, direction: sort.key === key ? -sort.direction : 1 };
    draw();
  });
  tbody.addEventListener("click", (event) => {
    const tr = event.target.closest("tr[data-id]");
    if (tr && !event.target.closest("a")) location.href = `/devices/${encodeURIComponent(tr.dataset.id)}`;
  });

  await load();
  document.body.dataset.ready = "fleet";
  // For the benchmark: navigation start → the table painted (the frame after this one has been drawn).
  requestAnimationFrame(() => setTimeout(() => (window.__fleetRenderedAt = performance.now())));
  tickAges(tbody);

  let reloading = null;
  live((message) => {
    let summaryChanged = false;
    for (const [id, delta] of Object.entries(message.devices || {})) {
      const device = devices.get(id);
      if (!device) {
        // A device the table has not seen: fetch the list again (once, however many appear together).
        reloading ||= setTimeout(() => load().finally(() => (reloading = null)), 500);
        continue;
      }
      summaryChanged ||= "online" in delta && delta.online !== device.online;
      Object.assign(device, delta);
      const tr = rows.get(id);
      if (!tr) continue;
      for (const key of Object.keys(delta)) {
        const index = COLUMN_INDEX.get(key);
        if (index === undefined) continue;
        const column = COLUMNS[index];
        const cell = tr.cells[index];
        const html = column.cell(device);
        if (key === "last_seen") cell.dataset.ts = Number(device.last_seen) || 0;
        if (cell.innerHTML !== html) {
          cell.innerHTML = html;
          if (key !== "last_seen") cell.animate([{ background: "#fff6c2" }, { background: "transparent" }], 600);
        }
      }
    }
    if (summaryChanged) drawSummary();
  });
}
