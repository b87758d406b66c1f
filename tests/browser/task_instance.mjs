// A finished LoRATrainingOperator task instance in the real Airflow UI (Debian's headless chromium): its Details tab's
// extra links, a click on the "Loss chart" link, the chart in the "Loss chart" tab (elements, its eval series, the
// before/after answers, a hover on a training and on an eval point), and the same tab on another task of the run.
// Prints what it saw as one JSON object. Used by tests/test_real_airflow.py:
//   node task_instance.mjs BASE_URL DAG_ID RUN_ID TASK_ID OTHER_TASK_ID SHOT_DIR
// Screenshots in SHOT_DIR: details.png (the Details tab), tab.png (the Loss chart tab, hovering step 2),
// no_chart.png (the tab on the other task).
import { guardedContext, launchChromium, readChartPage } from "./common.mjs";

const [base_url, dag_id, run_id, task_id, other_task_id, shot_dir] = process.argv.slice(2);
const TAB_TITLE = "Loss chart";
const enc = encodeURIComponent;
const ti_path = (task) => `/dags/${enc(dag_id)}/runs/${enc(run_id)}/tasks/${enc(task)}`;
const result = { console_errors: [], page_errors: [], failed: [], http_errors: [], blocked: [] };

const browser = await launchChromium();
try {
  // Only the Airflow under test: anything else (fonts, telemetry, CDNs) is refused and recorded.
  const context = await guardedContext(
    browser, { width: 1100, height: 900 },
    (url) => url.startsWith(base_url + "/") || /^(data|blob|about):/.test(url), result.blocked);
  const page = await context.newPage();
  // Console messages of every frame (the tab's iframe included) arrive here.
  page.on("console", (msg) => { if (msg.type() === "error") result.console_errors.push(msg.text()); });
  page.on("pageerror", (err) => result.page_errors.push(String(err)));
  page.on("requestfailed", (req) => result.failed.push(`${req.url()} ${req.failure()?.errorText}`));
  page.on("response", (res) => { if (res.status() >= 400) result.http_errors.push(`${res.status()} ${res.url()}`); });

  // 1. The Details tab: the "Extra Links" section lists the links whose URL is set, as buttons.
  await page.goto(base_url + ti_path(task_id) + "/details", { waitUntil: "domcontentloaded" });
  const section = page.getByRole("heading", { name: "Extra Links" }).locator("xpath=..");
  await section.locator("a").first().waitFor({ timeout: 30_000 });
  result.extra_links = await section.locator("a").evaluateAll((all) => all.map((a) => ({
    text: a.textContent.trim(), href: a.getAttribute("href"), target: a.getAttribute("target") })));
  // The task instance's tabs, as the UI lists them (the plugin adds "Loss chart").
  // (The UI writes the run id unencoded in its own hrefs; the extra links carry target="_self".)
  const raw_path = `/dags/${dag_id}/runs/${run_id}/tasks/${task_id}`;
  result.tabs = await page.locator(`a[href^="${raw_path}"]:not([target])`).evaluateAll((all) => all
    .map((a) => a.textContent.trim()).filter((t) => t));
  await page.screenshot({ path: `${shot_dir}/details.png` });

  // 2. Click the "Loss chart" link: the tab opens, showing the chart page in an iframe.
  await section.getByText(TAB_TITLE, { exact: true }).click();
  await page.waitForURL((url) => url.pathname.endsWith("/plugin/lora-loss-chart"), { timeout: 30_000 });
  result.after_click = new URL(page.url()).pathname;
  const iframe = page.locator("iframe").first();
  await iframe.waitFor({ timeout: 30_000 });
  result.iframe_src = await iframe.getAttribute("src");
  const chart = page.frameLocator("iframe").first();
  await chart.locator("figure > svg").waitFor({ timeout: 30_000 });
  result.chart = await chart.locator("body").evaluate(readChartPage);
  // Hover a point: the chart's own script (allowed by the tab's CSP) shows its values.
  const hover = async (selector, index) => {
    const point = chart.locator(selector).nth(index);
    await point.scrollIntoViewIfNeeded();
    await point.hover({ force: true });
    await page.waitForTimeout(300);
    return chart.locator("body").evaluate(() => {
      const tip = document.getElementById("tip");
      return tip && !tip.hidden ? [...tip.children].map((line) => line.textContent) : null;
    });
  };
  result.eval_tooltip = result.chart.eval_points ? await hover("#eval-loss use", 0) : null;
  result.tooltip = await hover("#train-points use", 1);  // the second training point, as the screenshot shows
  await page.screenshot({ path: `${shot_dir}/tab.png` });

  // 3. The same tab on another task of the run: a short "no chart" page.
  await page.goto(base_url + ti_path(other_task_id) + "/plugin/lora-loss-chart", { waitUntil: "domcontentloaded" });
  const other = page.frameLocator("iframe").first();
  await other.locator("body p").first().waitFor({ timeout: 30_000 });
  result.other_task_text = (await other.locator("body").textContent()).trim();
  result.other_task_svg = await other.locator("svg").count();
  await page.screenshot({ path: `${shot_dir}/no_chart.png` });
} catch (err) {
  result.error = String(err?.stack ?? err);
  process.exitCode = 1;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
