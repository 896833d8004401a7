// app.js: the page. Pick an image; left click adds a positive point, right click a negative
// one, a drag draws the box; every prompt runs the decoder with the previous mask's low-res
// logits as mask_input (SamPredictor's iterative use) and redraws the overlay.
//
// window.peftexportWeb exposes the state for tests and scripts (snapshot(), ready, error).
import * as ort from './ort/ort.wasm.min.mjs';
import { encodeRle, loadDecoder, maskFromLowRes } from './sam.js';

const $ = (id) => document.getElementById(id);
const canvas = $('canvas');
const ctx = canvas.getContext('2d');
const DRAG_PX = 5; // a press that moves further (screen pixels) is a box, not a click

const state = {
  site: null, decoder: null, threads: 1,
  image: null, picture: null, prepared: false,
  points: [], box: null, lowRes: null, mask: null, iou: null, index: null,
  decoderMs: null, postMs: null, version: 0, busy: false, pending: false, drag: null,
};

const api = {
  ready: false,
  error: null,
  timings: [],
  snapshot() {
    return {
      image: state.image && state.image.name, width: state.image && state.image.width,
      height: state.image && state.image.height, points: state.points, box: state.box,
      index: state.index, iou: state.iou, version: state.version, busy: state.busy || state.pending,
      decoderMs: state.decoderMs, threads: state.threads, isolated: self.crossOriginIsolated,
      rle: state.mask ? encodeRle(state.mask) : null,
    };
  },
};
window.peftexportWeb = api;

function status(text) {
  $('status').textContent = text;
}

function fail(err) {
  api.error = String(err && err.message ? err.message : err);
  status(`error: ${api.error}`);
  console.error(err);
}

async function fetchOk(url) {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res;
}

function loadPicture(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`${url}: cannot load image`));
    img.src = url;
  });
}

async function selectImage(i) {
  const rec = state.site.images[i];
  const [picture, buffer] = await Promise.all([
    loadPicture(rec.image), fetchOk(rec.embedding).then((r) => r.arrayBuffer()),
  ]);
  const want = state.site.embedding_shape.reduce((a, b) => a * b, 1) * 4;
  if (buffer.byteLength !== want) throw new Error(`${rec.embedding}: ${buffer.byteLength} bytes, expected ${want}`);
  state.prepared = false;
  status(`${rec.name}: preparing the decoder ...`);
  await state.decoder.prepare(new Float32Array(buffer)); // the click decoder's per-image session
  Object.assign(state, { image: rec, picture, prepared: true });
  canvas.width = rec.width;
  canvas.height = rec.height;
  clearPrompts();
}

function clearPrompts() {
  Object.assign(state, { points: [], box: null, lowRes: null, mask: null, iou: null, index: null });
  state.version++;
  $('export').disabled = true;
  draw();
  status(`${state.image.name}: ${state.image.width}x${state.image.height}, ready (${threadText()})`);
}

function threadText() {
  const why = self.crossOriginIsolated ? '' : ', not cross-origin isolated';
  return `wasm, ${state.threads} thread${state.threads > 1 ? 's' : ''}${why}`;
}

// Decodes the current prompt; prompts that arrive meanwhile are decoded right after, together.
async function update() {
  if (state.busy) {
    state.pending = true;
    return;
  }
  state.busy = true;
  try {
    do {
      state.pending = false;
      if (!state.prepared || (!state.points.length && !state.box)) break;
      const r = await state.decoder.decode(state.image, state.points, state.box, state.lowRes);
      const t0 = performance.now();
      state.mask = maskFromLowRes(r.lowRes, state.site.low_res_size, state.site.image_size, state.image);
      Object.assign(state, { lowRes: r.lowRes, iou: r.iou, index: r.index, decoderMs: r.decoderMs });
      state.postMs = performance.now() - t0;
      api.timings.push({ decoderMs: r.decoderMs, postMs: state.postMs });
      state.version++;
      draw();
      let area = 0;
      for (const v of state.mask) area += v;
      $('export').disabled = false;
      status(`decoder ${r.decoderMs.toFixed(1)} ms, mask ${state.postMs.toFixed(1)} ms (${threadText()}) · `
        + `mask ${r.index}, predicted IoU ${r.iou[r.index].toFixed(3)}, ${area} px`);
    } while (state.pending);
  } catch (err) {
    fail(err);
  } finally {
    state.busy = false;
  }
}

function draw() {
  const { width: w, height: h } = canvas;
  ctx.drawImage(state.picture, 0, 0, w, h);
  if (state.mask) {
    const overlay = ctx.getImageData(0, 0, w, h);
    const px = overlay.data;
    for (let i = 0; i < state.mask.length; i++) {
      if (!state.mask[i]) continue;
      px[4 * i] = (px[4 * i] * 0.45 + 30 * 0.55) | 0;
      px[4 * i + 1] = (px[4 * i + 1] * 0.45 + 144 * 0.55) | 0;
      px[4 * i + 2] = (px[4 * i + 2] * 0.45 + 255 * 0.55) | 0;
    }
    ctx.putImageData(overlay, 0, 0);
  }
  const scale = w / canvas.getBoundingClientRect().width || 1; // image pixels per screen pixel
  const box = state.drag && state.drag.box ? state.drag.box : state.box;
  if (box) {
    ctx.strokeStyle = '#ffd200';
    ctx.lineWidth = 2 * scale;
    ctx.strokeRect(box.x0 + 0.5, box.y0 + 0.5, box.x1 - box.x0, box.y1 - box.y0);
  }
  for (const p of state.points) {
    ctx.beginPath();
    ctx.arc(p.x + 0.5, p.y + 0.5, 5 * scale, 0, 2 * Math.PI);
    ctx.fillStyle = p.label ? '#00dc00' : '#e60000';
    ctx.fill();
    ctx.lineWidth = 1.5 * scale;
    ctx.strokeStyle = '#000';
    ctx.stroke();
  }
}

// The image pixel under the pointer: SAM's coordinates are pixel indices (its prompt
// encoder adds 0.5 to reach the pixel centre), as in `peftexport predict --points`.
function pixelAt(event) {
  const r = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - r.left) * canvas.width) / r.width);
  const y = Math.floor(((event.clientY - r.top) * canvas.height) / r.height);
  return { x: Math.min(Math.max(x, 0), canvas.width - 1), y: Math.min(Math.max(y, 0), canvas.height - 1) };
}

function onMouseDown(event) {
  if (!state.prepared) return;
  if (event.button === 2) {
    state.points.push({ ...pixelAt(event), label: 0 });
    update();
  } else if (event.button === 0) {
    state.drag = { start: pixelAt(event), x: event.clientX, y: event.clientY, box: null };
  }
}

function onMouseMove(event) {
  const d = state.drag;
  if (!d) return;
  if (Math.hypot(event.clientX - d.x, event.clientY - d.y) > DRAG_PX) {
    const p = pixelAt(event);
    d.box = { x0: Math.min(d.start.x, p.x), y0: Math.min(d.start.y, p.y),
      x1: Math.max(d.start.x, p.x), y1: Math.max(d.start.y, p.y) };
    draw();
  }
}

function onMouseUp(event) {
  const d = state.drag;
  if (!d || event.button !== 0) return;
  state.drag = null;
  onMouseMove(event); // a release far from the press is a box even without a move event
  if (d.box) state.box = d.box;
  else state.points.push({ ...d.start, label: 1 });
  update();
}

function exportMask() {
  if (!state.mask) return;
  const { width: w, height: h } = state.image;
  const out = document.createElement('canvas');
  out.width = w;
  out.height = h;
  const c = out.getContext('2d');
  const img = c.createImageData(w, h);
  for (let i = 0; i < state.mask.length; i++) {
    const v = state.mask[i] ? 255 : 0;
    img.data.set([v, v, v, 255], 4 * i);
  }
  c.putImageData(img, 0, 0);
  out.toBlob((blob) => {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = `${state.image.name}_mask.png`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }, 'image/png');
}

async function main() {
  ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).href;
  // Threads need SharedArrayBuffer, i.e. COOP/COEP headers (python -m peft_export.web.serve).
  state.threads = self.crossOriginIsolated ? Math.max(1, Math.min(navigator.hardwareConcurrency || 1, 8)) : 1;
  ort.env.wasm.numThreads = state.threads;
  status('loading model ...');
  state.site = await (await fetchOk('site.json')).json();
  const s = state.site;
  $('model').textContent = `${s.model_type} (${s.peft || 'no PEFT'}${s.adapter ? `, adapter ${s.adapter}` : ''}), `
    + `image size ${s.image_size}, decoder ${s.decoder.graph} ${s.decoder.precision}`;
  $('warning').hidden = !s.random_weights;
  if (s.model_note) $('warning').textContent = s.model_note;  // what the weights are (site.py's model_note)
  state.decoder = await loadDecoder(ort, s);
  const select = $('image');
  s.images.forEach((rec, i) => select.add(new Option(`${rec.name} (${rec.width}x${rec.height})`, String(i))));
  // One image at a time: a pick made while another image's decoder is prepared waits its turn.
  let selecting = Promise.resolve();
  select.addEventListener('change', () => {
    selecting = selecting.then(() => selectImage(Number(select.value))).catch(fail);
  });
  canvas.addEventListener('mousedown', onMouseDown);
  window.addEventListener('mousemove', onMouseMove);
  window.addEventListener('mouseup', onMouseUp);
  canvas.addEventListener('contextmenu', (e) => e.preventDefault());
  $('clear').addEventListener('click', clearPrompts);
  $('export').addEventListener('click', exportMask);
  await selectImage(0);
  api.ready = true;
}

main().catch(fail);
