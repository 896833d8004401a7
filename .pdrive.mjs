import puppeteer from 'puppeteer-core';
const browser = await puppeteer.launch({executablePath:'/usr/bin/chromium', headless:true, args:['--no-sandbox','--disable-gpu','--no-first-run','--disable-background-networking','--disable-component-update','--disable-sync'], userDataDir: '/tmp/h14proto/udd'+Date.now()});
const page = await browser.newPage();
page.on('console', m => console.error('console', m.type(), m.text()));
await page.goto(process.argv[2]);
await page.waitForFunction('window.result', {timeout: 600000});
console.log(JSON.stringify(await page.evaluate('window.result')));
await browser.close();
