// Opens a loss-chart HTML file in Debian's headless chromium and prints what it finds as one JSON object.
// Used by tests/test_chart_browser.py:  node chart.mjs PAGE.html SHOT.png HOVERS_JSON [SHOT_TO]
//   HOVERS_JSON: [{"selector": "#train-points use", "index": 40}, ...]; each element is hovered at its centre, in
//   order, and the tooltip's text read; the screenshot is taken while the last one is hovered.
//   SHOT_TO: the screenshot runs from the top of the page to the bottom of this element (default: the figure).
import { guardedContext, launchChromium, readChartPage } from "./common.mjs";
import { pathToFileURL } from "node:url";

const [page_path, shot_path, hovers_json, shot_to = "figure"] = process.argv.slice(2);
const url = pathToFileURL(page_path).href;
const result = { console_errors: [], requests: [], blocked: [], failed: [] };

const browser = await launchChromium();
try {
  // Anything but the page itself is recorded and refused: the chart must work air-gapped.
  const context = await guardedContext(browser, { width: 1000, height: 720 }, (wanted) => wanted === url,
                                       result.blocked);
  const page = await context.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") result.console_errors.push(msg.text()); });
  page.on("pageerror", (err) => result.console_errors.push(String(err)));
  page.on("request", (req) => result.requests.push(req.url()));
  page.on("requestfailed", (req) => result.failed.push(`${req.url()} ${req.failure()?.errorText}`));

  await page.goto(url, { waitUntil: "load" });
  Object.assign(result, await page.evaluate(readChartPage), await page.evaluate(() => ({
    title: document.title,
    // Where each eval marker is drawn, in CSS px: the series must follow the eval losses it plots.
    eval_centres: [...document.querySelectorAll("#eval-loss use")].map((use) => {
      const r = use.getBoundingClientRect();
      return [r.x + r.width / 2, r.y + r.height / 2];
    }),
    figure_box: (({ x, y, width, height }) => ({ x, y, width, height }))(
      document.querySelector("figure").getBoundingClientRect()),
    page_width: document.scrollingElement.scrollWidth,
  })));

  // A viewport tall enough for the whole screenshot, set before hovering: a full-page capture would resize it
  // afterwards and the page would drop the hover it shows.
  const to = await page.locator(shot_to).first().boundingBox();
  const shot_height = Math.ceil(to.y + to.height + 8);
  if (shot_height > 720) await page.setViewportSize({ width: 1000, height: shot_height });

  result.tooltips = [];
  for (const { selector, index } of JSON.parse(hovers_json || "[]")) {
    const box = await page.locator(selector).nth(index).boundingBox();
    const at = [box.x + box.width / 2, box.y + box.height / 2];
    await page.mouse.move(...at);
    result.tooltips.push(await page.evaluate((at) => {
      const tip = document.getElementById("tip");
      // How far (CSS px) the nearest ring the page drew is from the point hovered: the page's own data-to-SVG
      // mapping has to agree with where matplotlib put the point.
      const off = [...document.querySelectorAll("#hover circle")]
        .filter((ring) => ring.style.display !== "none")
        .map((ring) => ring.getBoundingClientRect())
        .map((r) => Math.hypot(r.x + r.width / 2 - at[0], r.y + r.height / 2 - at[1]));
      return { text: tip && !tip.hidden ? [...tip.children].map((line) => line.textContent) : null,
               ring_offset: off.length ? Math.min(...off) : null };
    }, at));
  }
  await page.screenshot({ path: shot_path, clip: { x: 0, y: 0, width: 1000, height: shot_height } });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
