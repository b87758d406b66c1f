// Opens a DAG's trigger form in the real Airflow UI (Debian's headless chromium), reads every Params field, changes
// some, submits, and prints what it saw as one JSON object. Used by tests/test_trigger_form.py:
//   node trigger_form.mjs BASE_URL DAG_ID SHOT_DIR CHANGES_JSON
//   CHANGES_JSON: {"lora_r": "8", ...}: text typed into each field (replacing its value) before submitting.
// Screenshots in SHOT_DIR: form.png (the page as the form opens, every section folded) and <section>.png (the
// dialog with that section unfolded; the form's accordion unfolds one section at a time).
import { guardedContext, launchChromium } from "./common.mjs";

const [base_url, dag_id, shot_dir, changes_json] = process.argv.slice(2);
const changes = JSON.parse(changes_json || "{}");
const SHOW = ["LoRA", "Training", "Model"];  // sections photographed unfolded
const SELECTS = ["lr_scheduler", "dataset_format", "dtype", "lora_bnb_4bit_quant_type", "fsdp_sharding_strategy"];
const result = { console_errors: [], page_errors: [], failed: [], http_errors: [], blocked: [], timings: {} };
const t0 = Date.now();
const mark = (name) => { result.timings[name] = (Date.now() - t0) / 1000; };

const browser = await launchChromium();
try {
  // Only the Airflow under test: anything else (fonts, telemetry, CDNs) is refused and recorded.
  const context = await guardedContext(
    browser, { width: 1100, height: 900 },
    (url) => url.startsWith(base_url + "/") || /^(data|blob):/.test(url), result.blocked);
  const page = await context.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") result.console_errors.push(msg.text()); });
  page.on("pageerror", (err) => result.page_errors.push(String(err)));
  page.on("requestfailed", (req) => result.failed.push(`${req.url()} ${req.failure()?.errorText}`));
  page.on("response", (res) => { if (res.status() >= 400) result.http_errors.push(`${res.status()} ${res.url()}`); });

  await page.goto(`${base_url}/dags/${encodeURIComponent(dag_id)}`, { waitUntil: "domcontentloaded" });
  // The DAG page's Trigger button opens the form as a dialog (it has no URL of its own).
  const open = page.getByTestId("trigger-dag-button").first();
  await open.waitFor({ timeout: 30_000 });
  mark("page");
  await open.click();
  const dialog = page.getByRole("dialog");
  await dialog.waitFor({ timeout: 30_000 });
  // The params come with the DAG's details: wait for the first field, then for the form to settle (sections
  // flagged in error, the submit button's state).
  await dialog.locator("[name^=element_]").first().waitFor({ state: "attached", timeout: 30_000 });
  await page.waitForTimeout(500);
  mark("form");
  result.dialog_title = (await dialog.locator("h2, [data-part=title]").first().textContent())?.trim();

  const items = dialog.locator("[data-scope=accordion][data-part=item]");
  const submit = dialog.getByTestId("trigger-dag-submit");
  const readSections = () => items.evaluateAll((all) => all.map((item) => {
    const trigger = item.querySelector(":scope > [data-part=item-trigger]");
    return {
      title: trigger.querySelector("p")?.textContent.trim() ?? trigger.textContent.trim(),
      // A section holding a required field left empty gets a warning icon beside its title.
      flagged: [...trigger.querySelectorAll("svg")].some((svg) => !svg.closest("[data-part=item-indicator]")),
      open: item.getAttribute("data-state") === "open",
    };
  }));
  result.sections = await readSections();
  result.submit_enabled_initial = await submit.isEnabled();
  await page.screenshot({ path: `${shot_dir}/form.png` });

  // Every field, folded or not (folded sections keep their fields in the DOM): section, label, description, kind,
  // value. Each field's control is named element_<param>; a select keeps its value in a hidden input.
  result.fields = await dialog.evaluate((root) => {
    const out = {};
    for (const el of root.querySelectorAll("[name^=element_]")) {
      const name = el.getAttribute("name").slice("element_".length);
      const item = el.closest("[data-scope=accordion][data-part=item]");
      const row = el.closest("[data-scope=field][data-part=root]");
      const label = row?.querySelector("[data-part=label]");
      let kind = el.tagName === "TEXTAREA" ? "textarea" : "text";
      if (el.type === "checkbox") kind = el.closest("[data-scope=switch]") ? "switch" : "checkbox";
      else if (el.type === "hidden") kind = "select";
      else if (el.closest("[data-scope=number-input]")) kind = "number";
      const shown = kind === "select" ? root.querySelector(`[id="element_${name}"]`) : null;
      out[name] = {
        section: item?.querySelector(":scope > [data-part=item-trigger] p")?.textContent.trim() ?? null,
        kind,
        value: kind === "switch" || kind === "checkbox" ? el.checked : el.value,
        shown: shown ? shown.textContent.trim() : null,  // what a select displays
        label: label ? [...label.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join("").trim()
                     : null,
        required: label ? label.hasAttribute("data-required") : null,
        description: row?.querySelector("[data-part=helper-text]")?.textContent.trim() ?? null,
        min: el.getAttribute("aria-valuemin"),
      };
    }
    return out;
  });

  const unfold = async (title) => {
    const trigger = dialog.locator(`[data-scope=accordion][data-part=item-trigger][id$=":trigger:${title}"]`);
    if ((await trigger.getAttribute("aria-expanded")) !== "true") await trigger.click();
    await page.waitForTimeout(400);  // the accordion's animation
  };
  // Each select's options, as its menu lists them.
  result.options = {};
  for (const name of SELECTS) {
    const field = result.fields[name];
    if (!field) continue;
    await unfold(field.section);
    const box = dialog.locator(`[id="element_${name}"]`);
    await box.scrollIntoViewIfNeeded();
    await box.click();
    const option = page.getByRole("option");
    await option.first().waitFor({ timeout: 5_000 }).catch(() => {});
    result.options[name] = await option.allTextContents();
    // Closed by a second click (Escape would close the whole dialog).
    await dialog.locator(`[id="element_${name}"]`).click();
    await option.first().waitFor({ state: "detached", timeout: 5_000 });
  }
  // Photographs: the dialog with one section unfolded (a tall viewport, so nothing scrolls inside it).
  await page.setViewportSize({ width: 1100, height: 2400 });
  for (const title of SHOW) {
    if (!result.sections.some((s) => s.title === title)) continue;
    await unfold(title);
    await page.mouse.move(0, 0);
    await dialog.screenshot({ path: `${shot_dir}/${title}.png` });
  }
  await page.setViewportSize({ width: 1100, height: 900 });

  for (const [name, text] of Object.entries(changes)) {
    await unfold(result.fields[name].section);
    const input = dialog.locator(`[name="element_${name}"]`);
    await input.fill(String(text));
    await input.blur();
  }
  await page.waitForTimeout(300);
  result.sections_before_submit = await readSections();
  result.submit_enabled = await submit.isEnabled();
  mark("filled");

  if (result.submit_enabled) {
    const posted = page.waitForResponse((res) => res.request().method() === "POST"
      && new URL(res.url()).pathname.endsWith(`/dags/${encodeURIComponent(dag_id)}/dagRuns`), { timeout: 30_000 });
    await submit.click();
    const res = await posted;
    result.post = { status: res.status(), body: res.request().postDataJSON(), answer: await res.json().catch(() => null) };
    result.toast = await page.getByText("Dag Run Triggered").first().waitFor({ timeout: 15_000 })
      .then(() => true, () => false);
    mark("submitted");
  }
} catch (err) {
  result.error = String(err?.stack ?? err);
  process.exitCode = 1;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
