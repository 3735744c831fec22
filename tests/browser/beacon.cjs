// A page on an origin of its own sends two beats with fetch() and, on unload, an END with
// navigator.sendBeacon(), to the gateway given as argv[2]. Prints JSON: the fetch statuses.
const http = require("http");
const { chromium } = require("playwright-core");

const gateway = process.argv[2];
const session = process.argv[3];
const page = `<!doctype html><script>
const url = ${JSON.stringify(gateway + "/v1/heartbeats")};
const beat = (kind) => ({session_id: ${JSON.stringify(session)}, user_id: "browser-user", facility_id: "browser-facility", region_id: "browser-region", kind, client_sent_at: Date.now()});
window.results = [];
(async () => {
  for (let i = 0; i < 2; i++) {
    const r = await fetch(url, {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(beat("BEAT"))});
    window.results.push(r.status);
  }
})();
addEventListener("pagehide", () => navigator.sendBeacon(url, JSON.stringify(beat("END"))));
</script>`;

(async () => {
  const server = http.createServer((req, res) => { res.setHeader("content-type", "text/html"); res.end(page); });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  const origin = `http://127.0.0.1:${server.address().port}`;
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
  try {
    const tab = await browser.newPage();
    await tab.goto(origin + "/");
    await tab.waitForFunction(() => window.results.length === 2, null, { timeout: 20000 });
    const statuses = await tab.evaluate(() => window.results);
    // Leaving the page fires pagehide: the beacon goes out.
    await tab.goto("about:blank");
    await tab.close({ runBeforeUnload: true });
    console.log(JSON.stringify({ origin, statuses }));
  } finally {
    await browser.close();
    server.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
