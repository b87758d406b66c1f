// What every browser test script shares: Debian's headless chromium, and a page context that lets through only the
// requests a test allows (everything else is refused and recorded in `blocked`: pages must work air-gapped).
import { chromium } from "playwright-core";

export async function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
  });
}

// A 1:1-scale context of the given viewport in which only URLs `allowed(url)` accepts are fetched.
export async function guardedContext(browser, viewport, allowed, blocked) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  await context.route("**/*", (route) => {
    const wanted = route.request().url();
    if (allowed(wanted)) return route.continue();
    blocked.push(wanted);
    return route.abort();
  });
  return context;
}

// What the chart page (loss_chart.html) shows, read inside it: pass to page.evaluate or a locator's evaluate (it runs
// in the page, so it uses nothing from this module). The drawn series (matplotlib's SVG: each text is glyph paths
// after a comment holding the text), the table of logged values (its step cells) and the before/after answers as a
// reader gets them: each row's cell texts, whether it is rendered, its box, and any element parsed out of the
// answers (none may be: a prompt's markup is text).
export function readChartPage() {
  const comments = (root) => {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_COMMENT), out = [];
    while (walker.nextNode()) out.push(walker.currentNode.data.trim());
    return out;
  };
  const box = (el) => (({ x, y, width, height }) => ({ x, y, width, height }))(el.getBoundingClientRect());
  const legend = document.querySelector("svg #legend");
  const samples = document.querySelector("table.samples");
  const heading = samples?.previousElementSibling;
  return {
    heading: document.querySelector("h1")?.textContent ?? null,
    svg: document.querySelectorAll("figure > svg").length,
    legend: legend ? comments(legend) : [],
    train_points: document.querySelectorAll("#train-points use").length,
    eval_points: document.querySelectorAll("#eval-loss use").length,
    smooth_line: document.querySelectorAll("#train-smooth path").length,
    lr_line: document.querySelectorAll("#learning-rate path").length,
    table_steps: [...document.querySelectorAll("table:not(.samples) tbody tr")]
      .map((row) => row.cells[0]?.textContent.trim()),
    tip_hidden_before: document.getElementById("tip")?.hidden ?? null,
    samples: samples && {
      heading: heading?.tagName === "H2" ? heading.textContent : null,
      headers: [...samples.querySelectorAll("thead th")].map((th) => th.textContent),
      rows: [...samples.querySelectorAll("tbody tr")].map((tr) => ({
        cells: [...tr.cells].map((td) => td.textContent), visible: tr.checkVisibility(), box: box(tr) })),
      box: box(samples),
      elements_in_cells: [...samples.querySelectorAll("td *")].map((el) => el.tagName.toLowerCase())
        .filter((tag) => tag !== "pre"),
    },
  };
}
