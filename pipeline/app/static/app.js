// The page: class cards with counts and thumbnails, hold-to-record from the webcam, upload, delete and restore.
// Every request carries the token cookie the printed address set (same origin only); the data lives on disk.
"use strict";

const SHOWN = 120; // thumbnails per card (the newest); the count is always the folder's
const state = { classes: [], recording: null, camera: null };
const $ = (sel, root = document) => root.querySelector(sel);
const enc = encodeURIComponent;

if (new URLSearchParams(location.search).has("token")) {
  history.replaceState(null, "", "/"); // the token now lives in the cookie; keep it out of the address bar
}

async function api(method, path, body, raw) {
  const init = { method, headers: {} };
  if (raw !== undefined) { init.body = raw; init.headers["content-type"] = "application/octet-stream"; }
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["content-type"] = "application/json"; }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (e) { data = { error: text }; }
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function say(text, isError) {
  const message = $("#message");
  message.textContent = text || "";
  message.className = isError ? "error" : "";
}

async function guarded(action) {
  try { await action(); } catch (err) { say(err.message, true); }
}

async function refresh() {
  const project = await api("GET", "/api/project");
  state.classes = project.classes;
  const weights = project.weights === "random" ? "random weights: for trials" : `${project.weights} weights`;
  $("#project-line").textContent = `Project ${project.project} · images in ${project.images} · backbone ${project.backbone} (${weights})`;
  const advice = $("#advice");
  advice.replaceChildren(...project.advice.map((line) => Object.assign(document.createElement("li"), { textContent: line })));
  if (!project.classes.length) {
    advice.replaceChildren(Object.assign(document.createElement("li"), { textContent: "Add a class to start, e.g. mug; then hold Record on its card." }));
  }
  const cards = $("#cards");
  const wanted = project.classes.map((c) => c.name);
  for (const card of [...cards.children]) if (!wanted.includes(card.dataset.name)) card.remove();
  for (const info of project.classes) {
    let card = cards.querySelector(`[data-name="${CSS.escape(info.name)}"]`);
    if (!card) { card = makeCard(info.name); cards.append(card); }
    fillCounts(card, info);
    await fillThumbs(card, info.name);
  }
  $("#trash-count").textContent = project.trash;
  await fillTrash();
}

function fillCounts(card, info) {
  $(".count", card).textContent = `${info.images} image${info.images === 1 ? "" : "s"}`;
  $(".detail", card).textContent = `${info.bursts} burst${info.bursts === 1 ? "" : "s"} recorded · ${info.val} held out for val`;
}

function makeCard(name) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  card.dataset.name = name;
  $(".class-name", card).textContent = name;
  $(".rename", card).onclick = () => guarded(async () => {
    const to = prompt(`Rename the class ${name} to:`, name);
    if (!to || to === name) return;
    await api("POST", `/api/classes/${enc(name)}/rename`, { to });
    say(`renamed ${name} to ${to}`);
    await refresh();
  });
  $(".remove", card).onclick = () => guarded(async () => {
    if (!confirm(`Remove the class ${name}? Its images go to the trash.`)) return;
    const result = await api("DELETE", `/api/classes/${enc(name)}`);
    say(`removed ${name}: ${result.to_trash} images moved to the trash`);
    await refresh();
  });
  $(".upload input", card).onchange = (event) => guarded(() => upload(name, event.target));
  const record = $(".record", card);
  record.disabled = !state.camera;
  record.addEventListener("pointerdown", (e) => { e.preventDefault(); startRecording(name, card); });
  for (const type of ["pointerup", "pointerleave", "pointercancel"]) record.addEventListener(type, stopRecording);
  record.addEventListener("keydown", (e) => { if ((e.key === " " || e.key === "Enter") && !e.repeat) { e.preventDefault(); startRecording(name, card); } });
  record.addEventListener("keyup", (e) => { if (e.key === " " || e.key === "Enter") stopRecording(); });
  return card;
}

async function fillThumbs(card, name) {
  const { samples } = await api("GET", `/api/classes/${enc(name)}/samples`);
  const shown = samples.slice(-SHOWN).reverse();
  const grid = $(".thumbs", card);
  grid.replaceChildren(...shown.map((file) => thumb(`/api/classes/${enc(name)}/samples/${enc(file)}`, file, "×",
    "delete (to the trash)", () => guarded(async () => {
      await api("DELETE", `/api/classes/${enc(name)}/samples/${enc(file)}`);
      say(`moved ${file} to the trash`);
      await refresh();
    }))));
  if (samples.length > SHOWN) {
    grid.append(Object.assign(document.createElement("p"), { className: "muted", textContent: `and ${samples.length - SHOWN} older images` }));
  }
}

function thumb(src, file, label, title, onclick) {
  const box = document.createElement("div");
  box.className = "thumb";
  box.dataset.file = file;
  const img = Object.assign(document.createElement("img"), { src, alt: file, loading: "lazy", title: file });
  const button = Object.assign(document.createElement("button"), { type: "button", textContent: label, title });
  button.onclick = onclick;
  box.append(img, button);
  return box;
}

async function fillTrash() {
  const { items } = await api("GET", "/api/trash");
  $("#trash-grid").replaceChildren(...items.map((item) => {
    const box = thumb(`/api/trash/${enc(item.class)}/${enc(item.name)}`, item.name, "restore", `restore into ${item.class}`,
      () => guarded(async () => {
        await api("POST", "/api/trash/restore", { class: item.class, name: item.name });
        say(`restored ${item.name} into ${item.class}`);
        await refresh();
      }));
    box.classList.add("trashed");
    box.append(Object.assign(document.createElement("span"), { className: "caption", textContent: item.class }));
    return box;
  }));
}

async function upload(name, input) {
  const files = [...input.files];
  let stored = 0;
  const skipped = [];
  for (const file of files) {
    const result = await api("POST", `/api/classes/${enc(name)}/upload?filename=${enc(file.name)}`, undefined, file);
    stored += result.stored.length;
    skipped.push(...result.skipped);
  }
  input.value = "";
  say(`stored ${stored} image${stored === 1 ? "" : "s"} in ${name}` + (skipped.length ? `; skipped ${skipped.join(", ")}` : ""));
  await refresh();
}

function startRecording(name, card) {
  if (state.recording || !state.camera) return;
  const video = $("#camera");
  const canvas = document.createElement("canvas");
  const button = $(".record", card);
  const base = state.classes.find((c) => c.name === name)?.images ?? 0;
  const rec = { name, card, pending: 0, stopped: false, timer: null, saved: 0 };
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  rec.socket = new WebSocket(`${scheme}://${location.host}/api/capture?class=${enc(name)}`);
  rec.socket.onopen = () => {
    rec.timer = setInterval(() => {
      if (rec.stopped || !video.videoWidth) return;
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      canvas.getContext("2d").drawImage(video, 0, 0);
      rec.pending += 1;
      canvas.toBlob((blob) => {
        rec.pending -= 1;
        if (blob && rec.socket.readyState === WebSocket.OPEN) rec.socket.send(blob);
        finish(rec);
      }, "image/jpeg", 0.92);
    }, 1000 / Number($("#rate").value));
  };
  rec.socket.onmessage = (event) => {
    const data = JSON.parse(event.data);
    if (data.error) say(data.error, true);
    if (data.saved !== undefined) {
      rec.saved = data.saved;
      $(".count", card).textContent = `${base + data.saved} images`;
      button.textContent = `● Recording… ${data.saved} saved`;
    }
    if (data.done !== undefined) say(`recorded ${data.done} frames into ${name} (burst ${data.burst})`);
  };
  rec.socket.onclose = () => {
    button.classList.remove("recording");
    button.textContent = "● Hold to record";
    state.recording = null;
    guarded(refresh);
  };
  button.classList.add("recording");
  button.textContent = "● Recording…";
  state.recording = rec;
}

function stopRecording() {
  const rec = state.recording;
  if (!rec || rec.stopped) return;
  rec.stopped = true;
  clearInterval(rec.timer);
  finish(rec);
}

function finish(rec) {
  if (!rec.stopped || rec.pending > 0) return;
  if (rec.socket.readyState === WebSocket.OPEN) rec.socket.send("end");
  else if (rec.socket.readyState === WebSocket.CONNECTING) rec.socket.onopen = () => rec.socket.send("end");
}

async function startCamera() {
  const note = $("#camera-note");
  if (!window.isSecureContext || !navigator.mediaDevices) {
    note.hidden = false;
    note.textContent = `Webcam capture needs the page on the loopback (http://127.0.0.1 or http://localhost) or on HTTPS; ` +
      `this page is at ${location.origin}. Upload images instead, or open the page on the computer running the server.`;
    return;
  }
  try {
    state.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    $("#camera").srcObject = state.camera;
  } catch (err) {
    note.hidden = false;
    note.textContent = `The camera could not be opened (${err.name}: ${err.message}). Allow it in the browser, or upload images.`;
  }
  for (const button of document.querySelectorAll(".record")) button.disabled = !state.camera;
}

$("#add-form").onsubmit = (event) => {
  event.preventDefault();
  guarded(async () => {
    const input = $("#new-class");
    const name = input.value.trim();
    if (!name) return;
    await api("POST", "/api/classes", { name });
    input.value = "";
    say(`added the class ${name}: hold its Record button to record`);
    await refresh();
  });
};

guarded(async () => { await startCamera(); await refresh(); });
