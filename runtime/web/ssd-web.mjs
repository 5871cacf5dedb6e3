// The browser runtime of ssd: a bundle's fused step graphs under ONNX Runtime Web, and the
// multi-resolution loop of runtime/sampler.py. It carries none of the method's math: each
// step's timestep, route and coefficients come from the manifest's step plans (format 5,
// checked by ssd-web against the process before serving), the resize and noise matrices live
// in the step graphs, and every file is checked against the manifest's sha256 before use.
//
//   const ort = await import("./ort/ort.wasm.min.mjs");
//   const bundle = await SsdBundle.open("bundle/", ort);
//   const images = await bundle.sample({ n: 4, seed: 0, steps: 100, noise: new SeededNoise(0) });

export const FORMAT = "ssd-bundle";
export const FORMAT_VERSION = 5; // the first with step plans
export const NOISE_MAGIC = "SSDNOISE";
const MAX_MANIFEST_BYTES = 64 << 20;

export class BundleError extends Error {
  constructor(message) {
    super(message);
    this.name = "BundleError";
  }
}

async function fetchBytes(url, limit) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new BundleError(`cannot fetch ${url}: ${err.message}`);
  }
  if (!response.ok) {
    const text = (await response.text()).trim().split("\n")[0].slice(0, 160);
    throw new BundleError(`${url}: HTTP ${response.status}${text ? ` (${text})` : ""}`);
  }
  const data = new Uint8Array(await response.arrayBuffer());
  if (data.length > limit) throw new BundleError(`${url} is larger than ${limit} bytes`);
  return data;
}

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A file the manifest lists, fetched and checked: its size and sha256, or one line.
async function fetchListed(base, entry) {
  const data = await fetchBytes(base + entry.path, entry.bytes);
  if (data.length !== entry.bytes) {
    throw new BundleError(`${entry.path}: ${data.length} bytes where the manifest lists ${entry.bytes}; refusing it`);
  }
  const digest = await sha256Hex(data);
  if (digest !== entry.sha256) {
    throw new BundleError(`${entry.path}: sha256 ${digest.slice(0, 12)}… differs from the manifest's ` +
      `${entry.sha256.slice(0, 12)}…: the file was changed; refusing to run it`);
  }
  return data;
}

// The manifest's fields the page reads, checked; one line naming what is wrong.
export function checkManifest(manifest) {
  if (!manifest || manifest.format !== FORMAT) throw new BundleError("manifest.json is not an ssd bundle manifest");
  if (manifest.format_version !== FORMAT_VERSION) {
    throw new BundleError(`manifest.json has format version ${String(manifest.format_version).slice(0, 12)}; ` +
      `the page needs ${FORMAT_VERSION} (step plans): re-export the bundle with ssd-export --force`);
  }
  const weights = manifest.shared_files && manifest.shared_files.onnx;
  if (!weights) throw new BundleError("manifest.json lists no ONNX weights file");
  for (const route of manifest.routes) {
    if (!route.step_files || !route.step_files.onnx) {
      throw new BundleError(`route ${route.name} has no ONNX step graph: re-export the bundle with step graphs`);
    }
  }
  if (!manifest.plans || Object.keys(manifest.plans).length === 0) throw new BundleError("manifest.json has no step plans");
}

function folderOf(path) {
  return path.includes("/") ? path.slice(0, path.lastIndexOf("/") + 1) : "";
}

export class SsdBundle {
  // Fetch and check the manifest and every step graph under `base` (a URL ending in "/"),
  // and open one ONNX Runtime Web session per route.
  static async open(base, ort, { executionProvider = "wasm", onProgress = () => {} } = {}) {
    const manifestBytes = await fetchBytes(base + "manifest.json", MAX_MANIFEST_BYTES);
    let manifest;
    try {
      manifest = JSON.parse(new TextDecoder().decode(manifestBytes));
    } catch (err) {
      throw new BundleError(`manifest.json is not JSON: ${err.message}`);
    }
    checkManifest(manifest);
    const weightsEntry = manifest.shared_files.onnx;
    onProgress(`fetching ${weightsEntry.path} (${(weightsEntry.bytes / 1e6).toFixed(1)} MB)`);
    const weights = await fetchListed(base, weightsEntry);
    const sessions = {};
    for (const route of manifest.routes) {
      const entry = route.step_files.onnx;
      onProgress(`opening ${entry.path}`);
      const graph = await fetchListed(base, entry);
      if (folderOf(entry.path) !== folderOf(weightsEntry.path)) {
        throw new BundleError(`${entry.path} is not beside its weights file ${weightsEntry.path}`);
      }
      const weightsName = weightsEntry.path.slice(folderOf(weightsEntry.path).length);
      try {
        sessions[route.name] = await ort.InferenceSession.create(graph, {
          executionProviders: [executionProvider],
          graphOptimizationLevel: "all",
          externalData: [{ path: weightsName, data: weights }],
        });
      } catch (err) {
        throw new BundleError(`${entry.path}: ONNX Runtime Web cannot open it: ${String(err.message).split("\n")[0]}`);
      }
    }
    return new SsdBundle(manifest, sessions, ort, executionProvider);
  }

  constructor(manifest, sessions, ort, executionProvider) {
    this.manifest = manifest;
    this.sessions = sessions;
    this.ort = ort;
    this.executionProvider = executionProvider;
    this.routes = Object.fromEntries(manifest.routes.map((route) => [route.name, route]));
    this.channels = manifest.config.model.in_channels;
    this.imageSize = manifest.config.model.image_size;
    this.batchRange = [manifest.batch.min, manifest.batch.max];
  }

  // The step counts the manifest has plans for, ascending.
  get stepCounts() {
    return Object.keys(this.manifest.plans).map(Number).sort((a, b) => a - b);
  }

  plan(steps) {
    const rows = this.manifest.plans[String(steps)];
    if (!rows) throw new BundleError(`the bundle has no plan for ${steps} steps; it has ${this.stepCounts.join(", ")}`);
    return rows.map(([t, route, coef]) => ({ t, route, coef, ...sizesOf(this.routes[route]) }));
  }

  // The sizes of the noise a sample draws for `steps`, in order: the initial x, then z of
  // every step but the last (ssd_core.method.draw_sizes).
  noiseSizes(steps) {
    const plan = this.plan(steps);
    return [plan[0].inSize, ...plan.slice(0, -1).map((step) => step.outSize)];
  }

  // Sample images first..first+n-1 as one Float32Array [n, C, H, W] in [-1, 1].
  // noise: SeededNoise or FileNoise. onStep({index, total, t, size, changes, x0, rows, ms}) after every
  // step; onPreview(resolution, x0, rows, index) at each resolution change; onBatch(images, indices).
  async sample({ n, seed = 0, steps, batch, first = 0, noise, onStep, onPreview, onBatch }) {
    const plan = this.plan(steps);
    noise = noise || new SeededNoise(seed);
    noise.check?.({ first, n, steps, channels: this.channels, sizes: this.noiseSizes(steps) });
    const [low, high] = this.batchRange;
    batch = Math.min(batch || high, high, n);
    const pixels = this.channels * this.imageSize * this.imageSize;
    const images = new Float32Array(n * pixels);
    const inputs = new Map(); // by batch size: every step's t and coef tensors, made once
    for (let start = 0; start < n; start += batch) {
      const count = Math.min(batch, n - start);
      // a short batch runs at its own size where the batch axis allows it; a fixed-batch
      // bundle pads it with the samples that follow, and drops them
      const size = low < high ? Math.max(count, low) : high;
      const rows = Array.from({ length: size }, (_, k) => first + start + k);
      if (!inputs.has(size)) inputs.set(size, this.stepInputs(plan, size));
      const x = await this.sampleBatch(plan, inputs.get(size), rows, noise, onStep, onPreview);
      images.set(x.subarray(0, count * pixels), start * pixels);
      onBatch?.(images.subarray(start * pixels, (start + count) * pixels), rows.slice(0, count));
    }
    return images;
  }

  // Every step's `t` and `coef` inputs at batch size `b`.
  stepInputs(plan, b) {
    const { Tensor } = this.ort;
    return plan.map((step) => ({
      t: new Tensor("float32", new Float32Array(b).fill(step.t), [b]),
      coef: new Tensor("float32", Float32Array.from(step.coef), [step.coef.length]),
    }));
  }

  // One batch of samples `rows` through the loop (`feeds`: stepInputs at its size); returns x
  // after the last step.
  async sampleBatch(plan, feeds, rows, noise, onStep, onPreview) {
    const { Tensor } = this.ort;
    const b = rows.length;
    const c = this.channels;
    const last = plan[plan.length - 1];
    const noNoise = new Float32Array(b * c * last.outSize * last.outSize);
    let x = noise.draw(rows, c * plan[0].inSize * plan[0].inSize);
    for (let index = 0; index < plan.length; index++) {
      const step = plan[index];
      const final = index === plan.length - 1;
      const z = final ? noNoise : noise.draw(rows, c * step.outSize * step.outSize);
      const started = performance.now();
      let result;
      try {
        result = await this.sessions[step.route].run({
          x: new Tensor("float32", x, [b, c, step.inSize, step.inSize]),
          t: feeds[index].t,
          coef: feeds[index].coef,
          z: new Tensor("float32", z, [b, c, step.outSize, step.outSize]),
        });
      } catch (err) {
        throw new BundleError(`step ${index + 1}/${plan.length} (route ${step.route}): ${String(err.message).split("\n")[0]}`);
      }
      const ms = performance.now() - started;
      x = result.x_s.data;
      const x0 = result.x0_pred.data;
      const changes = step.inSize !== step.outSize;
      if (changes) onPreview?.(step.outSize, x0, b, index);
      await onStep?.({ index, total: plan.length, t: step.t, size: step.outSize, changes, x0, rows: b, ms });
    }
    for (const value of x) {
      if (!Number.isFinite(value)) throw new BundleError("sampling produced NaN or inf; no images from this batch");
    }
    return x;
  }

  async release() {
    for (const session of Object.values(this.sessions)) await session.release();
    this.sessions = {};
  }
}

function sizesOf(route) {
  return { inSize: route.in_size, outSize: route.out_size };
}

// ---------------------------------------------------------------------------- noise
// The page's own seeded noise: sample i of seed s draws from its own xoshiro128** stream
// (seeded through splitmix32 from s and i), standard normals by Box-Muller. Like Python's
// streams it makes sample i the same whatever n, batch or first; it is not numpy's
// generator, so a seed gives other images here than in Python (README, "In a browser").
export class SeededNoise {
  constructor(seed) {
    if (!Number.isSafeInteger(seed) || seed < 0) throw new BundleError(`seed ${seed}: expected a non-negative integer`);
    this.seed = seed;
    this.streams = new Map();
  }

  stream(index) {
    let stream = this.streams.get(index);
    if (!stream) {
      stream = new NormalStream(this.seed, index);
      this.streams.set(index, stream);
    }
    return stream;
  }

  // The next `count` normals of every sample in `rows`, stacked: Float32Array [rows, count].
  draw(rows, count) {
    const out = new Float32Array(rows.length * count);
    rows.forEach((index, row) => this.stream(index).fill(out.subarray(row * count, (row + 1) * count)));
    return out;
  }
}

function splitmix32(state) {
  state = (state + 0x9e3779b9) | 0;
  let z = state;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return [state, (z ^ (z >>> 16)) >>> 0];
}

class NormalStream {
  constructor(seed, index) {
    let state = 0;
    const words = [seed % 2 ** 32, Math.floor(seed / 2 ** 32), index % 2 ** 32, Math.floor(index / 2 ** 32)];
    this.s = new Uint32Array(4);
    for (let k = 0; k < 4; k++) {
      let value;
      [state, value] = splitmix32(state ^ words[k]);
      this.s[k] = value;
    }
    if (!(this.s[0] | this.s[1] | this.s[2] | this.s[3])) this.s[0] = 1;
    this.spare = null;
  }

  next() { // xoshiro128**
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  fill(out) {
    for (let k = 0; k < out.length; k++) {
      if (this.spare !== null) {
        out[k] = this.spare;
        this.spare = null;
        continue;
      }
      const u1 = ((this.next() >>> 8) + 1) / 16777216; // (0, 1]
      const u2 = (this.next() >>> 8) / 16777216;
      const r = Math.sqrt(-2 * Math.log(u1));
      out[k] = r * Math.cos(2 * Math.PI * u2);
      this.spare = r * Math.sin(2 * Math.PI * u2);
    }
  }
}

function rotl(x, k) {
  return (x << k) | (x >>> (32 - k));
}

// Noise read from a file that ssd_runtime.web_page.write_noise_file wrote: Python's own
// per-sample streams for a seed, so the page's images can be compared with Python's.
// Layout: "SSDNOISE", a uint32 header length, the JSON header, then float32 little-endian,
// sample after sample, each sample's draws in loop order.
export class FileNoise {
  constructor(buffer) {
    const bytes = new Uint8Array(buffer);
    const magic = new TextDecoder().decode(bytes.subarray(0, 8));
    if (bytes.length < 12 || magic !== NOISE_MAGIC) throw new BundleError("the noise file is not an ssd noise file");
    const headerLength = new DataView(bytes.buffer, bytes.byteOffset).getUint32(8, true);
    if (12 + headerLength > bytes.length) throw new BundleError("the noise file is truncated");
    this.header = JSON.parse(new TextDecoder().decode(bytes.subarray(12, 12 + headerLength)));
    const offset = 12 + headerLength;
    const floats = this.header.n * this.header.floats_per_sample;
    if (offset % 4 !== 0 || bytes.length !== offset + 4 * floats) throw new BundleError("the noise file's size does not match its header");
    this.data = new Float32Array(bytes.buffer.slice(bytes.byteOffset + offset, bytes.byteOffset + offset + 4 * floats));
    this.cursors = new Map();
  }

  // One line where the file was written for another run than the one asked for.
  check({ first, n, steps, channels, sizes }) {
    const h = this.header;
    const perSample = sizes.reduce((sum, size) => sum + channels * size * size, 0);
    if (h.steps !== steps || h.channels !== channels || h.floats_per_sample !== perSample) {
      throw new BundleError(`the noise file was written for ${h.steps} steps and ${h.channels} channels; this run has ${steps} and ${channels}`);
    }
    if (first < h.first || first + n > h.first + h.n) {
      throw new BundleError(`the noise file holds samples ${h.first}..${h.first + h.n - 1}; this run needs ${first}..${first + n - 1}`);
    }
    this.cursors.clear();
  }

  draw(rows, count) {
    const h = this.header;
    const out = new Float32Array(rows.length * count);
    rows.forEach((index, row) => {
      if (index < h.first || index >= h.first + h.n) throw new BundleError(`the noise file has no sample ${index}`);
      const cursor = this.cursors.get(index) || 0;
      const start = (index - h.first) * h.floats_per_sample + cursor;
      out.set(this.data.subarray(start, start + count), row * count);
      this.cursors.set(index, cursor + count);
    });
    return out;
  }
}

// ---------------------------------------------------------------------------- images
// Float images [n, C, H, W] in [-1, 1] as RGBA bytes per image, as ssd_core.images.to_uint8
// rounds them: (clip(x) + 1) * 127.5 in float32, to the nearest integer, ties to even.
export function toRgba(images, n, channels, size) {
  const pixels = size * size;
  const out = [];
  for (let i = 0; i < n; i++) {
    const rgba = new Uint8ClampedArray(pixels * 4);
    for (let p = 0; p < pixels; p++) {
      for (let ch = 0; ch < 3; ch++) {
        const value = images[(i * channels + Math.min(ch, channels - 1)) * pixels + p];
        rgba[p * 4 + ch] = toLevel(value);
      }
      rgba[p * 4 + 3] = 255;
    }
    out.push(rgba);
  }
  return out;
}

function toLevel(value) {
  const clipped = Math.fround(Math.min(Math.max(value, -1), 1));
  const scaled = Math.fround(Math.fround(clipped + 1) * 127.5);
  let level = Math.round(scaled);
  if (level - scaled === 0.5 && level % 2 === 1) level -= 1; // ties to even, as numpy's rint
  return level;
}
