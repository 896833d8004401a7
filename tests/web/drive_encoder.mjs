// Drives a `peftexport web --encoder-in-browser` site in headless Chromium (puppeteer-core, Debian's
// chromium): opens image files as a person does (the page's file input, or a drop of the file on
// the page), then clicks; prints what the page did as JSON on stdout (drive_page.mjs's result
// plus the encoder's timings and, on request, the page's last embedding / encoder input).
//
//   node tests/web/drive_encoder.mjs PLAN.json
//
// PLAN: {url, chromium, userDataDir, timeoutMs?, steps: [...]}; steps: {open: FILE} (file input) |
// {drop: FILE} (a drop event carrying the file) | {click: [x, y], button?} | {drag: [x0, y0, x1, y1]} |
// {clear: true} | {tensor: "embedding" | "input"} (base64 float32 of the last opened image).
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import puppeteer from 'puppeteer-core';

const plan = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const timeout = plan.timeoutMs || 120000;
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
  await page.goto(plan.url, { waitUntil: 'load', timeout });
  await page.waitForFunction('window.peftexportWeb && (window.peftexportWeb.ready || window.peftexportWeb.error)',
    { timeout });
  const checkError = async () => {
    const error = await page.evaluate('window.peftexportWeb.error');
    if (error) throw new Error(`page error: ${error}`);
  };
  await checkError();
  result.openVisible = await page.$eval('#open', (e) => !e.hidden);

  const snapshot = () => page.evaluate('window.peftexportWeb.snapshot()');
  const screen = async (x, y) => {
    const r = await page.$eval('#canvas', (c) => {
      const b = c.getBoundingClientRect();
      return { left: b.left, top: b.top, width: b.width, height: b.height, w: c.width, h: c.height };
    });
    return [r.left + ((x + 0.5) * r.width) / r.w, r.top + ((y + 0.5) * r.height) / r.h];
  };
  const settled = async (before) => {
    await page.waitForFunction(
      (v) => { const p = window.peftexportWeb; const s = p.snapshot(); return p.error || (s.version > v && !s.busy); },
      { timeout }, before);
    await checkError();
    return snapshot();
  };

  for (const step of plan.steps) {
    const before = (await snapshot()).version;
    if (step.open) {
      const input = await page.$('#file');
      await input.uploadFile(step.open);
    } else if (step.drop) {
      const b64 = readFileSync(step.drop).toString('base64');
      await page.evaluate((data, name) => {
        const bytes = Uint8Array.from(atob(data), (ch) => ch.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: 'image/png' }));
        document.querySelector('main').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true,
          cancelable: true }));
      }, b64, basename(step.drop));
    } else if (step.tensor) {
      result.steps.push({ step, base64: await page.evaluate((n) => window.peftexportWeb.tensorBase64(n), step.tensor) });
      continue;
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
    }
    result.steps.push({ step, state: await settled(before) });
  }
  result.timings = await page.evaluate('window.peftexportWeb.timings');
  result.encodes = await page.evaluate('window.peftexportWeb.encodes');
  result.encoderLoadMs = await page.evaluate('window.peftexportWeb.encoderLoadMs');
  result.status = await page.$eval('#status', (e) => e.textContent);
  result.options = await page.$$eval('#image option', (os) => os.map((o) => o.textContent));
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result));
