// What drive_page.mjs and drive_encoder.mjs share: reading the plan, launching headless Chromium
// with the page's console errors / failed requests / requests recorded, opening the site until
// it is ready, and the pointer steps (clear, click, drag) in image pixel coordinates.
import { readFileSync } from 'node:fs';
import puppeteer from 'puppeteer-core';

// The plan file named on the command line, and its timeout (ms) with the driver's default.
export function readPlan(defaultTimeoutMs) {
  const plan = JSON.parse(readFileSync(process.argv[2], 'utf8'));
  return { plan, timeout: plan.timeoutMs || defaultTimeoutMs };
}

// Launches the browser, runs body(browser, page, result), closes the browser, prints result as JSON.
export async function drive(plan, body) {
  const result = { steps: [], consoleErrors: [], failedRequests: [], requests: [] };
  const browser = await puppeteer.launch({
    executablePath: plan.chromium,
    headless: true,
    userDataDir: plan.userDataDir,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    await page.setViewport({ width: 1100, height: 900 });
    page.on('console', (m) => { if (m.type() === 'error') result.consoleErrors.push(m.text()); });
    page.on('pageerror', (e) => result.consoleErrors.push(`pageerror: ${e.message}`));
    page.on('requestfailed', (r) => result.failedRequests.push(`${r.url()}: ${r.failure()?.errorText}`));
    page.on('request', (r) => result.requests.push(r.url()));
    await body(browser, page, result);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result));
}

// Loads the site and waits until the page says it is ready (or failed).
export async function openSite(page, url, timeout) {
  await page.goto(url, { waitUntil: 'load', timeout });
  await page.waitForFunction('window.peftexportWeb && (window.peftexportWeb.ready || window.peftexportWeb.error)',
    { timeout });
}

// Screen position of the centre of image pixel (x, y).
async function screen(page, x, y) {
  const r = await page.$eval('#canvas', (c) => {
    const b = c.getBoundingClientRect();
    return { left: b.left, top: b.top, width: b.width, height: b.height, w: c.width, h: c.height };
  });
  return [r.left + ((x + 0.5) * r.width) / r.w, r.top + ((y + 0.5) * r.height) / r.h];
}

// Does a {clear}, {click: [x, y], button?} or {drag: [x0, y0, x1, y1]} step; false for any other step.
export async function pointerStep(page, step) {
  if (step.clear) {
    await page.click('#clear');
  } else if (step.click) {
    const [x, y] = await screen(page, ...step.click);
    await page.mouse.click(x, y, { button: step.button || 'left' });
  } else if (step.drag) {
    const [x0, y0] = await screen(page, step.drag[0], step.drag[1]);
    const [x1, y1] = await screen(page, step.drag[2], step.drag[3]);
    await page.mouse.move(x0, y0);
    await page.mouse.down();
    await page.mouse.move(x1, y1, { steps: 8 });
    await page.mouse.up();
  } else {
    return false;
  }
  return true;
}
