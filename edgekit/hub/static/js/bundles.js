// Bundles: what the registry holds, how many devices run each, and which signing keys devices trust now.
import { api, bytes, esc, listOf, setTitle, short, when } from "./common.js";

export async function render(main) {
  setTitle("Bundles");
  const [bundleData, deviceData, trust] = await Promise.all([api("/api/bundles"), api("/api/devices"), api("/api/trust")]);
  const trusted = new Set(trust.bundle_keys);
  const running = new Map();
  for (const d of listOf(deviceData, "devices")) if (d.bundle_id) running.set(d.bundle_id, (running.get(d.bundle_id) || 0) + 1);
  const bundles = listOf(bundleData, "bundles").sort((a, b) => (b.uploaded || 0) - (a.uploaded || 0));
  const row = (b) => `<tr data-id="${esc(b.id)}">
      <td>${esc(b.name)}</td><td>${esc(b.version)}</td><td><code title="${esc(b.id)}">${esc(short(b.id))}</code></td>
      <td class="num">${bytes(b.size)}</td><td>${esc(b.profile)}</td><td>${esc(b.backend)}</td><td>${esc(b.precision)}</td>
      <td><code>${esc(short(b.signing_key_id, 16))}</code>${trusted.has(b.signing_key_id) || !trusted.size ? "" :
        ' <span class="state failed" title="Not a bundle key of the trust root: devices refuse this bundle">retired key</span>'}</td>
      <td class="num">${running.get(b.id) || 0}</td>
      <td>${when(b.uploaded)}</td><td>${esc(b.uploaded_by)}</td></tr>`;
  main.innerHTML = `
    <div class="toolbar"><h1 class="grow">Bundles</h1><span class="muted">${bundles.length} bundles · push with <code>edgekit push BUNDLE</code></span></div>
    <p id="trust" class="muted">Trust root v${esc(trust.version)}: devices take bundles signed by
      ${trust.bundle_keys.map((k) => `<code>${esc(k)}</code>`).join(", ") || "no key (they refuse every update)"} and desired states
      signed by hub key ${trust.hub_keys.map((k) => `<code>${esc(k)}</code>`).join(", ")} · rotate with <code>edgekit hub rotate-keys</code></p>
    <div class="table-wrap"><table id="bundles">
      <thead><tr><th>Name</th><th>Version</th><th>Id</th><th class="num">Size</th><th>Profile</th><th>Backend</th>
        <th>Precision</th><th>Signing key</th><th class="num">Devices</th><th>Uploaded</th><th>By</th></tr></thead>
      <tbody>${bundles.map(row).join("") || '<tr><td colspan="11" class="muted">No bundles yet.</td></tr>'}</tbody>
    </table></div>`;
  document.body.dataset.ready = "bundles";
}
