// The dashboard in headless Chromium: beats for a facility turn its tile ONLINE; when they
// stop, the tile turns OFFLINE after the session timeout. argv: gateway base URL, region,
// facility. Prints JSON with the two waits in ms.
const { chromium } = require("playwright-core");

const [gateway, region, facility] = process.argv.slice(2);
const beat = () => fetch(gateway + "/v1/heartbeats", {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({ session_id: "dash-" + facility, user_id: "u", facility_id: facility, region_id: region, kind: "BEAT" }),
}).then((r) => { if (r.status !== 202) throw new Error("beat refused: " + r.status); });

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
  try {
    const page = await browser.newPage();
    await page.goto(`${gateway}/?region=${encodeURIComponent(region)}`);
    await page.waitForSelector("body[data-ready='1']", { timeout: 20000 });
    const tile = (status) => `[data-facility="${facility}"][data-status="${status}"]`;
    let t0 = Date.now();
    await beat();
    const beating = setInterval(() => beat().catch((e) => console.error(e)), 500);
    await page.waitForSelector(tile("ONLINE"), { timeout: 30000 });
    const online_ms = Date.now() - t0;
    const online_count = await page.textContent("#online");
    clearInterval(beating);
    t0 = Date.now();
    await page.waitForSelector(tile("OFFLINE"), { timeout: 30000 });
    const offline_ms = Date.now() - t0;
    const offline_count = await page.textContent("#offline");
    const last_change = await page.textContent("#last");
    console.log(JSON.stringify({ online_ms, offline_ms, online_count, offline_count, last_change }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
