// sam.js: SAM prompts -> mask with an exported decoder graph on onnxruntime-web.
//
// A small ES module, no dependencies: the caller passes the `ort` namespace in. It mirrors
// peft_export.runtime exactly, so the page shows what SamSession.predict returns
// (ClickDecoder: the click decoder picks the mask itself, by the same rule):
//   encodePrompt     = runtime.prompts.encode_prompts + preprocess.transform_coords
//   shownMaskIndex   = web.decoder_check.shown_mask_index (Meta's ONNX select_masks rule)
//   logitsFromLowRes = runtime.postprocess.postprocess_masks (maskFromLowRes: then logits > 0)

const f32 = Math.fround;

/** Prompt in original-image pixels -> decoder point_coords / point_labels (Meta's ONNX conventions).
 *  points: [{x, y, label}] (label 1 positive, 0 negative); box: {x0, y0, x1, y1} or null;
 *  image: a site.json image record (width, height, input_size = [h, w] after the longest-side resize). */
export function encodePrompt(points, box, image) {
  const [newH, newW] = image.input_size;
  const sx = newW / image.width;
  const sy = newH / image.height;
  const coords = [];
  const labels = [];
  for (const p of points) {
    coords.push(p.x * sx, p.y * sy);
    labels.push(p.label);
  }
  if (box) {
    coords.push(box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy);
    labels.push(2, 3);
  } else {
    coords.push(0, 0); // the padding point SAM's prompt encoder adds when there is no box
    labels.push(-1);
  }
  return { coords: Float32Array.from(coords), labels: Float32Array.from(labels), n: labels.length };
}

/** One click (+ padding) or a box alone is ambiguous: best multimask output; else token 0. */
export function shownMaskIndex(iou, nDecoderPoints) {
  if (nDecoderPoints > 2) return 0;
  let best = 1;
  for (let k = 2; k < 4; k++) if (iou[k] > iou[best]) best = k;
  return best;
}

// PyTorch's bilinear (align_corners=False) source indices and weights, in float32 like torch.
function axisWeights(inSize, outSize, keep) {
  const scale = f32(inSize / outSize);
  const i0 = new Int32Array(keep);
  const i1 = new Int32Array(keep);
  const l0 = new Float32Array(keep);
  const l1 = new Float32Array(keep);
  for (let d = 0; d < keep; d++) {
    // One rounding, as torch's fused multiply-add (runtime.postprocess.axis_map): in float64 the
    // product of two float32 values and the subtraction of 0.5 are exact here.
    const src = Math.max(f32(scale * (d + 0.5) - 0.5), 0);
    const a = Math.trunc(src);
    i0[d] = a;
    i1[d] = a < inSize - 1 ? a + 1 : a;
    l1[d] = Math.min(Math.max(f32(src - a), 0), 1);
    l0[d] = f32(1 - l1[d]);
  }
  return { i0, i1, l0, l1 };
}

/** F.interpolate(x, (outH, outW), bilinear) of a row-major inH x inW map, top-left keepH x keepW only. */
export function resizeBilinear(x, inH, inW, outH, outW, keepH = outH, keepW = outW) {
  if (inH === outH && inW === outW) {
    const out = new Float32Array(keepH * keepW);
    for (let r = 0; r < keepH; r++) out.set(x.subarray(r * inW, r * inW + keepW), r * keepW);
    return out;
  }
  const cw = axisWeights(inW, outW, keepW);
  const rows = new Float32Array(inH * keepW); // width pass first, as the numpy runtime does
  for (let r = 0; r < inH; r++) {
    const base = r * inW;
    for (let c = 0; c < keepW; c++) {
      rows[r * keepW + c] = f32(x[base + cw.i0[c]] * cw.l0[c]) + f32(x[base + cw.i1[c]] * cw.l1[c]);
    }
  }
  const rh = axisWeights(inH, outH, keepH);
  const out = new Float32Array(keepH * keepW);
  for (let r = 0; r < keepH; r++) {
    const a = rh.i0[r] * keepW;
    const b = rh.i1[r] * keepW;
    const wa = rh.l0[r];
    const wb = rh.l1[r];
    for (let c = 0; c < keepW; c++) out[r * keepW + c] = f32(rows[a + c] * wa) + f32(rows[b + c] * wb);
  }
  return out;
}

/** Low-res logits (s x s) -> logits at the image's size (height x width), as Sam.postprocess_masks. */
export function logitsFromLowRes(lowRes, s, imageSize, image) {
  const [inH, inW] = image.input_size;
  const cropped = resizeBilinear(lowRes, s, s, imageSize, imageSize, inH, inW);
  return resizeBilinear(cropped, inH, inW, image.height, image.width);
}

/** Low-res logits -> binary mask (height x width, 1 inside): the logits above 0. */
export function maskFromLowRes(lowRes, s, imageSize, image) {
  const logits = logitsFromLowRes(lowRes, s, imageSize, image);
  const mask = new Uint8Array(logits.length);
  for (let i = 0; i < logits.length; i++) mask[i] = logits[i] > 0 ? 1 : 0;
  return mask;
}

/** Run-length encoding of a row-major 0/1 mask: alternating run lengths, starting with 0s. */
export function encodeRle(mask) {
  const counts = [];
  let value = 0;
  let run = 0;
  for (let i = 0; i < mask.length; i++) {
    if (mask[i] !== value) {
      counts.push(run);
      value = mask[i];
      run = 0;
    }
    run++;
  }
  counts.push(run);
  return counts;
}

const SESSION_OPTIONS = { executionProviders: ['wasm'], graphOptimizationLevel: 'all' };

/** Decoder feeds shared by both decoders: the prompt, and the previous mask (or none). */
function promptFeeds(Tensor, image, points, box, maskInput, s) {
  const { coords, labels, n } = encodePrompt(points, box, image);
  return {
    n,
    feeds: {
      point_coords: new Tensor('float32', coords, [1, n, 2]),
      point_labels: new Tensor('float32', labels, [1, n]),
      mask_input: new Tensor('float32', maskInput || new Float32Array(s * s), [1, 1, s, s]),
      has_mask_input: new Tensor('float32', Float32Array.of(maskInput ? 1 : 0), [1]),
    },
  };
}

/** The click decoder (site.decoder.context_graph set): split_image once per image, then a session
 *  of click_decoder whose context.bin is that image's context; per click it returns the shown mask.
 *  Mirrors peft_export.web.decoder_check.decode_shown on the same two graphs. */
export class ClickDecoder {
  constructor(ort, contextSession, model, site) {
    Object.assign(this, { ort, contextSession, model, site, session: null, running: null });
    this.s = site.low_res_size;
  }

  static async load(ort, site) {
    const [contextSession, model] = await Promise.all([
      ort.InferenceSession.create(site.decoder.context_graph, SESSION_OPTIONS),
      fetch(site.decoder.path).then((r) => {
        if (!r.ok) throw new Error(`${site.decoder.path}: HTTP ${r.status}`);
        return r.arrayBuffer();
      }),
    ]);
    return new ClickDecoder(ort, contextSession, new Uint8Array(model), site);
  }

  /** One image's embedding (float32 1x256xgxg) -> its click session (the previous one released). */
  async prepare(embedding) {
    const { Tensor, InferenceSession } = this.ort;
    const out = await this.contextSession.run({
      image_embeddings: new Tensor('float32', embedding, this.site.embedding_shape),
    });
    const layout = this.site.decoder.context;
    const last = layout[layout.length - 1];
    const bytes = new Uint8Array(last.offset + last.length);
    for (const part of layout) {
      const data = out[part.name].data;
      if (data.byteLength !== part.length) throw new Error(`split_image: ${part.name} has ${data.byteLength} bytes, expected ${part.length}`);
      bytes.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), part.offset);
    }
    for (const t of Object.values(out)) t.dispose?.();
    const session = await InferenceSession.create(this.model, {
      ...SESSION_OPTIONS, externalData: [{ path: this.site.decoder.context_file, data: bytes }],
    });
    await this.running?.catch(() => {}); // never release a session mid-run
    const old = this.session;
    this.session = session;
    await old?.release();
  }

  /** Decode a prompt on the prepared image; maskInput: low-res logits (s*s) of the previous mask, or null.
   *  Returns {lowRes (s*s logits of the shown mask), iou (all 4), index, decoderMs}. */
  async decode(image, points, box, maskInput) {
    const s = this.s;
    const { feeds } = promptFeeds(this.ort.Tensor, image, points, box, maskInput, s);
    const t0 = performance.now();
    this.running = this.session.run(feeds);
    const out = await this.running;
    const decoderMs = performance.now() - t0;
    const result = {
      lowRes: out.low_res_masks.data.slice(0, s * s),
      iou: Array.from(out.iou_predictions.data),
      index: Number(out.mask_index.data[0]),
      decoderMs,
    };
    for (const t of Object.values(out)) t.dispose?.();
    return result;
  }
}

/** An export's decoder_lowres or Meta's decoder graph (exports without a click decoder): the
 *  embedding is an input of every click, and the page picks the shown mask (shownMaskIndex). */
export class SamDecoder {
  constructor(ort, session, site) {
    Object.assign(this, { ort, session, site, embedding: null });
    this.s = site.low_res_size;
    this.metaInterface = session.inputNames.includes('orig_im_size');
  }

  static async load(ort, site) {
    return new SamDecoder(ort, await ort.InferenceSession.create(site.decoder.path, SESSION_OPTIONS), site);
  }

  /** One image's embedding (float32 1x256xgxg), fed to every click on that image. */
  async prepare(embedding) {
    this.embedding = new this.ort.Tensor('float32', embedding, this.site.embedding_shape);
  }

  async decode(image, points, box, maskInput) {
    const { Tensor } = this.ort;
    const s = this.s;
    const { feeds, n } = promptFeeds(Tensor, image, points, box, maskInput, s);
    feeds.image_embeddings = this.embedding;
    if (this.metaInterface) {
      feeds.orig_im_size = new Tensor('float32', Float32Array.of(image.height, image.width), [2]);
    }
    const t0 = performance.now();
    const out = await this.session.run(feeds);
    const decoderMs = performance.now() - t0;
    const iou = Array.from(out.iou_predictions.data);
    const index = shownMaskIndex(iou, n);
    const lowRes = out.low_res_masks.data.slice(index * s * s, (index + 1) * s * s);
    for (const t of Object.values(out)) t.dispose?.();
    return { lowRes, iou, index, decoderMs };
  }
}

/** The site's decoder: the click decoder where the site has one. */
export function loadDecoder(ort, site) {
  return site.decoder.context_graph ? ClickDecoder.load(ort, site) : SamDecoder.load(ort, site);
}
