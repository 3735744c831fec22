// The operator console in headless Chromium, in the viewer's time zone Asia/Tokyo. argv:
// gateway base URL, a region to open, a facility with history, a facility that the test
// turns OFFLINE, the directory for screenshots. Prints "READY" when the last facility's page
// is live (the test then turns it OFFLINE and notes the time), then one line of JSON with
// what each view showed. Prints "RESTART" when the region view is live: the test restarts
// the gateway on the same port (not with a sixth argument "no-restart").
const { chromium } = require("playwright-core");
const path = require("path");

const [gateway, region, historic, watched, shots, mode] = process.argv.slice(2);
const restart = mode !== "no-restart";

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
  try {
    const context = await browser.newContext({ timezoneId: "Asia/Tokyo", viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    const urls = [];
    page.on("request", (r) => urls.push(r.url()));
    const ready = () => page.waitForSelector("body[data-ready='1']", { timeout: 20000 });
    const out = {};

    // Regions at a glance.
    await page.goto(gateway + "/");
    await ready();
    out.overview = await page.$$eval("#regions a", (as) => as.map((a) => ({ region: a.dataset.region, online: Number(a.dataset.online), offline: Number(a.dataset.offline), uptime: a.querySelector(".uptime").textContent })));
    out.overview_state = await page.textContent("#state");
    out.tz = await page.textContent("#tz");
    await page.screenshot({ path: path.join(shots, "1-regions.png"), fullPage: true });
    // Keyboard: focus the first region and press Enter.
    await page.focus("#regions a");
    await page.keyboard.press("Enter");
    await page.waitForURL(/region=/, { timeout: 10000 });
    await ready();
    out.keyboard_opened = new URL(page.url()).searchParams.get("region");

    // A region, paged, searchable.
    await page.goto(gateway + "/?region=" + encodeURIComponent(region));
    await ready();
    out.region = {
      online: Number(await page.textContent("#online")),
      offline: Number(await page.textContent("#offline")),
      tiles_on_page: await page.$$eval("#tiles .tile", (t) => t.length),
      pager: await page.textContent(".pager .muted"),
      state: await page.textContent("#state"),
    };
    await page.screenshot({ path: path.join(shots, "2-region.png"), fullPage: true });
    await page.fill("main input[type=search]", historic);
    out.region.search = await page.$$eval("#tiles .tile", (t) => t.map((x) => x.dataset.facility));
    // The gateway restarts under the page (the test does it on "RESTART"): the page says
    // that it lost the stream, then is live again by itself.
    if (restart) {
      console.log("RESTART");
      await page.waitForFunction(() => /reconnect|lost|cannot reach/.test(document.getElementById("state").textContent), null, { timeout: 30000 });
      out.region.dropped = await page.textContent("#state");
      await page.screenshot({ path: path.join(shots, "3-region-reconnecting.png") });
      await page.waitForFunction(() => /^live/.test(document.getElementById("state").textContent), null, { timeout: 60000 })
        .catch(async (e) => { throw new Error("not live again after the restart: " + (await page.textContent("#state")) + ": " + e.message); });
      out.region.back = await page.textContent("#state");
    }

    // A facility: the 90-day bar, the windows, the timeline, who is online.
    await page.goto(gateway + "/?facility=" + encodeURIComponent(historic));
    await ready();
    await page.waitForSelector("#days .day", { timeout: 10000 });
    out.facility = {
      days: await page.$$eval("#days .day", (cells) => cells.map((c) => ({ day: c.dataset.day, online: Number(c.dataset.online), known: Number(c.dataset.known), outages: Number(c.dataset.outages), label: c.getAttribute("aria-label") }))),
      windows: await page.$$eval("#windows [data-window]", (w) => w.map((x) => x.textContent)),
      transitions: await page.$$eval("#transitions tr", (r) => r.length),
      sessions: await page.$$eval("#sessions tr", (r) => r.map((x) => x.cells[0].textContent)),
      status: await page.textContent("#facility-status"),
    };
    await page.hover("#days .day[data-outages='1']").catch(() => {});
    out.facility.hover = await page.textContent("#day-detail");
    await page.selectOption("#range", "7");
    await page.waitForFunction(() => document.querySelectorAll("#transitions tr").length > 1, null, { timeout: 10000 }).catch(() => {});
    out.facility.transitions_7d = await page.$$eval("#transitions tr", (r) => r.length);
    await page.screenshot({ path: path.join(shots, "4-facility.png"), fullPage: true });

    // A facility going OFFLINE, live.
    await page.goto(gateway + "/?facility=" + encodeURIComponent(watched));
    await ready();
    await page.waitForFunction(() => /^live/.test(document.getElementById("state").textContent), null, { timeout: 20000 });
    out.watched_before = await page.textContent("#facility-status");
    await page.waitForSelector("#sessions tr td", { timeout: 10000 });
    out.watched_sessions = await page.$$eval("#sessions tr", (r) => r.map((x) => x.cells[0].textContent));
    console.log("READY");
    await page.waitForFunction(() => (document.getElementById("facility-status") || {}).textContent === "OFFLINE", null, { timeout: 20000, polling: "raf" });
    out.offline_seen_at = Date.now();
    await page.screenshot({ path: path.join(shots, "5-facility-offline.png"), fullPage: true });
    out.stream_urls = urls.filter((u) => /stream/.test(u)).length;
    console.log(JSON.stringify(out));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
