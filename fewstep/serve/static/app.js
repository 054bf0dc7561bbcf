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
  const sizes = [info.native_size, 256, 512, 768, 1024].filter(
    (s, i, all) => s <= lim.max_size && s % info.size_step === 0 && all.indexOf(s) === i);
  $("size").replaceChildren(...sizes.map((s) => {
    const o = document.createElement("option");
    o.value = `${s}x${s}`;
    o.textContent = `${s}×${s}` + (s === info.native_size ? " (native)" : "");
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
  showValues();
  if ($("prompt").value.trim()) schedule();
}

function showValues() {
  $("steps-out").textContent = $("steps").value;
  $("guidance-out").textContent = Number($("guidance").value).toFixed(1);
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
  if (inflight) inflight.abort(); // the server notices the closed connection and drops the stale work
  const controller = new AbortController();
  inflight = controller;
  const mine = ++seq;
  const req = body();
  const t0 = performance.now();
  status("generating…");
  try {
    const r = await fetch("/v1/images/generations", {
      method: "POST", headers: headers(), body: JSON.stringify(req), signal: controller.signal,
    });
    if (r.status === 401) return needKey();
    const j = await r.json();
    if (mine !== seq) return; // a newer request superseded this one
    if (!r.ok) {
      const msg = (j.error && j.error.message) || r.statusText;
      const retry = r.headers.get("Retry-After");
      return status(msg + (retry ? ` (retry in ${retry} s)` : ""), true);
    }
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
for (const id of ["steps", "guidance", "seed", "size", "negative", "random-seed"]) {
  $(id).addEventListener("input", schedule);
}
$("generate").addEventListener("click", generate);
$("save-key").addEventListener("click", () => {
  sessionStorage.setItem("fewstep-key", $("api-key").value);
  loadInfo();
});
loadInfo().catch((e) => status(String(e), true));
