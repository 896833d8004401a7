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
import { drive, openSite, pointerStep, readPlan } from './common.mjs';

const { plan, timeout } = readPlan(120000);

await drive(plan, async (browser, page, result) => {
  await openSite(page, plan.url, timeout);
  const checkError = async () => {
    const error = await page.evaluate('window.peftexportWeb.error');
    if (error) throw new Error(`page error: ${error}`);
  };
  await checkError();
  result.openVisible = await page.$eval('#open', (e) => !e.hidden);

  const snapshot = () => page.evaluate('window.peftexportWeb.snapshot()');
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
    } else {
      await pointerStep(page, step);
    }
    result.steps.push({ step, state: await settled(before) });
  }
  result.timings = await page.evaluate('window.peftexportWeb.timings');
  result.encodes = await page.evaluate('window.peftexportWeb.encodes');
  result.encoderLoadMs = await page.evaluate('window.peftexportWeb.encoderLoadMs');
  result.status = await page.$eval('#status', (e) => e.textContent);
  result.options = await page.$$eval('#image option', (os) => os.map((o) => o.textContent));
});
