"use strict";
// The LiveVLM console: creates a stream, sends a source's frames over the stream's websocket (sampled at a
// chosen fps, downscaled here to the model's input size, JPEG), shows the stream's live status, asks
// questions and draws which moments of the stream each answer read (the retrieval report of `answer.done`).
// Credentials (API key, owner token) stay in this page's memory and travel in headers and websocket
// subprotocols only, never in a URL. Thumbnails are kept by this page from the frames it sent.

const $ = (id) => document.getElementById(id);
const MAX_IN_FLIGHT = 4;      // frames sent and not yet acknowledged: past it a tick is skipped
const MAX_THUMBNAILS = 5000;  // the newest frames' thumbnails are kept (1.6 kB data URLs for the test pattern)
const THUMB_WIDTH = 112, THUMB_HEIGHT = 84, MOMENTS = 6, POLL_MS = 1000, DEMO_ASK_MS = 20000;
const DEMO_QUESTIONS = ["What is moving?", "What color is the square?", "Where did the circle go?",
                        "What happened at the start?"];

const state = {
  key: null, imageSize: null, stream: null, token: null, shortTerm: 0, ws: null,
  media: null, objectUrl: null, timer: null, pattern: null,
  sent: 0, skipped: 0, refused: 0, sampledOut: 0, dropped: 0, accepted: 0, inFlight: [], thumbnails: new Map(),
  live: {encoded: 0, pending: 0, clips: 0}, stats: null, answering: null, answers: [], selected: null,
};

class HTTPError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function notice(message, problem = true) {
  $("notice").textContent = message || "";
  $("notice").classList.toggle("info", !problem);
}

function headers(extra = {}) {
  const result = {...extra};
  if (state.key) result.Authorization = `Bearer ${state.key}`;
  if (state.token) result["X-Stream-Token"] = state.token;
  return result;
}

async function api(method, path, body) {
  const init = {method, headers: headers(body ? {"Content-Type": "application/json"} : {})};
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new HTTPError(data.error?.message || `${method} ${path}: HTTP ${response.status}`, response.status);
  return data;
}

// ---- connection and stream ----------------------------------------------------------------------------
async function connect() {
  try {
    const engine = await api("GET", "/v1/video/engine");
    // Every server answers `image_size` (on Ray Serve, the replica this request reached).
    state.imageSize = engine.image_size;
    if (!state.imageSize) throw new Error("the server does not say its model's input size (image_size)");
    $("server").textContent = `connected to ${location.host} · frames sent as ${state.imageSize}×${state.imageSize} JPEG`;
    $("create").disabled = state.stream !== null;
    notice("");
    return true;
  } catch (e) {
    if (e.status === 401) $("key-form").hidden = false;
    notice(`cannot connect: ${e.message}`);
    return false;
  }
}

function streamConfig() {
  const config = {sample_fps: null};  // this page samples its source at the chosen fps: the server keeps all
  for (const [id, knob, parse] of [["clip-frames", "clip_frames", Number.parseInt],
                                   ["budget", "long_term_budget_tokens", Number.parseInt],
                                   ["retrieve-ratio", "retrieve_ratio", Number.parseFloat]]) {
    const text = $(id).value.trim();
    if (text !== "") config[knob] = parse(text);
  }
  return config;
}

async function createStream() {
  // `reject`: a frame the server cannot queue is refused (and counted here), so the server's frame numbers
  // follow the order of the frames this page sent and kept thumbnails of.
  const created = await api("POST", "/v1/video/streams", {config: streamConfig(), pending_policy: "reject"});
  Object.assign(state, {stream: created.id, token: created.token, shortTerm: created.config.short_term_frames,
                        sent: 0, skipped: 0, refused: 0, sampledOut: 0, dropped: 0, accepted: 0, inFlight: [],
                        stats: null, answers: [], selected: null, live: {encoded: 0, pending: 0, clips: 0}});
  state.thumbnails.clear();
  $("answers").replaceChildren();
  const knobs = created.config;
  $("stream-id").textContent = `stream ${created.id}: clip_frames ${knobs.clip_frames} · long_term_budget_tokens ` +
    `${knobs.long_term_budget_tokens} · retrieve_ratio ${knobs.retrieve_ratio} · short_term_frames ${knobs.short_term_frames}`;
  $("create").disabled = true;
  $("delete").disabled = false;
  openSocket();
  poll(created.id);
  renderStatus();
  renderTimeline(null);
}

async function deleteStream() {
  const id = state.stream;
  stopSource();
  closeSocket();
  state.stream = null;
  $("delete").disabled = $("start").disabled = $("ask").disabled = true;
  try {
    const deleted = await api("DELETE", `/v1/video/streams/${id}`);
    $("stream-id").textContent = `stream ${id} deleted (${formatBytes(deleted.bytes_freed)} freed)`;
  } catch (e) {
    notice(e.message);
  }
  state.token = null;
  $("create").disabled = false;
}

async function poll(id) {
  if (id !== state.stream) return;  // deleted, or another stream created since
  try {
    const stream = await api("GET", `/v1/video/streams/${id}`);
    if (id !== state.stream) return;
    state.stats = stream.stats;
    state.live = {encoded: stream.stats.frames_encoded, pending: stream.stats.pending_frames, clips: stream.stats.clips};
    if (stream.state === "failed") notice(`the stream failed: ${stream.error}`);
    renderStatus();
    renderTimeline(state.selected);
  } catch (e) {
    notice(e.message);
    if (e.status === 404 || e.status === 410) return;  // gone: stop polling
  }
  setTimeout(() => poll(id), POLL_MS);
}

// ---- the websocket ----------------------------------------------------------------------------------------
function openSocket() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["livevlm", `livevlm.token.${state.token}`, ...(state.key ? [`livevlm.key.${state.key}`] : [])];
  let ws;
  try {
    ws = new WebSocket(`${scheme}://${location.host}/v1/video/streams/${state.stream}/ws`, protocols);
  } catch (e) {  // a subprotocol may only hold URL-safe characters
    notice(`cannot open the stream's websocket (the API key must be made of URL-safe characters): ${e.message}`);
    return;
  }
  ws.onopen = () => { $("start").disabled = false; $("ask").disabled = state.answering !== null; };
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    stopSource();
    $("start").disabled = $("ask").disabled = true;
    notice(`the stream's websocket closed (code ${event.code})`);
  };
  state.ws = ws;
}

function closeSocket() {
  const ws = state.ws;
  state.ws = null;
  if (ws) ws.close();
}

function onMessage(message) {
  if (message.type === "frames.accepted") {
    // Frames the server keeps are numbered in arrival order; one it sampled out gets no number.
    const thumbnail = state.inFlight.shift();
    if (message.frames_sampled_out) state.sampledOut += message.frames_sampled_out;
    else keepThumbnail(state.accepted++, thumbnail);
    // Between polls, the counters as of this acknowledgement (frames kept = encoded + pending + dropped).
    state.dropped += message.frames_dropped ?? 0;
    state.live = {encoded: state.accepted - message.pending_frames - state.dropped, pending: message.pending_frames,
                  clips: message.clips_encoded};
    renderStatus();
  } else if (message.type === "error") {
    onError(message.error);
  } else if (message.type === "answer.delta") {
    const answer = state.answering;
    answer.firstAt ??= performance.now();
    answer.text += message.delta;
    renderAnswer(answer);
  } else if (message.type === "answer.done") {
    finishAnswer(Object.assign(state.answering, {text: message.text, framesCovered: message.frames_covered,
                                                 timings: message.timings, retrieval: message.retrieval}));
  }
}

function onError(error) {
  if (error.param === "frames") {  // the oldest unacknowledged frame was refused
    state.inFlight.shift();
    state.refused++;
    notice(`a frame was refused: ${error.message}`);
    renderStatus();
  } else if (state.answering) {
    finishAnswer(Object.assign(state.answering, {error: error.message}));
  } else {
    notice(error.message);
  }
}

function keepThumbnail(index, thumbnail) {
  if (thumbnail === undefined) return;
  state.thumbnails.set(index, thumbnail);
  state.thumbnails.delete(index - MAX_THUMBNAILS);
}

// ---- sources ----------------------------------------------------------------------------------------------
async function startSource() {
  const kind = $("source").value;
  const video = $("preview");
  if (kind === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a video file first");
    state.objectUrl = URL.createObjectURL(file);
    video.srcObject = null;
    video.src = state.objectUrl;
    video.loop = true;
  } else {
    state.media = kind === "camera" ? await navigator.mediaDevices.getUserMedia({video: true, audio: false})
      : kind === "screen" ? await navigator.mediaDevices.getDisplayMedia({video: true, audio: false})
      : startPattern();
    state.media.getVideoTracks().forEach((track) => { track.onended = stopSource; });
    video.srcObject = state.media;
  }
  await video.play();
  const fps = Math.min(30, Math.max(0.1, Number.parseFloat($("fps").value) || 1));
  state.timer = setInterval(sampleFrame, 1000 / fps);
  $("start").disabled = true;
  $("stop").disabled = false;
  $("frame-size").textContent = `${video.videoWidth}×${video.videoHeight} source, sent as ` +
                                `${state.imageSize}×${state.imageSize} JPEG at ${fps} fps`;
}

function stopSource() {
  clearInterval(state.timer);
  state.timer = null;
  state.media?.getTracks().forEach((track) => track.stop());
  state.media = null;
  if (state.pattern) cancelAnimationFrame(state.pattern);
  state.pattern = null;
  const video = $("preview");
  video.pause();
  video.srcObject = null;
  if (state.objectUrl) {
    video.removeAttribute("src");
    URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = null;
  }
  $("stop").disabled = true;
  $("start").disabled = state.ws === null;
}

function startPattern() {
  // Moving shapes drawn here: the demo's source (no camera needed).
  const canvas = document.createElement("canvas");
  canvas.width = 640;
  canvas.height = 480;
  const ctx = canvas.getContext("2d");
  const start = performance.now();
  const draw = (now) => {
    const t = (now - start) / 1000;
    ctx.fillStyle = "#1e293b";
    ctx.fillRect(0, 0, 640, 480);
    ctx.fillStyle = "#dc2626";
    ctx.fillRect(40 + Math.abs(((t * 120) % 1040) - 520), 60, 80, 80);
    ctx.fillStyle = "#2563eb";
    ctx.beginPath();
    ctx.arc(320 + 140 * Math.cos(t), 280 + 120 * Math.sin(t), 40, 0, 2 * Math.PI);
    ctx.fill();
    ctx.fillStyle = "#f8fafc";
    ctx.font = "28px monospace";
    ctx.fillText(`t = ${t.toFixed(1)} s`, 20, 455);
    state.pattern = requestAnimationFrame(draw);
  };
  state.pattern = requestAnimationFrame(draw);
  return canvas.captureStream(30);
}

function sampleFrame() {
  const video = $("preview");
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN || video.readyState < 2 || !video.videoWidth) return;
  if (state.inFlight.length >= MAX_IN_FLIGHT) {
    state.skipped++;
    return;
  }
  // The model's processor resizes every frame to image_size squared: that is what is sent.
  const side = state.imageSize;
  const canvas = $("frame-canvas");
  if (canvas.width !== side) canvas.width = canvas.height = side;
  canvas.getContext("2d").drawImage(video, 0, 0, side, side);
  const thumb = $("thumb-canvas");
  thumb.width = THUMB_WIDTH;
  thumb.height = THUMB_HEIGHT;
  thumb.getContext("2d").drawImage(video, 0, 0, THUMB_WIDTH, THUMB_HEIGHT);
  state.inFlight.push(thumb.toDataURL("image/jpeg", 0.7));
  state.sent++;
  state.ws.send(dataUrlBytes(canvas.toDataURL("image/jpeg", 0.85)));  // synchronous: frames stay in order
  renderStatus();
}

function dataUrlBytes(url) {
  const binary = atob(url.slice(url.indexOf(",") + 1));
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// ---- questions --------------------------------------------------------------------------------------------
function ask(question) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN || state.answering || !question.trim()) return;
  const maxTokens = Number.parseInt($("max-tokens").value, 10) || 32;
  const answer = {question, text: "", sentAt: performance.now(), firstAt: null, number: state.answers.length + 1};
  answer.element = document.createElement("li");
  answer.element.onclick = () => select(answer);
  $("answers").append(answer.element);
  state.answers.push(answer);
  state.answering = answer;
  $("ask").disabled = true;
  state.ws.send(JSON.stringify({type: "question", question, max_tokens: maxTokens, temperature: 0}));
  renderAnswer(answer);
}

function finishAnswer(answer) {
  state.answering = null;
  $("ask").disabled = state.ws === null;
  renderAnswer(answer);
  if (answer.retrieval) select(answer);
}

function select(answer) {
  if (!answer.retrieval) return;
  state.selected?.element.classList.remove("selected");
  state.selected = answer;
  answer.element.classList.add("selected");
  renderTimeline(answer);
}

function renderAnswer(answer) {
  const q = Object.assign(document.createElement("div"), {className: "q", textContent: `Q${answer.number}: ${answer.question}`});
  const text = Object.assign(document.createElement("div"), {className: "text", textContent: answer.text || "…"});
  const meta = Object.assign(document.createElement("div"), {className: "meta"});
  if (answer.error) {
    meta.className = "meta failed";
    meta.textContent = `failed: ${answer.error}`;
  } else if (answer.firstAt !== null) {
    const ttft = Math.round(answer.firstAt - answer.sentAt);
    const server = answer.timings?.ttft !== undefined ? ` (server ${Math.round(1000 * answer.timings.ttft)} ms)` : "";
    meta.textContent = `TTFT ${ttft} ms${server}` +
      (answer.framesCovered !== undefined ? ` · frames_covered ${answer.framesCovered} · ${pagesRead(answer)} pages read` : " · streaming");
  }
  answer.element.replaceChildren(q, text, meta);
  answer.element.scrollIntoView({block: "nearest"});
}

function pagesRead(answer) {
  return Object.values(answer.retrieval?.pages ?? {}).reduce((sum, pages) => sum + pages.length, 0);
}

// ---- rendering --------------------------------------------------------------------------------------------
function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit++; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function show(id, value, text) {
  const element = $(id);
  element.dataset.value = String(value);
  element.textContent = text ?? String(value);
}

function renderStatus() {
  const stats = state.stats ?? {};
  show("stat-sent", state.sent, state.skipped ? `${state.sent} (${state.skipped} skipped)` : String(state.sent));
  show("stat-encoded", state.live.encoded);
  show("stat-pending", state.live.pending);
  show("stat-refused", state.refused, `${state.refused} / ${stats.frames_sampled_out ?? 0} / ${stats.frames_dropped ?? 0}`);
  show("stat-lag", stats.ingest_lag_seconds ?? 0, `${(stats.ingest_lag_seconds ?? 0).toFixed(1)} s`);
  show("stat-clips", state.live.clips);
  const bound = stats.memory_bound_bytes;
  show("stat-bytes", stats.bytes ?? 0, formatBytes(stats.bytes ?? 0));
  show("stat-bound", bound ?? 0, formatBytes(bound));
  show("stat-compression", stats.compression_ratio ?? 0,
       stats.compression_ratio ? `${stats.compression_ratio.toFixed(2)}×` : "–");
  show("stat-pages", stats.pages ?? 0);
  $("memory-bar").firstElementChild.style.width = bound ? `${Math.min(100, 100 * (stats.bytes ?? 0) / bound)}%` : "0";
}

// How many layers read each frame the answer covered (a layer reads a frame if one of its pages spans it).
function layerCounts(answer) {
  const covered = answer.framesCovered;
  const counts = new Uint16Array(covered);
  const layers = Object.values(answer.retrieval.pages);
  for (const pages of layers) {
    const read = new Uint8Array(covered);
    for (const {frames: [first, last]} of pages) read.fill(1, Math.max(0, first), Math.min(covered, last + 1));
    read.forEach((r, f) => { counts[f] += r; });
  }
  return {counts, layers: layers.length};
}

// Maximal runs of frames read by the same number of layers.
function runsOf(counts) {
  const runs = [];
  for (let f = 0; f < counts.length; f++) {
    const last = runs[runs.length - 1];
    if (last && last.count === counts[f] && last.last === f - 1) last.last = f;
    else runs.push({first: f, last: f, count: counts[f]});
  }
  return runs.filter((run) => run.count > 0);
}

function renderTimeline(answer) {
  const timeline = $("timeline");
  const total = Math.max(1, state.accepted, answer?.framesCovered ?? 0);  // frames the server kept
  const pct = (frames) => `${(100 * frames / total).toFixed(3)}%`;
  const box = (className, first, end, title) => Object.assign(document.createElement("div"), {className, title,
    style: `left: ${pct(first)}; width: ${pct(end - first)}`});
  const children = [];
  let readFrames = 0, pages = 0;
  if (answer) {
    const covered = answer.framesCovered;
    const {counts, layers} = layerCounts(answer);
    const runs = runsOf(counts);
    children.push(box("covered", 0, covered, `frames 0–${covered - 1}: covered by answer ${answer.number}`));
    for (const run of runs) {
      const element = box("read", run.first, run.last + 1, `frames ${run.first}–${run.last}: read by ${run.count} of ${layers} layers`);
      element.style.background = `rgba(var(--read), ${(0.25 + 0.75 * run.count / layers).toFixed(3)})`;
      element.dataset.layers = String(run.count);
      children.push(element);
      readFrames += run.last - run.first + 1;
    }
    children.push(box("stm", Math.max(0, covered - state.shortTerm), covered, "short-term window (kept uncompressed)"));
    pages = pagesRead(answer);
    $("timeline-caption").textContent = `answer ${answer.number}: ${pages} long-term pages read over ${layers} ` +
      `layers, spanning ${readFrames} of the ${covered} frames it covered (the stream has ${total})`;
    renderMoments(runs, layers, frameSeconds(answer));
  }
  children.push(...ticks(total));
  timeline.replaceChildren(...children);
  Object.assign(timeline.dataset, {frames: String(total), readFrames: String(readFrames), pages: String(pages)});
}

function ticks(total) {
  return [0, 0.25, 0.5, 0.75, 1].map((share, i, all) => {
    const frame = Math.round(share * total);
    const tick = Object.assign(document.createElement("span"), {className: "tick",
      textContent: i === all.length - 1 ? `${frame} frames` : String(frame)});
    tick.style.left = `${100 * share}%`;
    if (i === 0) tick.style.transform = "none";
    if (i === all.length - 1) tick.style.transform = "translateX(-100%)";
    return tick;
  });
}

// The stream-clock time of each frame that starts or ends a page read (the report's `seconds`).
function frameSeconds(answer) {
  const seconds = new Map();
  for (const pages of Object.values(answer.retrieval.pages)) {
    for (const page of pages) {
      if (!page.seconds) continue;
      seconds.set(page.frames[0], page.seconds[0]);
      seconds.set(page.frames[1], page.seconds[1]);
    }
  }
  return seconds;
}

// Websocket frames are stamped with their arrival (epoch seconds): shown as the time of day; others as seconds.
function momentTime(start, end) {
  if (start === undefined || end === undefined) return "";
  if (start > 1e9) return ` · ${new Date(1000 * start).toTimeString().slice(0, 8)}`;
  return ` · ${start.toFixed(1)}–${end.toFixed(1)} s`;
}

function renderMoments(runs, layers, seconds) {
  const top = [...runs].sort((a, b) => b.count - a.count || (b.last - b.first) - (a.last - a.first)).slice(0, MOMENTS);
  $("moments").replaceChildren(...top.map((run) => {
    const figure = document.createElement("figure");
    const frame = Math.floor((run.first + run.last) / 2);
    const src = state.thumbnails.get(frame);
    const picture = src ? Object.assign(document.createElement("img"), {src, alt: `frame ${frame}`})
      : Object.assign(document.createElement("div"), {className: "missing", title: "not kept by this page"});
    const range = run.first === run.last ? `frame ${run.first}` : `frames ${run.first}–${run.last}`;
    const time = momentTime(seconds.get(run.first), seconds.get(run.last));
    figure.append(picture, Object.assign(document.createElement("figcaption"),
                                         {textContent: `${range}${time} · ${run.count}/${layers} layers`}));
    return figure;
  }));
}

// ---- wiring -----------------------------------------------------------------------------------------------
function guarded(action) {
  return (event) => {
    event?.preventDefault();
    Promise.resolve().then(action).catch((e) => notice(e.message));
  };
}

async function demo() {
  // `#demo` (`make demo`): a test pattern streams from this page and a question is asked every 20 s.
  $("source").value = "pattern";
  await createStream();
  await new Promise((resolve) => { state.ws.addEventListener("open", resolve, {once: true}); });
  await startSource();
  let asked = 0;
  setInterval(() => { if (!state.answering) ask(DEMO_QUESTIONS[asked++ % DEMO_QUESTIONS.length]); }, DEMO_ASK_MS);
  notice("demo: a test pattern streams from this page; a question is asked every 20 s (ask your own below)", false);
}

async function main() {
  $("key-form").addEventListener("submit", guarded(async () => {
    state.key = $("key").value || null;
    if (await connect()) $("key-form").hidden = true;
  }));
  $("stream-form").addEventListener("submit", guarded(createStream));
  $("delete").addEventListener("click", guarded(deleteStream));
  $("start").addEventListener("click", guarded(startSource));
  $("stop").addEventListener("click", guarded(stopSource));
  $("source").addEventListener("change", () => { $("file-label").hidden = $("source").value !== "file"; });
  $("ask-form").addEventListener("submit", guarded(() => { ask($("question").value); $("question").value = ""; }));
  renderStatus();
  renderTimeline(null);
  if (document.body.dataset.keyRequired === "yes") {
    $("key-form").hidden = false;
    $("key").focus();
  } else if (await connect() && location.hash === "#demo") {
    await demo();
  }
}

main().catch((e) => notice(e.message));
