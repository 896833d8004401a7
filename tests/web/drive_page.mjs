// Drives a `peftexport web` site in headless Chromium (puppeteer-core, Debian's chromium) and
// prints what the page did as JSON on stdout: the page state after every step, console errors,
// failed requests and every URL the page asked for.
//
//   node tests/web/drive_page.mjs PLAN.json
//
// PLAN: {url, chromium, userDataDir, screenshot?, downloads?, timeoutMs?, steps: [...]}; steps use
// image pixel coordinates: {select: i} | {click: [x, y], button?: "left"|"right"} |
// {drag: [x0, y0, x1, y1]} | {clear: true} | {export: true}. Real (not virtual) time throughout: headless
// Chromium's --virtual-time-budget would freeze performance.now() and with it the timings.
import { mkdirSync, readFileSync, readdirSync } from 'node:fs';
import puppeteer from 'puppeteer-core';

const plan = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const timeout = plan.timeoutMs || 60000;
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
  if (plan.downloads) {
    mkdirSync(plan.downloads, { recursive: true });
    const cdp = await browser.target().createCDPSession();
    await cdp.send('Browser.setDownloadBehavior', { behavior: 'allow', downloadPath: plan.downloads });
  }
  await page.goto(plan.url, { waitUntil: 'load', timeout });
  await page.waitForFunction('window.peftexportWeb && (window.peftexportWeb.ready || window.peftexportWeb.error)',
    { timeout });
  const error = await page.evaluate('window.peftexportWeb.error');
  if (error) throw new Error(`page error: ${error}`);

  const snapshot = () => page.evaluate('window.peftexportWeb.snapshot()');
  // Screen position of the centre of image pixel (x, y).
  const screen = async (x, y) => {
    const r = await page.$eval('#canvas', (c) => {
      const b = c.getBoundingClientRect();
      return { left: b.left, top: b.top, width: b.width, height: b.height, w: c.width, h: c.height };
    });
    return [r.left + ((x + 0.5) * r.width) / r.w, r.top + ((y + 0.5) * r.height) / r.h];
  };
  const settled = async (before) => {
    await page.waitForFunction(
      (v) => { const s = window.peftexportWeb.snapshot(); return s.version > v && !s.busy; },
      { timeout }, before);
    return snapshot();
  };

  for (const step of plan.steps) {
    const before = (await snapshot()).version;
    if (step.select !== undefined) {
      await page.select('#image', String(step.select));
    } else if (step.clear) {
      await page.click('#clear');
    } else if (step.click) {
      const [x, y] = await screen(...step.click);
      await page.mouse.click(x, y, { button: step.button || 'left' });
    } else if (step.drag) {
      const [x0, y0] = await screen(step.drag[0], step.drag[1]);
      const [x1, y1] = await screen(step.drag[2], step.drag[3]);
      await page.mouse.move(x0, y0);
      await page.mouse.down();
      await page.mouse.move(x1, y1, { steps: 8 });
      await page.mouse.up();
    } else if (step.export) {
      await page.click('#export');
      const t0 = Date.now();
      let files = [];
      while (Date.now() - t0 < timeout) {
        files = readdirSync(plan.downloads).filter((f) => f.endsWith('.png'));
        if (files.length) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      result.steps.push({ step, downloads: files });
      continue;
    }
    result.steps.push({ step, state: await settled(before) });
  }
  result.timings = await page.evaluate('window.peftexportWeb.timings');
  result.status = await page.$eval('#status', (e) => e.textContent);
  if (plan.screenshot) await page.screenshot({ path: plan.screenshot });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result));
