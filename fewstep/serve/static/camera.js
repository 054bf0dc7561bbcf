// fewstep page, camera mode: the camera's frames go to /v1/stream (a WebSocket) and the stream's output frames come
// back beside them; the prompt, steps, seed and strength are sent live on the socket's JSON control channel.
// Uses app.js's globals ($, status, needKey).
"use strict";

const camera = {
  on: false, ws: null, media: null, size: null, sent: 0, answered: 0, outputs: 0, timer: null, lastSend: 0,
  shown: [], // times the last outputs were shown, for the page's own fps
};
window.fewstepCamera = camera; // app.js does not generate over HTTP while the camera runs; tests read the counters
const CAMERA_FPS = 30; // the most frames a second the page sends
const IN_FLIGHT = 2; // frames sent and not yet taken by the server (processed or dropped) before the page waits

function b64url(text) {
  const bytes = new TextEncoder().encode(text);
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function cameraControls() {
  const c = { prompt: $("prompt").value, steps: Number($("steps").value), strength: Number($("camera-strength").value),
              seed: Number($("seed").value) || 0, similarity: similarity(), format: "jpeg" };
  const neg = $("negative").value.trim();
  if (neg) c.negative_prompt = neg;
  return c;
}

function similarity() {
  return $("camera-skip").checked ? 0.98 : 1; // the server's filter threshold; 1 turns it off
}

function sendControls(fields) {
  if (camera.ws && camera.ws.readyState === WebSocket.OPEN) camera.ws.send(JSON.stringify(fields));
}

async function startCamera() {
  if (camera.on) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return status("This browser gives no camera here (a camera needs https or localhost).", true);
  }
  camera.on = true; // from now on the prompt goes to the stream, not to HTTP generations
  try {
    camera.media = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (e) {
    camera.on = false;
    return status("No camera: " + e.message, true);
  }
  if (!camera.on) { // stopped while the browser asked for the camera
    for (const t of camera.media.getTracks()) t.stop();
    camera.media = null;
    return;
  }
  $("camera-input").srcObject = camera.media;
  $("camera-view").hidden = false;
  $("camera-start").textContent = "Stop camera";
  Object.assign(camera, { sent: 0, answered: 0, outputs: 0, size: null, shown: [] });
  const key = sessionStorage.getItem("fewstep-key");
  const protocols = ["fewstep"];
  if (key) protocols.push("fewstep.key." + b64url(key)); // browsers cannot set Authorization on a WebSocket
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/stream";
  const ws = new WebSocket(url, protocols);
  ws.binaryType = "blob";
  camera.ws = ws;
  ws.onopen = () => { sendControls(cameraControls()); status("camera: starting the stream…"); };
  ws.onmessage = (e) => (typeof e.data === "string" ? onCameraMessage(JSON.parse(e.data)) : showOutput(e.data));
  ws.onclose = (e) => {
    if (camera.ws !== ws) return;
    const why = e.reason || (e.code === 1006 ? "the server refused the stream (is the API key right?)" : "");
    stopCamera();
    if (why) status("camera stream closed: " + why, true);
  };
  camera.timer = setInterval(pump, 1000 / CAMERA_FPS);
}

function stopCamera() {
  camera.on = false;
  clearInterval(camera.timer);
  if (camera.ws) { const ws = camera.ws; camera.ws = null; ws.close(); }
  if (camera.media) for (const t of camera.media.getTracks()) t.stop();
  camera.media = null;
  $("camera-input").srcObject = null;
  $("camera-view").hidden = true;
  $("camera-start").textContent = "Start camera";
}

function onCameraMessage(m) {
  if (m.type === "ready") {
    camera.size = [m.width, m.height];
    status(`camera: streaming at ${m.width}×${m.height}`);
  } else if (m.type === "frame") {
    camera.answered = m.processed + m.dropped;
    if (m.fps !== null) $("camera-fps").textContent = m.fps.toFixed(1);
    // a frame the similarity filter skipped is answered at once with the last output: not the engine's latency
    if (m.latency_ms !== null && !m.resent) $("camera-latency").textContent = Math.round(m.latency_ms);
    $("camera-detail").textContent = `${m.dropped} dropped (the engine was busy), ${m.skipped} skipped (no change)`;
  } else if (m.type === "error") {
    status(m.message, true);
  }
}

function showOutput(blob) {
  const img = $("camera-output");
  const old = img.src;
  img.src = URL.createObjectURL(blob);
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  camera.outputs += 1;
  img.dataset.frames = String(camera.outputs);
}

function pump() {
  // one frame now if the server has taken the ones sent (else it would only drop them) and the socket is not backed up
  const video = $("camera-input");
  const ws = camera.ws;
  if (!camera.on || !ws || ws.readyState !== WebSocket.OPEN || !camera.size || video.readyState < 2) return;
  const now = performance.now();
  const stuck = now - camera.lastSend > 2000; // a frame the server refused leaves no count behind: send again
  if ((camera.sent - camera.answered >= IN_FLIGHT && !stuck) || ws.bufferedAmount > 0) return;
  const [w, h] = camera.size;
  const canvas = $("camera-canvas");
  canvas.width = w;
  canvas.height = h;
  // the centre of the camera image at the stream's aspect, scaled to its size (the server would crop it the same way)
  const vw = video.videoWidth, vh = video.videoHeight, scale = Math.max(w / vw, h / vh);
  const sw = w / scale, sh = h / scale;
  canvas.getContext("2d").drawImage(video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, w, h);
  camera.lastSend = now;
  camera.sent += 1;
  canvas.toBlob((blob) => { if (blob && camera.ws === ws && ws.readyState === WebSocket.OPEN) ws.send(blob); },
                "image/jpeg", 0.9);
}

let cameraTimer = null;
function cameraChanged(fields) {
  // the prompt and sliders go to the running stream, debounced like the HTTP requests are
  if (!camera.on) return;
  clearTimeout(cameraTimer);
  cameraTimer = setTimeout(() => sendControls(fields()), 150);
}

$("camera-start").addEventListener("click", () => (camera.on ? stopCamera() : startCamera()));
$("camera-strength").addEventListener("input", () => {
  $("camera-strength-out").textContent = Number($("camera-strength").value).toFixed(2);
  cameraChanged(() => ({ strength: Number($("camera-strength").value) }));
});
$("prompt").addEventListener("input", () => cameraChanged(() => ({ prompt: $("prompt").value })));
$("negative").addEventListener("input", () => cameraChanged(() => ({ negative_prompt: $("negative").value })));
$("steps").addEventListener("input", () => cameraChanged(() => ({ steps: Number($("steps").value) })));
$("seed").addEventListener("input", () => cameraChanged(() => ({ seed: Number($("seed").value) || 0 })));
$("camera-skip").addEventListener("change", () => cameraChanged(() => ({ similarity: similarity() })));
$("camera-strength-out").textContent = Number($("camera-strength").value).toFixed(2);
