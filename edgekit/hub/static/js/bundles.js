// Bundles: what the registry holds, and how many devices run each.
import { api, bytes, esc, listOf, setTitle, short, when } from "./common.js";

export async function render(main) {
  setTitle("Bundles");
  const [bundleData, deviceData] = await Promise.all([api("/api/bundles"), api("/api/devices")]);
  const running = new Map();
  for (const d of listOf(deviceData, "devices")) if (d.bundle_id) running.set(d.bundle_id, (running.get(d.bundle_id) || 0) + 1);
  const bundles = listOf(bundleData, "bundles").sort((a, b) => (b.uploaded || 0) - (a.uploaded || 0));
  const row = (b) => `<tr data-id="${esc(b.id)}">
      <td>${esc(b.name)}</td><td>${esc(b.version)}</td><td><code title="${esc(b.id)}">${esc(short(b.id))}</code></td>
      <td class="num">${bytes(b.size)}</td><td>${esc(b.profile)}</td><td>${esc(b.backend)}</td><td>${esc(b.precision)}</td>
      <td><code>${esc(short(b.signing_key_id, 16))}</code></td><td class="num">${running.get(b.id) || 0}</td>
      <td>${when(b.uploaded)}</td><td>${esc(b.uploaded_by)}</td></tr>`;
  main.innerHTML = `
    <div class="toolbar"><h1 class="grow">Bundles</h1><span class="muted">${bundles.length} bundles · push with <code>edgekit push BUNDLE</code></span></div>
    <div class="table-wrap"><table id="bundles">
      <thead><tr><th>Name</th><th>Version</th><th>Id</th><th class="num">Size</th><th>Profile</th><th>Backend</th>
        <th>Precision</th><th>Signing key</th><th class="num">Devices</th><th>Uploaded</th><th>By</th></tr></thead>
      <tbody>${bundles.map(row).join("") || '<tr><td colspan="11" class="muted">No bundles yet.</td></tr>'}</tbody>
    </table></div>`;
  document.body.dataset.ready = "bundles";
}
