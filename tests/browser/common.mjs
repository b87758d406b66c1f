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
