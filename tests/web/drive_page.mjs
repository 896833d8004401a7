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
import { mkdirSync, readdirSync } from 'node:fs';
import { drive, openSite, pointerStep, readPlan } from './common.mjs';

const { plan, timeout } = readPlan(60000);

await drive(plan, async (browser, page, result) => {
  if (plan.downloads) {
    mkdirSync(plan.downloads, { recursive: true });
    const cdp = await browser.target().createCDPSession();
    await cdp.send('Browser.setDownloadBehavior', { behavior: 'allow', downloadPath: plan.downloads });
  }
  await openSite(page, plan.url, timeout);
  const error = await page.evaluate('window.peftexportWeb.error');
  if (error) throw new Error(`page error: ${error}`);

  const snapshot = () => page.evaluate('window.peftexportWeb.snapshot()');
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
    } else if (await pointerStep(page, step)) {
      // done by pointerStep
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
});
