// app.js: the page. Pick an image; left click adds a positive point, right click a negative
// one, a drag draws the box; every prompt runs the decoder with the previous mask's low-res
// logits as mask_input (SamPredictor's iterative use) and redraws the overlay. A site with the
// encoder in the browser (site.encoder) also lets a person open their own image (file picker or
// drag and drop): encoder.js preprocesses it as the runtime does and runs the encoder here.
//
// window.peftexportWeb exposes the state for tests and scripts (snapshot(), ready, error).
import * as ort from './ort/ort.wasm.min.mjs';
import { BrowserEncoder, decodeImageFile } from './encoder.js';
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
  records: [], encoder: null, encoding: false, last: null, // images: the site's, then the opened ones
};
let selecting = Promise.resolve(); // one image at a time: picks and opens wait their turn

const api = {
  ready: false,
  error: null,
  timings: [],
  encodes: [], // per opened image: {name, preprocessMs, encoderMs, prepareMs}
  encoderLoadMs: null,
  /** The last opened image's 'embedding' or encoder 'input' (float32, little-endian) as base64. */
  tensorBase64(name) {
    const t = state.last && state.last[name];
    if (!t) return null;
    const bytes = new Uint8Array(t.buffer, t.byteOffset, t.byteLength);
    let text = '';
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(text);
  },
  snapshot() {
    return {
      image: state.image && state.image.name, width: state.image && state.image.width,
      height: state.image && state.image.height, points: state.points, box: state.box,
      index: state.index, iou: state.iou, version: state.version,
      busy: state.busy || state.pending || state.encoding, inputSize: state.image && state.image.input_size,
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
  const rec = state.records[i];
  let picture = rec.picture;
  let embedding = rec.embedding;
  if (!rec.opened) {
    let buffer;
    [picture, buffer] = await Promise.all([
      loadPicture(rec.image), fetchOk(rec.embedding).then((r) => r.arrayBuffer()),
    ]);
    const want = state.site.embedding_shape.reduce((a, b) => a * b, 1) * 4;
    if (buffer.byteLength !== want) throw new Error(`${rec.embedding}: ${buffer.byteLength} bytes, expected ${want}`);
    embedding = new Float32Array(buffer);
  }
  state.prepared = false;
  status(`${rec.name}: preparing the decoder ...`);
  const t0 = performance.now();
  await state.decoder.prepare(embedding); // the click decoder's per-image session
  rec.prepareMs = performance.now() - t0;
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
  const enc = state.image.encoderMs ? `, encoder ${state.image.encoderMs.toFixed(0)} ms` : '';
  status(`${state.image.name}: ${state.image.width}x${state.image.height}${enc}, ready (${threadText()})`);
}

function uniqueName(fileName) {
  const base = fileName.replace(/\.[^.]*$/, '').replace(/[^A-Za-z0-9._-]/g, '_') || 'image';
  let name = base;
  for (let k = 2; state.records.some((r) => r.name === name); k++) name = `${base}-${k}`;
  return name;
}

// The encoder's session, created once (at page load when the site has no precomputed image).
let encoderLoading = null;
function loadEncoder() {
  if (!encoderLoading) {
    const t0 = performance.now();
    encoderLoading = BrowserEncoder.load(ort, state.site).then((encoder) => {
      api.encoderLoadMs = performance.now() - t0;
      return encoder;
    });
  }
  return encoderLoading;
}

// A file the person picked or dropped: decode, preprocess + encode here, then select it like a site image.
async function openFile(file) {
  state.encoding = true;
  try {
    status(`${file.name}: reading ...`);
    const { rgb, width, height, picture } = await decodeImageFile(file);
    if (!state.encoder) {
      status('loading the encoder ...');
      state.encoder = await loadEncoder();
    }
    status(`${file.name}: running the encoder (${threadText()}) ...`);
    const r = await state.encoder.encode(rgb, height, width);
    const rec = { name: uniqueName(file.name), source: file.name, width, height, input_size: r.inputSize,
      opened: true, picture, embedding: r.embedding, encoderMs: r.encoderMs };
    state.last = { embedding: r.embedding, input: r.input };
    state.records.push(rec);
    const i = state.records.length - 1;
    $('image').add(new Option(`${rec.name} (${width}x${height}, opened)`, String(i)));
    $('image').value = String(i);
    await selectImage(i);
    api.encodes.push({ name: rec.name, preprocessMs: r.preprocessMs, encoderMs: r.encoderMs, prepareMs: rec.prepareMs });
  } finally {
    state.encoding = false;
  }
}

function open(file) {
  if (file) selecting = selecting.then(() => openFile(file)).catch(fail);
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
  if (!state.picture) return;
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
  state.records = s.images.slice();
  s.images.forEach((rec, i) => select.add(new Option(`${rec.name} (${rec.width}x${rec.height})`, String(i))));
  if (s.encoder) {
    $('open').hidden = false;
    $('file').addEventListener('change', (e) => { open(e.target.files[0]); e.target.value = ''; });
    // Drag and drop anywhere on the page (the browser would otherwise navigate to the file).
    document.addEventListener('dragover', (e) => e.preventDefault());
    document.addEventListener('drop', (e) => {
      e.preventDefault();
      open(e.dataTransfer && e.dataTransfer.files[0]);
    });
  }
  select.addEventListener('change', () => {
    selecting = selecting.then(() => selectImage(Number(select.value))).catch(fail);
  });
  canvas.addEventListener('mousedown', onMouseDown);
  window.addEventListener('mousemove', onMouseMove);
  window.addEventListener('mouseup', onMouseUp);
  canvas.addEventListener('contextmenu', (e) => e.preventDefault());
  $('clear').addEventListener('click', clearPrompts);
  $('export').addEventListener('click', exportMask);
  if (s.images.length) {
    await selectImage(0);
  } else { // a site without images has the encoder (site.py): load it ahead of the first image
    loadEncoder().catch(() => {}); // an error shows when an image is opened
    status(`open an image: the button above, or drop it on the page (encoder ${s.encoder.precision} `
      + `in the browser, ${threadText()})`);
  }
  api.ready = true;
}

main().catch(fail);
