// fewstep page: generates as you type (debounced; a newer request aborts the stale one, which frees the server).
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 250;
const GALLERY_MAX = 48;
let info = null;
let timer = null;
let inflight = null; // AbortController of the request in flight
let seq = 0;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("fewstep-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function needKey() {
  $("key-box").hidden = false;
  status("This server needs an API key.", true);
  $("api-key").focus();
}

async function loadInfo() {
  const r = await fetch("/api/info", { headers: headers() });
  if (r.status === 401) return needKey();
  if (!r.ok) return status("Cannot reach the server: " + r.status, true);
  info = await r.json();
  $("key-box").hidden = true;
  $("model").textContent = `${info.model} · fewstep ${info.version}`;
  $("notes").textContent = info.notes.join(" ");
  $("notes").hidden = info.notes.length === 0;
  const d = info.defaults, lim = info.limits;
  const steps = $("steps");
  steps.max = Math.min(lim.max_steps, Math.max(8, d.steps * 2));
  steps.value = d.steps;
  const g = $("guidance");
  g.max = Math.min(lim.max_guidance, d.guidance > 2 ? 15 : 3);
  g.value = d.guidance;
  $("seed").value = Math.floor(Math.random() * 1e6);
  // info.sizes: what this model accepts and the server's measured speed finishes within its timeout
  const sizes = info.sizes || [info.native_size].filter((s) => s <= lim.max_size);
  $("size").replaceChildren(...sizes.map((s) => {
    const o = document.createElement("option");
    o.value = `${s}x${s}`;
    o.textContent = `${s}×${s}` + (s === info.native_size ? " (native)" : "");
    o.selected = s === info.native_size;
    return o;
  }));
  const list = $("lora-list");
  list.replaceChildren();
  for (const name of info.loras) {
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("label");
    label.textContent = name;
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: -Math.min(1, lim.max_lora_weight),
                            max: Math.min(2, lim.max_lora_weight), step: 0.05, value: 0 });
    slider.dataset.lora = name;
    slider.setAttribute("aria-label", `LoRA ${name} weight`);
    const out = document.createElement("output");
    out.textContent = "0";
    slider.addEventListener("input", () => { out.textContent = slider.value; schedule(); });
    row.append(label, slider, out);
    list.append(row);
  }
  $("loras").hidden = info.loras.length === 0;
  const cn = info.controlnet || { models: [], modules: ["none"], defaults: {} };
  $("control-module").replaceChildren(...cn.modules.map((m) => new Option(m, m)));
  if (cn.modules.includes("canny")) $("control-module").value = "canny";
  $("control-model").replaceChildren(new Option("the preprocessor's default", ""),
                                     ...cn.models.map((m) => new Option(m, m)));
  showValues();
  if ($("prompt").value.trim()) schedule();
}

function showValues() {
  $("steps-out").textContent = $("steps").value;
  $("guidance-out").textContent = Number($("guidance").value).toFixed(1);
  $("strength-out").textContent = Number($("strength").value).toFixed(2);
  $("brush-out").textContent = $("brush").value;
  $("control-weight-out").textContent = Number($("control-weight").value).toFixed(2);
}

// ---- init image and mask: the mask is painted white (= repaint) on a canvas the size of the image ----------------
let initData = null; // base64 PNG/JPEG of the init image
let controlData = null; // base64 of the control image as uploaded (the server runs the preprocessor)
let masked = false;

function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function setInit(file) {
  const url = await readFile(file);
  initData = url.split(",", 2)[1];
  const img = $("init-preview");
  await new Promise((resolve) => { img.onload = resolve; img.src = url; });
  const canvas = $("mask-canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  clearMask();
  $("mask-wrap").hidden = false;
  schedule();
}

function clearMask() {
  const c = $("mask-canvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  masked = false;
}

function maskData() {
  // what the server reads: black = keep, white = repaint (the painted strokes), the image's size
  const c = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = c.width;
  out.height = c.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(c, 0, 0);
  return out.toDataURL("image/png").split(",", 2)[1];
}

function paint(e, from) {
  const c = $("mask-canvas");
  const rect = c.getBoundingClientRect();
  const sx = c.width / rect.width, sy = c.height / rect.height;
  const at = [(e.clientX - rect.left) * sx, (e.clientY - rect.top) * sy];
  const ctx = c.getContext("2d");
  ctx.strokeStyle = ctx.fillStyle = "white";
  ctx.lineCap = "round";
  ctx.lineWidth = Number($("brush").value) * sx;
  ctx.beginPath();
  ctx.moveTo(...(from || at));
  ctx.lineTo(...at);
  ctx.stroke();
  masked = true;
  return at;
}

let last = null;
$("mask-canvas").addEventListener("pointerdown", (e) => {
  $("mask-canvas").setPointerCapture(e.pointerId);
  last = paint(e, null);
});
$("mask-canvas").addEventListener("pointermove", (e) => { if (last) last = paint(e, last); });
$("mask-canvas").addEventListener("pointerup", () => { if (last) { last = null; schedule(); } });

async function setControl(file) {
  const url = await readFile(file);
  controlData = url.split(",", 2)[1];
  await previewControl(file);
  schedule();
}

async function previewControl(file) {
  // the page shows what the ControlNet sees: the server's preprocessor output (POST /api/preprocess)
  const module = $("control-module").value;
  const img = $("control-preview");
  if (!file) return;
  if (module === "none") {
    img.src = await readFile(file);
  } else {
    const form = new FormData();
    form.append("image", file);
    form.append("module", module);
    const h = headers();
    delete h["Content-Type"];
    const r = await fetch("/api/preprocess", { method: "POST", headers: h, body: form });
    if (!r.ok) return status("preview failed: " + r.status, true);
    img.src = URL.createObjectURL(await r.blob());
  }
  img.hidden = false;
}

$("init-file").addEventListener("change", (e) => { if (e.target.files[0]) setInit(e.target.files[0]); });
$("control-file").addEventListener("change", (e) => { if (e.target.files[0]) setControl(e.target.files[0]); });
$("control-module").addEventListener("change", () => {
  const f = $("control-file").files[0];
  if (f) previewControl(f);
  schedule();
});
$("clear-mask").addEventListener("click", () => { clearMask(); schedule(); });
$("remove-init").addEventListener("click", () => {
  initData = null;
  $("init-file").value = "";
  $("mask-wrap").hidden = true;
  clearMask();
  schedule();
});
$("remove-control").addEventListener("click", () => {
  controlData = null;
  $("control-file").value = "";
  $("control-preview").hidden = true;
  schedule();
});

function a1111Body(b) {
  // with an init image (and a mask) or a control image the page speaks A1111: img2img / inpainting, ControlNet units
  const [w, h] = (b.size || "x").split("x").map(Number);
  const tags = Object.entries(b.loras || {}).map(([n, v]) => ` <lora:${n}:${v}>`).join("");
  const a = { prompt: b.prompt + tags, negative_prompt: b.negative_prompt || "", steps: b.steps,
              cfg_scale: b.guidance_scale, seed: b.seed === undefined ? -1 : b.seed };
  if (w && h) Object.assign(a, { width: w, height: h });
  if (initData) {
    Object.assign(a, { init_images: [initData], denoising_strength: Number($("strength").value) });
    if (masked) Object.assign(a, { mask: maskData(), mask_blur: 2, inpainting_fill: 1, inpaint_full_res: false });
  }
  if (controlData) {
    a.alwayson_scripts = { controlnet: { args: [{
      image: controlData, module: $("control-module").value, model: $("control-model").value || "None",
      weight: Number($("control-weight").value) }] } };
  }
  return a;
}

function fromA1111(j, b) {
  // the A1111 answer as the OpenAI one the gallery shows
  const info = JSON.parse(j.info);
  return { data: j.images.map((img, i) => ({ b64_json: img, seed: info.all_seeds[i], revised_prompt: b.prompt })),
           timings: info.timings };
}

function body() {
  const b = {
    prompt: $("prompt").value,
    n: 1,
    size: $("size").value || undefined,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    response_format: "b64_json",
  };
  const neg = $("negative").value.trim();
  if (neg) b.negative_prompt = neg;
  if (!$("random-seed").checked) b.seed = Number($("seed").value) || 0;
  const loras = {};
  for (const s of document.querySelectorAll("[data-lora]")) {
    if (Number(s.value) !== 0) loras[s.dataset.lora] = Number(s.value);
  }
  if (Object.keys(loras).length) b.loras = loras;
  return b;
}

function schedule() {
  showValues();
  clearTimeout(timer);
  timer = setTimeout(generate, DEBOUNCE_MS);
}

async function generate() {
  clearTimeout(timer);
  if (!info) return;
  if (!$("prompt").value.trim()) return;
  if (window.fewstepCamera && window.fewstepCamera.on) return; // the camera stream takes the prompt instead
  if (inflight) inflight.abort(); // the server notices the closed connection and drops the stale work
  const controller = new AbortController();
  inflight = controller;
  const mine = ++seq;
  const req = body();
  const t0 = performance.now();
  status("generating…");
  const a1111 = Boolean(initData || controlData);
  const url = a1111 ? (initData ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img") : "/v1/images/generations";
  try {
    const r = await fetch(url, {
      method: "POST", headers: headers(), body: JSON.stringify(a1111 ? a1111Body(req) : req),
      signal: controller.signal,
    });
    if (r.status === 401) return needKey();
    let j = await r.json();
    if (mine !== seq) return; // a newer request superseded this one
    if (!r.ok) {
      const msg = (j.error && j.error.message) || r.statusText;
      const retry = r.headers.get("Retry-After");
      return status(msg + (retry ? ` (retry in ${retry} s)` : ""), true);
    }
    if (a1111) j = fromA1111(j, req);
    const seconds = (performance.now() - t0) / 1000;
    for (const item of j.data) show(item, req, seconds, j.timings);
    status("");
  } catch (e) {
    if (e.name !== "AbortError") status(String(e), true);
  } finally {
    if (inflight === controller) inflight = null;
  }
}

function show(item, req, seconds, timings) {
  const src = "data:image/png;base64," + item.b64_json;
  const took = `${seconds.toFixed(2)} s`;
  const detail = timings ? ` (compute ${timings.compute_s.toFixed(2)} s, batch of ${timings.batch_images})` : "";
  $("current-image").src = src;
  $("current-image").alt = item.revised_prompt;
  $("current-image").hidden = false;
  $("current-caption").textContent = `${took}${detail} · seed ${item.seed} · ${req.steps} steps`;

  const fig = document.createElement("figure");
  fig.className = "shot";
  const img = document.createElement("img");
  img.src = src;
  img.alt = item.revised_prompt;
  img.title = `${item.revised_prompt}\nseed ${item.seed}, ${req.steps} steps, guidance ${req.guidance_scale}`;
  const cap = document.createElement("figcaption");
  const time = document.createElement("span");
  time.className = "took";
  time.textContent = took;
  const link = document.createElement("a");
  link.href = src;
  link.download = `fewstep-${item.seed}.png`;
  link.textContent = "download";
  cap.append(time, link);
  fig.append(img, cap);
  $("gallery").prepend(fig);
  while ($("gallery").children.length > GALLERY_MAX) $("gallery").lastChild.remove();
}

$("prompt").addEventListener("input", schedule);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
});
for (const id of ["steps", "guidance", "seed", "size", "negative", "random-seed", "strength", "control-weight",
                  "control-model"]) {
  $(id).addEventListener("input", schedule);
}
$("brush").addEventListener("input", showValues);
$("generate").addEventListener("click", generate);
$("save-key").addEventListener("click", () => {
  sessionStorage.setItem("fewstep-key", $("api-key").value);
  loadInfo();
});
loadInfo().catch((e) => status(String(e), true));
