// encoder.js: the image encoder in the page (sites built with --encoder-in-browser).
//
// A person opens their own image; it is preprocessed here exactly as the runtime does it
// (peft_export/runtime/preprocess.py prepare_image: intensity rule, PIL's resize of the longest
// side, (x - mean) / std in float32, zero padding bottom/right) and the export's encoder runs on
// onnxruntime-web. Its embedding then goes to the click decoder as a precomputed one would.
//   preprocessShape = runtime.preprocess.preprocess_shape
//   resizePil       = runtime.preprocess.resize_pil (Pillow's libImaging/Resample.c, 8 bit)
//   intensityToUint8 = to_uint8(normalize_intensity(image, rule)) for 8-bit images
//   prepareInput    = runtime.preprocess.prepare_image (after the two above)

const f32 = Math.fround;
const PRECISION_BITS = 32 - 8 - 2;

/** (newH, newW) with the long side = target (ResizeLongestSide.get_preprocess_shape). */
export function preprocessShape(h, w, target) {
  const scale = (target * 1.0) / Math.max(h, w);
  return [Math.trunc(h * scale + 0.5), Math.trunc(w * scale + 0.5)];
}

function bilinear(x) {
  x = Math.abs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

function bicubic(x) {
  // Pillow's bicubic_filter, same operation order (the doubles agree bit for bit).
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

const FILTERS = { bilinear: [bilinear, 1.0], bicubic: [bicubic, 2.0] };

// Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel its first input pixel,
// its number of taps and the taps' weights in 22-bit fixed point.
function coefficients(inSize, outSize, interpolation) {
  const [filter, filterSupport] = FILTERS[interpolation];
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filterSupport * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const ss = 1.0 / filterscale;
  const xmin = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const kk = new Float64Array(outSize * ksize); // integers, exact in doubles
  const w = new Float64Array(ksize);
  for (let x = 0; x < outSize; x++) {
    const center = (x + 0.5) * scale;
    const lo = Math.max(Math.trunc(center - support + 0.5), 0);
    const n = Math.min(Math.trunc(center + support + 0.5), inSize) - lo;
    let total = 0.0;
    for (let k = 0; k < n; k++) {
      w[k] = filter((k + lo - center + 0.5) * ss);
      total += w[k];
    }
    for (let k = 0; k < n; k++) {
      const v = (total !== 0.0 ? w[k] / total : w[k]) * (1 << PRECISION_BITS);
      kk[x * ksize + k] = v < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
    }
    xmin[x] = lo;
    count[x] = n;
  }
  return { xmin, count, kk, ksize };
}

function clip8(acc) {
  const v = Math.floor(acc / (1 << PRECISION_BITS)); // C's arithmetic >> on the int32 accumulator
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// One pass along an axis of an interleaved HxWxC uint8 image (axis 1: width, 0: height).
function resampleAxis(src, h, w, c, outSize, axis, interpolation) {
  const inSize = axis === 1 ? w : h;
  const { xmin, count, kk, ksize } = coefficients(inSize, outSize, interpolation);
  const [oh, ow] = axis === 1 ? [h, outSize] : [outSize, w];
  const out = new Uint8Array(oh * ow * c);
  const half = 1 << (PRECISION_BITS - 1);
  if (axis === 1) {
    for (let y = 0; y < h; y++) {
      const row = y * w * c;
      for (let x = 0; x < outSize; x++) {
        const base = x * ksize;
        for (let ch = 0; ch < c; ch++) {
          let acc = half;
          for (let k = 0; k < count[x]; k++) acc += src[row + (xmin[x] + k) * c + ch] * kk[base + k];
          out[(y * outSize + x) * c + ch] = clip8(acc);
        }
      }
    }
  } else {
    const line = w * c;
    for (let y = 0; y < outSize; y++) {
      const base = y * ksize;
      for (let i = 0; i < line; i++) {
        let acc = half;
        for (let k = 0; k < count[y]; k++) acc += src[(xmin[y] + k) * line + i] * kk[base + k];
        out[y * line + i] = clip8(acc);
      }
    }
  }
  return out;
}

/** PIL.Image.resize of an interleaved HxWxC uint8 image to outH x outW (what the runtime runs). */
export function resizePil(src, h, w, c, outH, outW, interpolation = 'bilinear') {
  if (!FILTERS[interpolation]) throw new Error(`interpolation: unknown '${interpolation}'`);
  // Pillow (>= 13, as runtime.preprocess) runs the vertical pass first when the height shrinks by
  // more than twice as many pixels as the width; it skips a pass whose size does not change.
  const horizontalFirst = !(h - outH > 0 && h - outH > (w - outW) * 2);
  let out = src;
  let ch = h;
  let cw = w;
  for (const axis of horizontalFirst ? [1, 0] : [0, 1]) {
    const size = axis === 1 ? outW : outH;
    if (size === (axis === 1 ? w : h)) continue;
    out = resampleAxis(out, ch, cw, c, size, axis, interpolation);
    if (axis === 1) cw = size;
    else ch = size;
  }
  return out;
}

// numpy.percentile (method 'linear') of the values counted in hist (uint8 values), q in percent.
function percentile(hist, n, q) {
  const position = (n - 1) * (q / 100);
  const below = Math.floor(position);
  const gamma = position - below;
  const valueAt = (index) => {
    let seen = 0;
    for (let v = 0; v < 256; v++) {
      seen += hist[v];
      if (seen > index) return v;
    }
    return 255;
  };
  const a = valueAt(below);
  const b = valueAt(Math.min(below + 1, n - 1));
  const diff = b - a;
  return gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma; // numpy's _lerp
}

function rintEven(v) {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r; // numpy.rint: halves to even
}

/** An 8-bit RGB image (interleaved, its 3 channels) as the model sees it: runtime.intensity's
 *  normalize_intensity then to_uint8. uint8 is kept unless the rule normalises it (percentile rule
 *  without uint8 'keep'); an image whose three channels are equal counts as grayscale (one value
 *  per pixel in the percentiles, as the runtime reads a gray PNG). */
export function intensityToUint8(rgb, rule) {
  // No rule: the default (uint8 kept). A percentile rule without 'uint8' normalises uint8 too.
  if (!rule || rule.name === 'none' || rule.uint8 === 'keep') return rgb;
  const gray = rgb.every((v, i) => i % 3 !== 0 || (v === rgb[i + 1] && v === rgb[i + 2]));
  const hist = new Float64Array(256);
  for (let i = 0; i < rgb.length; i += gray ? 3 : 1) hist[rgb[i]]++;
  const n = gray ? rgb.length / 3 : rgb.length;
  let lo = percentile(hist, n, rule.low ?? 1.0);
  let hi = percentile(hist, n, rule.high ?? 99.8);
  if (hi <= lo) { // nearly constant image with rare outliers: min..max
    lo = hist.findIndex((c) => c > 0);
    hi = 255 - [...hist].reverse().findIndex((c) => c > 0);
  }
  const out = new Uint8Array(rgb.length);
  if (hi <= lo) return out;
  const gain = 255.0 / (hi - lo);
  const lut = new Uint8Array(256);
  for (let v = 0; v < 256; v++) {
    const x = Math.min(Math.max(f32((v - lo) * gain), 0), 255); // float64 -> float32, then clipped
    lut[v] = rintEven(x);
  }
  for (let i = 0; i < rgb.length; i++) out[i] = lut[rgb[i]];
  return out;
}

/** prepare_image on an 8-bit RGB image: the encoder input 1x3xSxS (float32) and input_size [h, w]. */
export function prepareInput(rgb, h, w, enc) {
  const S = enc.image_size;
  const [newH, newW] = preprocessShape(h, w, S);
  const pixels = intensityToUint8(rgb, enc.intensity);
  const resized = resizePil(pixels, h, w, 3, newH, newW, enc.interpolation || 'bilinear');
  const x = new Float32Array(3 * S * S); // zero padding bottom/right (after normalising)
  for (let c = 0; c < 3; c++) {
    const mean = f32(enc.pixel_mean[c]);
    const std = f32(enc.pixel_std[c]);
    const plane = c * S * S;
    for (let y = 0; y < newH; y++) {
      for (let xx = 0; xx < newW; xx++) {
        x[plane + y * S + xx] = f32(f32(resized[(y * newW + xx) * 3 + c] - mean) / std);
      }
    }
  }
  return { input: x, inputSize: [newH, newW] };
}

/** A file the person picked or dropped -> {rgb (interleaved 8-bit), width, height, picture}: the
 *  browser's decoding (PNG, JPEG, WebP, BMP, GIF: 8 bits a channel; alpha dropped as the runtime drops it). */
export async function decodeImageFile(file) {
  let picture;
  try {
    picture = await createImageBitmap(file, { premultiplyAlpha: 'none', colorSpaceConversion: 'none' });
  } catch (err) {
    throw new Error(`${file.name}: this browser cannot decode it (open a PNG, JPEG, WebP or BMP; TIFF and 16-bit `
      + 'images go through `peftexport web EXPORT IMAGES`)');
  }
  const { width, height } = picture;
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(picture, 0, 0);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i];
    rgb[j + 1] = rgba[i + 1];
    rgb[j + 2] = rgba[i + 2];
  }
  return { rgb, width, height, picture };
}

/** The export's encoder on onnxruntime-web (site.encoder: graph, external data, preprocessing). */
export class BrowserEncoder {
  constructor(ort, session, site) {
    Object.assign(this, { ort, session, site, enc: site.encoder });
  }

  static async load(ort, site) {
    const enc = site.encoder;
    const options = { executionProviders: ['wasm'], graphOptimizationLevel: 'all' };
    if (enc.external_data && enc.external_data.length) {
      options.externalData = enc.external_data.map((name) => ({ path: name, data: name }));
    }
    return new BrowserEncoder(ort, await ort.InferenceSession.create(enc.path, options), site);
  }

  /** 8-bit RGB -> {embedding (float32 1x256xgxg), input, inputSize, preprocessMs, encoderMs}. */
  async encode(rgb, height, width) {
    const t0 = performance.now();
    const { input, inputSize } = prepareInput(rgb, height, width, this.enc);
    const t1 = performance.now();
    const S = this.enc.image_size;
    const out = await this.session.run({ [this.enc.input]: new this.ort.Tensor('float32', input, [1, 3, S, S]) });
    const encoderMs = performance.now() - t1;
    const tensor = out[this.enc.output];
    const embedding = tensor.data.slice();
    for (const t of Object.values(out)) t.dispose?.();
    return { embedding, input, inputSize, preprocessMs: t1 - t0, encoderMs };
  }
}
