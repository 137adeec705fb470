// The loop on the page: train (progress and curves from /api/train/watch), what is confused (the matrix, a cell's
// images), live bars (camera frames over /api/live; the server answers the newest), export (ONNX and the images).
// Uses app.js's helpers: $, api, say, guarded, thumb, refresh, state, enc.
"use strict";

const loop = { watch: null, live: null, lastRun: null, evalShown: false };
const wsBase = () => `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;

// train

function watchTraining() {
  const socket = new WebSocket(`${wsBase()}/api/train/watch`);
  socket.onmessage = (event) => showTraining(JSON.parse(event.data));
  socket.onclose = () => setTimeout(watchTraining, 1000); // the server restarted, or the network blinked
  loop.watch = socket;
}

function showTraining(s) {
  const running = s.state === "running";
  $("#train").disabled = running;
  $("#cancel").disabled = !running;
  $("#train-progress").value = s.progress || 0;
  const took = s.seconds ? ` in ${s.seconds.toFixed(1)} s` : "";
  const words = { idle: "Press Train: it reads the images now on disk.", running: s.message, done: `Done: ${s.message}${took}.`,
    cancelled: `Cancelled${took}: ${s.message}.`, failed: `Failed: ${s.error}` };
  const line = $("#train-line");
  line.textContent = words[s.state] || s.message;
  line.className = s.state === "failed" ? "error" : "";
  drawCurves(s.epochs || []);
  if (s.state === "done" && loop.lastRun !== s.run) {
    loop.lastRun = s.run;
    guarded(showEvaluation); // the new head's confusion matrix, at once
  }
}

function drawCurves(epochs) {
  const canvas = $("#curves");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 28;
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#5b6478";
  ctx.font = "11px system-ui";
  if (!epochs.length) { ctx.fillText("the curves appear here, one point per epoch", pad, H / 2); return; }
  const maxLoss = Math.max(...epochs.map((e) => e.train_loss), 1e-6);
  const x = (i) => pad + (epochs.length === 1 ? 0 : (i / (epochs.length - 1)) * (W - 2 * pad));
  const series = [
    ["#c62828", (e) => e.train_loss / maxLoss],
    ["#2d6cdf", (e) => (e.score_acc ?? e.train_acc) / 100],
  ];
  ctx.strokeStyle = "#d6dbe6";
  ctx.strokeRect(pad, 8, W - 2 * pad, H - pad - 8);
  for (const [color, value] of series) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    epochs.forEach((e, i) => { const y = H - pad - value(e) * (H - pad - 8); i ? ctx.lineTo(x(i), y) : ctx.moveTo(x(i), y); });
    ctx.stroke();
  }
  const last = epochs[epochs.length - 1];
  ctx.fillStyle = "#1d2433";
  ctx.fillText(`epoch ${last.epoch}/${last.epochs}   loss ${last.train_loss.toFixed(3)}   ` +
    `accuracy ${(last.score_acc ?? last.train_acc).toFixed(1)}% (${last.scored_on || "train"})`, pad, H - 8);
}

$("#train").onclick = () => guarded(async () => {
  const result = await api("POST", "/api/train", { head: $("#head").value });
  if (!result.started) say("a training is already running (started elsewhere): its progress is shown here");
  showTraining(result);
});
$("#cancel").onclick = () => guarded(() => api("POST", "/api/train/cancel"));

// what is confused

async function showEvaluation() {
  const result = await api("GET", "/api/evaluate");
  const acc = result.accuracy === null ? "no held-out images yet (record more bursts per class)" :
    `${(100 * result.accuracy).toFixed(1)}% of ${result.images} held-out images right`;
  $("#eval-line").textContent = `${result.head} head: ${acc}` +
    (result.unscored ? `; ${result.unscored} images of classes added since: train again` : "");
  const table = $("#matrix");
  table.replaceChildren();
  const head = table.insertRow();
  head.append(Object.assign(document.createElement("th"), { className: "corner", textContent: "true \\ predicted" }));
  for (const name of result.classes) head.append(Object.assign(document.createElement("th"), { textContent: name }));
  head.append(Object.assign(document.createElement("th"), { textContent: "accuracy" }));
  result.matrix.forEach((row, i) => {
    const tr = table.insertRow();
    tr.append(Object.assign(document.createElement("th"), { textContent: result.classes[i] }));
    row.forEach((count, j) => {
      const td = tr.insertCell();
      td.textContent = count;
      td.className = "cell";
      td.dataset.cell = `${i},${j}`;
      const share = row.reduce((a, b) => a + b, 0) ? count / row.reduce((a, b) => a + b, 0) : 0;
      td.style.background = count ? (i === j ? `rgba(46,125,50,${0.15 + 0.6 * share})` : `rgba(198,40,40,${0.15 + 0.6 * share})`) : "";
      td.title = `${count} ${result.classes[i]} image(s) taken for ${result.classes[j]}: click to see them`;
      td.onclick = () => showCell(result, i, j, td);
    });
    const pc = result.per_class[i];
    tr.insertCell().textContent = pc.accuracy === null ? "–" : `${(100 * pc.accuracy).toFixed(0)}%`;
  });
}

function showCell(result, i, j, td) {
  for (const other of document.querySelectorAll("#matrix td.picked")) other.classList.remove("picked");
  td.classList.add("picked");
  const items = result.cells[`${i},${j}`] || [];
  const grid = $("#cell-grid");
  grid.replaceChildren(...items.map((item) => {
    const box = thumb(`/api/classes/${enc(item.class)}/samples/${enc(item.name)}`, item.name, "×",
      "delete (to the trash); then train again", () => guarded(async () => {
        await api("DELETE", `/api/classes/${enc(item.class)}/samples/${enc(item.name)}`);
        box.remove();
        say(`moved ${item.name} to the trash: press Train to retrain without it`);
        await refresh();
      }));
    box.append(Object.assign(document.createElement("span"), { className: "caption", textContent: `${item.class}→${result.classes[j]}` }));
    return box;
  }));
  if (!items.length) grid.append(Object.assign(document.createElement("p"), { className: "muted", textContent: "no images here" }));
}

$("#evaluate").onclick = () => guarded(showEvaluation);

// live

function startLive() {
  if (!state.camera) { say("live needs the camera (allow it in the browser)", true); return; }
  const video = $("#camera");
  const canvas = document.createElement("canvas");
  const socket = new WebSocket(`${wsBase()}/api/live?runtime=${enc($("#live-runtime").value)}`);
  const live = { socket, timer: null, inFlight: 0, shown: [] };
  socket.onopen = () => {
    live.timer = setInterval(() => {
      if (!video.videoWidth || socket.readyState !== WebSocket.OPEN || socket.bufferedAmount > 2e6) return;
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      canvas.getContext("2d").drawImage(video, 0, 0);
      canvas.toBlob((blob) => { if (blob && socket.readyState === WebSocket.OPEN) socket.send(blob); }, "image/jpeg", 0.85);
    }, 1000 / 30); // the camera's rate; the server drops what it cannot keep up with
  };
  socket.onmessage = (event) => showBars(JSON.parse(event.data), live);
  socket.onclose = (event) => {
    clearInterval(live.timer);
    if (event.reason) say(event.reason, true);
    $("#live-toggle").textContent = "▶ Start live";
    loop.live = null;
  };
  $("#live-toggle").textContent = "■ Stop live";
  loop.live = live;
}

function showBars(data, live) {
  if (data.error) { say(data.error, true); return; }
  const top = data.probs.indexOf(Math.max(...data.probs));
  $("#bars").replaceChildren(...data.names.map((name, i) => {
    const bar = document.createElement("div");
    bar.className = i === top ? "bar top" : "bar";
    bar.dataset.name = name;
    bar.dataset.prob = data.probs[i];
    const fill = Object.assign(document.createElement("div"), { className: "fill" });
    fill.style.width = `${(100 * data.probs[i]).toFixed(1)}%`;
    const track = Object.assign(document.createElement("div"), { className: "track" });
    track.append(fill);
    bar.append(Object.assign(document.createElement("span"), { className: "label", textContent: name }), track,
      Object.assign(document.createElement("span"), { className: "pct", textContent: `${(100 * data.probs[i]).toFixed(0)}%` }));
    return bar;
  }));
  const fps = data.fps ? `${data.fps.toFixed(1)} frames/s classified` : "…";
  $("#live-line").textContent = `${fps} · ${data.ms} ms per frame · ${data.dropped} of ${data.received} stale frames dropped`;
  $("#live-line").dataset.fps = data.fps || 0;
}

$("#live-toggle").onclick = () => {
  if (loop.live) loop.live.socket.close(); else startLive();
};

// export

$("#export").onclick = () => guarded(async () => {
  $("#export").disabled = true;
  $("#export-links").textContent = " exporting…";
  try {
    const made = await api("POST", "/api/export");
    const link = (href, text) => Object.assign(document.createElement("a"), { href, textContent: text, download: href.split("/").pop() });
    $("#export-links").replaceChildren(" ", link(made.onnx, "classifier.onnx"), " ", link(made.sidecar, "classifier.json"),
      ` (${(made.bytes / 2 ** 20).toFixed(0)} MB)`);
    say("exported: download both files and keep them side by side");
  } finally {
    $("#export").disabled = false;
    if ($("#export-links").textContent === " exporting…") $("#export-links").textContent = "";
  }
});

watchTraining();
guarded(async () => { try { await showEvaluation(); } catch (e) { $("#eval-line").textContent = "Train first: the matrix appears here."; } });
