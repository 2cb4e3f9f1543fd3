// The page router: one HTML shell for every dashboard URL; the path picks the page module.
import { api, fail } from "./common.js";

const ROUTES = [
  [/^\/$/, "fleet"],
  [/^\/devices\/([^/]+)$/, "device"],
  [/^\/bundles$/, "bundles"],
  [/^\/rollouts$/, "rollouts"],
  [/^\/events$/, "events"],
  [/^\/audit$/, "audit"],
  [/^\/datasets$/, "datasets"],
  [/^\/datasets\/([^/]+)$/, "datasets"],
];

async function alertBadge() {
  try {
    const { count } = await api("/api/alerts?limit=1000");
    const badge = document.getElementById("alert-count");
    badge.textContent = count;
    badge.hidden = count === 0;
  } catch (error) {
    console.warn("alerts:", error);
  }
}

async function main() {
  const main = document.getElementById("main");
  const path = location.pathname.replace(/\/+$/, "") || "/";
  for (const [pattern, name] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    const nav = document.querySelector(`nav a[data-page="${name === "device" ? "fleet" : name}"]`);
    if (nav) nav.classList.add("active");
    try {
      const page = await import(`./${name}.js`);
      await page.render(main, ...match.slice(1).map(decodeURIComponent));
    } catch (error) {
      fail(main, error);
    }
    break;
  }
  alertBadge();
  setInterval(alertBadge, 15000);
}

main();
