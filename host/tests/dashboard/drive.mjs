// Drives the Switchyard dashboard in headless Chromium: overview → dead letters
// → redrive the given dead letter → its event's timeline shows it delivered.
// Usage: node drive.mjs BASE_URL EVENT_ID [SCREENSHOT_DIR]
import { chromium } from "playwright-core";

const [base, eventId, shots] = process.argv.slice(2);
if (!base || !eventId) {
  console.error("usage: node drive.mjs BASE_URL EVENT_ID [SCREENSHOT_DIR]");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1366, height: 860 } });
const shot = async (name) => {
  if (shots) await page.screenshot({ path: `${shots}/dashboard-${name}.png`, fullPage: true });
};
const fail = async (why) => {
  console.error(`FAIL: ${why}\n--- page ${page.url()} ---\n${await page.content()}`);
  await browser.close();
  process.exit(1);
};

try {
  await page.goto(base + "/");
  if (!(await page.locator("h2", { hasText: "Routes" }).count())) await fail("no Routes on the overview");
  if (!(await page.locator("td", { hasText: "handler" }).count())) await fail("the handler plugin is not listed");
  await shot("overview");

  await page.click("header >> text=Dead letters");
  await page.waitForSelector("h1:has-text('Dead letters')");
  const row = page.locator("tr", { has: page.locator(`a:has-text("${eventId}")`) });
  if ((await row.count()) !== 1) await fail(`dead letter of ${eventId} not listed`);
  await shot("dead-letters");

  await row.locator("button:has-text('Redrive')").click();
  await page.waitForURL(`**/ui/events/${eventId}`);
  // The redriven delivery runs in the background: reload until it is delivered.
  let delivered = false;
  for (let i = 0; i < 100 && !delivered; i++) {
    delivered = (await page.locator("ol.timeline .pill.delivered").count()) > 0;
    if (!delivered) {
      await page.waitForTimeout(100);
      await page.reload();
    }
  }
  if (!delivered) await fail("the redriven delivery did not show as delivered");
  await shot("event");

  await page.click("header >> text=Events");
  await page.fill("input[name=q]", "orders");
  await page.click("button:has-text('Search')");
  await page.waitForSelector(`a:has-text("${eventId}")`);
  await shot("events");
  console.log(JSON.stringify({ ok: true, redriven: eventId }));
} catch (e) {
  await fail(String(e));
}
await browser.close();
