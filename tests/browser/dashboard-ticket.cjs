// The dashboard against a gateway with tokens: without a token it asks for one; with the
// token typed into its field it exchanges it for a stream ticket and goes live, and no token
// ever appears in a URL it loads or shows. An old link with ?access_token= loses it from
// the address bar. argv: gateway base URL, region, token. Prints JSON with what it saw.
const { chromium } = require("playwright-core");

const [gateway, region, token] = process.argv.slice(2);

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
  try {
    const page = await browser.newPage();
    const urls = [];
    page.on("request", (r) => urls.push(r.url()));
    await page.goto(`${gateway}/?region=${encodeURIComponent(region)}`);
    await page.waitForFunction(() => /enter a token/.test(document.getElementById("state").textContent), null, { timeout: 20000 });
    const asked = await page.textContent("#state");
    await page.fill("#token", token);
    await page.click("#auth button");
    await page.waitForSelector("body[data-ready='1']", { timeout: 20000 });
    const live = await page.textContent("#state");
    const stored = await page.evaluate(() => sessionStorage.getItem("presence.token") === null ? "" : "set");
    const address = page.url();

    // A link from before tickets: the token moves out of the address bar.
    const old = await browser.newPage();
    old.on("request", (r) => urls.push(r.url()));
    await old.goto(`${gateway}/?region=${encodeURIComponent(region)}&access_token=${token}`);
    await old.waitForSelector("body[data-ready='1']", { timeout: 20000 });
    const old_address = old.url();

    const stream_urls = urls.filter((u) => /\/regions\/[^/]+\/stream/.test(u));
    // Every URL after the deliberately old link's own first load.
    const leaked = urls.filter((u) => u.includes(token)).length;
    console.log(JSON.stringify({ asked, live, stored, address, old_address, stream_urls, leaked }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
