// The rollouts page's deploy form, for operators: a bundle, a target (device, group:KEY=VALUE, all), canary and wave
// sizes, health gates and the shadow phase; confirmed, then POST /api/deployments, whose refusals (422) it shows.
import { api, esc, listOf, short } from "./common.js";
import { canOperate, showProblems } from "./forms.js";

function form(bundles) {
  const options = bundles.map((b) => `<option value="${esc(b.id)}">${esc(`${b.name}@${b.version}`)} (${esc(short(b.id))})</option>`).join("");
  return `<form id="deploy-form" class="card config-form" hidden>
    <label>bundle <select id="deploy-bundle">${options}</select></label>
    <label>target <input id="deploy-target" placeholder="device id, group:KEY=VALUE or all" required></label>
    <label>canary % <input id="deploy-canary" type="number" step="any" value="10"></label>
    <label>waves % <input id="deploy-wave" type="number" step="any" value="30"></label>
    <label>gates <input id="deploy-gates" placeholder="agreement>=0.98, p95<=1.2x"></label>
    <label><input id="deploy-shadow" type="checkbox"> shadow phase first</label>
    <button type="submit" id="deploy-start">Start rollout</button>
    <ul id="deploy-errors" class="error" hidden></ul></form>`;
}

function request(el) {
  const value = (name) => el.querySelector(`#deploy-${name}`).value.trim();
  const gates = value("gates").split(",").map((g) => g.trim()).filter(Boolean);
  return {
    bundle_id: value("bundle"), target: value("target"), canary_percent: Number(value("canary")),
    wave_percent: Number(value("wave")), shadow: el.querySelector("#deploy-shadow").checked, gates: gates.length ? gates : null,
  };
}

/** Adds a Deploy button to `toolbar` and its form after it; `reload` shows the new rollout. Nothing for read tokens. */
export async function deployForm(toolbar, reload) {
  if (!(await canOperate())) return;
  const bundles = listOf(await api("/api/bundles"), "bundles");
  toolbar.insertAdjacentHTML("beforeend", '<button id="deploy-open">Deploy…</button>');
  toolbar.insertAdjacentHTML("afterend", form(bundles));
  const el = toolbar.parentElement.querySelector("#deploy-form");
  toolbar.querySelector("#deploy-open").addEventListener("click", () => { el.hidden = !el.hidden; });
  el.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = request(el);
    const bundle = el.querySelector("#deploy-bundle").selectedOptions[0]?.textContent || body.bundle_id;
    if (!confirm(`Deploy ${bundle} to ${body.target} (canary ${body.canary_percent}%, waves of ${body.wave_percent}%)?`)) return;
    try {
      await api("/api/deployments", { method: "POST", body });
      showProblems(el.querySelector("#deploy-errors"), null);
      el.hidden = true;
      await reload();
    } catch (error) {
      showProblems(el.querySelector("#deploy-errors"), error);
    }
  });
}
