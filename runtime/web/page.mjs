// The page: sample the served bundle, draw the clean prediction live as the resolution
// grows, list the results as PNGs. ?backend=webgpu and ?threads=N choose how ONNX Runtime
// Web runs (changing either reloads the page: ONNX Runtime Web fixes them at its start).
// window.ssd holds what the tests read: state, the last run's images and events.
import { BundleError, FileNoise, SeededNoise, SsdBundle, toRgba } from "./ssd-web.mjs";

const $ = (id) => document.getElementById(id);
const TILE = 96; // display pixels per image on the live canvas, whatever its resolution
const LIVE_FRAMES = 60; // about this many live frames a batch, and one at every resolution change
const MAX_IMAGES = 256; // a run's images, each kept as a PNG in memory
const hooks = (window.ssd = { state: "loading", last: null, events: [], message: "" });
const params = new URLSearchParams(location.search);
let bundle = null;
let noise = null; // a FileNoise once the test hook's file input has one
let pngs = [];

function setState(state) {
  hooks.state = state;
  document.body.dataset.state = state;
}

function say(message) {
  hooks.message = message;
  $("message").textContent = message;
  $("message").hidden = !message;
}

function fail(err) {
  say(err instanceof BundleError ? err.message : `error: ${String(err && err.message ? err.message : err).split("\n")[0]}`);
  setState("error");
  $("sample").disabled = !bundle;
}

function intField(id, low, high) {
  const text = $(id).value.trim();
  const value = Number(text);
  if (!/^[0-9]+$/.test(text) || value < low || value > high) {
    throw new BundleError(`${id} ${text.slice(0, 20)}: expected an integer in ${low}..${high}`);
  }
  return value;
}

async function open() {
  const backend = params.get("backend") === "webgpu" ? "webgpu" : "wasm";
  const threads = Math.max(1, Math.min(64, Number(params.get("threads")) || navigator.hardwareConcurrency || 1));
  $("backend").value = backend;
  $("threads").value = threads;
  if (backend === "webgpu" && !navigator.gpu) throw new BundleError("this browser offers no WebGPU: use the WASM backend");
  const ort = await import(backend === "webgpu" ? "./ort/ort.webgpu.min.mjs" : "./ort/ort.wasm.min.mjs");
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  ort.env.wasm.numThreads = crossOriginIsolated ? threads : 1; // threads need cross-origin isolation
  bundle = await SsdBundle.open("bundle/", ort, { executionProvider: backend, onProgress: (text) => ($("model").textContent = text) });
  const m = bundle.manifest;
  $("model").textContent = `${m.source.checkpoint || "bundle"}: ${bundle.imageSize}×${bundle.imageSize}, ` +
    `resolutions ${m.process.ladder.join(" → ")}, ${m.routes.length} step graphs, ${backend}, ` +
    `${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads === 1 ? "" : "s"}`;
  const counts = bundle.stepCounts;
  $("steps").replaceChildren(...counts.map((steps) => new Option(String(steps), String(steps))));
  $("steps").value = String(counts.includes(100) ? 100 : counts[0]);
  $("batch").min = String(bundle.batchRange[0]);
  $("batch").max = String(bundle.batchRange[1]);
  $("batch").value = String(Math.max(bundle.batchRange[0], Math.min(8, bundle.batchRange[1])));
  $("count").value = String(Math.min(8, bundle.batchRange[1]));
  hooks.info = { backend, threads: ort.env.wasm.numThreads, crossOriginIsolated, steps: counts };
  $("sample").disabled = false;
  setState("ready");
}

function drawTiles(canvas, images, rows, size, columns) {
  const rgba = toRgba(images, rows, bundle.channels, size);
  const scratch = new OffscreenCanvas(size, size);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  rgba.forEach((pixels, i) => {
    scratch.getContext("2d").putImageData(new ImageData(pixels, size, size), 0, 0);
    context.drawImage(scratch, (i % columns) * TILE, Math.floor(i / columns) * TILE, TILE, TILE);
  });
}

function resultTile(pixels, index) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = bundle.imageSize;
  canvas.getContext("2d").putImageData(new ImageData(pixels, bundle.imageSize, bundle.imageSize), 0, 0);
  canvas.title = `sample_${String(index).padStart(4, "0")}.png`;
  return canvas;
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function run(event) {
  event?.preventDefault();
  if (hooks.state === "sampling") return;
  try {
    const seed = intField("seed", 0, Number.MAX_SAFE_INTEGER);
    const steps = Number($("steps").value);
    const n = intField("count", 1, MAX_IMAGES);
    const batch = intField("batch", ...bundle.batchRange);
    say("");
    setState("sampling");
    $("sample").disabled = $("download").disabled = true;
    $("results").replaceChildren();
    hooks.events = [];
    pngs = [];
    const shown = Math.min(batch, n, 8);
    const columns = Math.min(shown, 4);
    const live = $("live");
    live.width = columns * TILE;
    live.height = Math.ceil(shown / columns) * TILE;
    const every = Math.max(1, Math.round(steps / LIVE_FRAMES));
    const times = [];
    const size = bundle.imageSize;
    const rgb = new Uint8Array(n * size * size * 3);
    let done = 0;
    const started = performance.now();
    await bundle.sample({
      n, seed, steps, batch,
      noise: noise || new SeededNoise(seed),
      onPreview: (resolution, x0, rows, index) => hooks.events.push({ kind: "preview", resolution, step: index }),
      onStep: async ({ index, total, t, size: resolution, changes, x0, rows, ms }) => {
        times.push(ms);
        if (index % every === 0 || index === total - 1 || changes) {
          drawTiles(live, x0, Math.min(rows, shown), resolution, columns);
          $("resolution").textContent = `${resolution} × ${resolution}`;
          $("progress").textContent = `step ${index + 1} of ${total} (t = ${t}), batch of ${rows}`;
          hooks.events.push({ kind: "draw", step: index, resolution });
          await new Promise((resolve) => setTimeout(resolve, 0)); // let the browser paint it
        }
      },
      onBatch: (images, indices) => {
        toRgba(images, indices.length, bundle.channels, size).forEach((pixels, i) => {
          const tile = resultTile(pixels, indices[i]);
          $("results").append(tile);
          pngs.push({ name: tile.title, url: tile.toDataURL("image/png") });
          for (let p = 0; p < size * size; p++) rgb.set(pixels.subarray(p * 4, p * 4 + 3), ((done + i) * size * size + p) * 3);
        });
        done += indices.length;
      },
    });
    const seconds = (performance.now() - started) / 1000;
    const msPerStep = times.reduce((sum, ms) => sum + ms, 0) / times.length; // graph calls only
    $("stats").textContent = `${n} images in ${seconds.toFixed(1)} s: ${(n / seconds).toFixed(2)} images/s, ` +
      `${msPerStep.toFixed(1)} ms per step in the graphs (batch ${Math.min(batch, n)})` +
      (noise ? ", noise from the file" : "");
    hooks.last = { n, seed, steps, batch, seconds, msPerStep, stepTimes: times, images: base64(rgb), size,
                   pngs: pngs.map((png) => png.url), events: hooks.events };
    $("download").disabled = false;
    setState("done");
  } catch (err) {
    fail(err);
  } finally {
    $("sample").disabled = !bundle;
  }
}

function download() {
  for (const png of pngs) {
    const link = document.createElement("a");
    link.href = png.url;
    link.download = png.name;
    link.click();
  }
}

async function chooseNoise() {
  const file = $("noise-file").files[0];
  try {
    noise = file ? new FileNoise(await file.arrayBuffer()) : null;
    say("");
    hooks.noise = noise ? noise.header : null;
  } catch (err) {
    noise = null;
    fail(err);
  }
}

function reloadWith(key, value) {
  params.set(key, value);
  location.search = params.toString();
}

$("controls").addEventListener("submit", run);
$("download").addEventListener("click", download);
$("noise-file").addEventListener("change", chooseNoise);
$("backend").addEventListener("change", () => reloadWith("backend", $("backend").value));
$("threads").addEventListener("change", () => reloadWith("threads", $("threads").value));
hooks.run = run;
open().catch(fail);
