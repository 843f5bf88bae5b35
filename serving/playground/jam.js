// The jam: one listener session (WebSocket /session) streams clips as this page plays
// them; they play back to back on one AudioContext timeline, spectrograms scrolling past.
// The page reports how far it has played, so the server generates each clip in time for
// it; "what to hear next" steers the jam from the next clip on. When a clip is late, the
// last one loops (as the riffusion web app does) until the next one arrives.

import { askForKey } from "./api.js";
import { $, KEY_STORAGE, state } from "./state.js";

const CROSSFADE_S = 0.01; // consecutive clips overlap this much: no gap, no click
const START_DELAY_S = 0.1; // scheduling margin when (re)starting the timeline
const TIMELINE_PX_PER_S = 50; // 5.12 s clip -> 256 px: square like its 512x512 image
const TICK_MS = 100;
const REPORT_EVERY_S = 1; // how often the page tells the server its playback position
const HISTORY_S = 60; // longer than the timeline shows left of the playhead
const SESSION_URL = new URL("../session", document.baseURI);
SESSION_URL.protocol = SESSION_URL.protocol === "https:" ? "wss:" : "ws:";

const jam = state.jam;
let audioContext = null;
let output = null;
let socket = null;
let nextStartTime = 0; // where the next clip starts on the AudioContext clock
let nextToSchedule = 0;
let loop = null; // {source, clip}: the last clip looping while the next one is late
let lastReportAt = 0;
const buffers = new Map(); // clip index -> AudioBuffer
const images = new Map(); // clip index -> loaded <img>
const sources = new Set();
let tickTimer = null;

function jamSettings() {
  return {
    prompt: $("jam-start-prompt").value.trim(),
    seed: Number.parseInt($("jam-start-seed").value, 10),
    seed_image_id: $("jam-seed-image").value,
    mask_image_id: $("jam-mask").value || null,
    denoising: Number($("jam-denoising").value),
    num_inference_steps: Number.parseInt($("jam-steps").value, 10),
  };
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function openSession() {
  const ws = new WebSocket(SESSION_URL);
  socket = ws;
  ws.onopen = () => {
    const key = sessionStorage.getItem(KEY_STORAGE);
    ws.send(JSON.stringify({ type: "start", ...jamSettings(), ...(key ? { api_key: key } : {}) }));
  };
  ws.onmessage = (event) => {
    if (ws !== socket) return;
    onMessage(JSON.parse(event.data));
  };
  ws.onclose = (event) => {
    if (ws !== socket || !jam.playing) return;
    socket = null;
    if (jam.reconnecting) {
      jam.reconnecting = false;
      jam.reconnects += 1;
      openSession(); // the server is shutting down: a new session lands on another replica
      return;
    }
    showJamError(`The session ended (${event.code}${event.reason ? `: ${event.reason}` : ""}).`);
    stopJam("stopped: the session ended");
  };
}

function onMessage(message) {
  switch (message.type) {
    case "accepted":
      jam.sessionId = message.session_id;
      jam.status = "playing";
      break;
    case "refused":
      jam.refusals.push(message);
      showJamError(
        `${message.message} (retry in ${Math.round(message.retry_after_s ?? 30)} s).`,
      );
      stopJam("refused: the service is full");
      break;
    case "clip":
      receiveClip(message);
      break;
    case "error":
      jam.errors.push({ ...message, at: Date.now() });
      if (message.field === "api_key") {
        askForKey("The jam needs a valid API key.");
        stopJam("stopped: the API key was refused");
      }
      showJamError(message.field ? `${message.field}: ${message.message}` : message.message);
      break;
    case "reconnect":
      jam.reconnecting = true; // the close that follows opens a new session
      break;
    default:
      break;
  }
}

async function receiveClip(message) {
  const clip = {
    index: jam.clips.length,
    serverIndex: message.index,
    alpha: message.alpha,
    start: message.start,
    end: message.end,
    status: "received",
    durationS: null,
    startTime: null,
    endTime: null,
    underrunS: message.underrun_s,
    timings: message.timings,
  };
  jam.clips.push(clip);
  jam.clipsReceived += 1;
  try {
    const [buffer, image] = await Promise.all([decodeAudio(message.audio), loadImage(message.image)]);
    if (!jam.playing) return;
    buffers.set(clip.index, buffer);
    images.set(clip.index, image);
    // The MP3 may carry encoder padding at the end: play the clip's own length.
    clip.durationS = Math.min(buffer.duration, message.duration_s || buffer.duration);
    clip.status = "decoded";
    jam.clipsDecoded += 1;
    scheduleReady();
  } catch (err) {
    clip.status = "undecodable";
    showJamError(`Could not play clip ${clip.index + 1}: ${err.message}`);
  }
}

async function decodeAudio(dataUrl) {
  const bytes = await (await fetch(dataUrl)).arrayBuffer();
  return audioContext.decodeAudioData(bytes);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the spectrogram image could not be decoded"));
    image.src = src;
  });
}

// Schedule decoded clips in order, back to back (overlapping by the crossfade).
function scheduleReady() {
  for (;;) {
    const clip = jam.clips[nextToSchedule];
    if (!clip || clip.status !== "decoded") return;
    const now = audioContext.currentTime;
    if (loop) endLoop(now);
    // First clip, or the buffer ran dry: start the timeline again just ahead of now.
    const when = nextStartTime > now + 0.02 ? nextStartTime : now + START_DELAY_S;
    play(buffers.get(clip.index), when, clip.durationS);
    clip.startTime = when;
    clip.endTime = when + clip.durationS;
    clip.status = "scheduled";
    nextStartTime = clip.endTime - CROSSFADE_S;
    nextToSchedule += 1;
  }
}

function play(buffer, when, durationS, looping = false) {
  const source = audioContext.createBufferSource();
  source.buffer = buffer;
  source.loop = looping;
  const gain = audioContext.createGain();
  gain.gain.setValueAtTime(0, when);
  gain.gain.linearRampToValueAtTime(1, when + CROSSFADE_S);
  if (!looping) {
    gain.gain.setValueAtTime(1, when + durationS - CROSSFADE_S);
    gain.gain.linearRampToValueAtTime(0, when + durationS);
  } else {
    source.loopEnd = durationS;
  }
  source.connect(gain).connect(output);
  source.start(when, 0, looping ? undefined : durationS);
  sources.add(source);
  source.onended = () => sources.delete(source);
  return source;
}

// The buffer ran dry: loop the last clip heard, shown as such, until the next one is here.
function startLoop(now) {
  const last = [...jam.clips].reverse().find((clip) => clip.endTime !== null && buffers.has(clip.index));
  if (!last) return;
  loop = { source: play(buffers.get(last.index), now, last.durationS, true), clip: last };
  jam.looping = true;
  jam.loops += 1;
}

function endLoop(now) {
  loop.source.stop(now + START_DELAY_S);
  loop = null;
  jam.looping = false;
}

// Seconds of the session's audio heard: what the server schedules against.
function playedS(now) {
  let played = 0;
  for (const clip of jam.clips) {
    if (clip.startTime === null) continue;
    played += Math.min(clip.durationS, Math.max(0, now - clip.startTime));
  }
  return played;
}

function tick() {
  if (!audioContext) return;
  const now = audioContext.currentTime;
  jam.audioTime = now;
  jam.audioState = audioContext.state;
  const last = jam.clips[nextToSchedule - 1];
  for (const clip of jam.clips) {
    if (clip.status !== "scheduled" && clip.status !== "playing") continue;
    if (now >= clip.startTime && clip.status === "scheduled") {
      jam.clipsStarted += 1;
      clip.status = "playing";
      showCurrentClip(clip);
    }
    if (now >= clip.endTime) {
      clip.status = "played";
      if (clip !== last) buffers.delete(clip.index); // the last one may loop
    }
  }
  for (const [index, _image] of images) {
    const clip = jam.clips[index];
    if (index !== jam.currentClip && clip.endTime !== null && now - clip.endTime > HISTORY_S) {
      images.delete(index);
    }
  }
  jam.bufferedAheadS = Math.max(0, nextStartTime - now);
  const behind = jam.playing && jam.clipsStarted > 0 && now >= nextStartTime;
  if (behind && !jam.behind) {
    jam.underruns += 1;
    startLoop(now);
  }
  jam.behind = behind;
  jam.playedS = playedS(now);
  if (jam.playing && now - lastReportAt >= REPORT_EVERY_S && jam.clipsStarted > 0) {
    lastReportAt = now;
    send({ type: "played", position_s: Math.round(jam.playedS * 1000) / 1000 });
  }
  renderJam();
}

function showCurrentClip(clip) {
  jam.currentClip = clip.index;
  const img = $("jam-spectrogram");
  img.src = images.get(clip.index).src;
  img.hidden = false;
  jam.spectrogramShown = true;
  const describe = (side) => `${side.prompt} (seed ${side.seed})`;
  const total = clip.timings && clip.timings.total;
  const generated = total ? ` · generated in ${total.toFixed(1)} s` : "";
  $("jam-caption").textContent =
    `Clip ${clip.index + 1} · alpha ${clip.alpha.toFixed(2)} · ` +
    `${describe(clip.start)} → ${describe(clip.end)}${generated}`;
}

function renderJam() {
  let status;
  if (!jam.playing) status = jam.status;
  else if (jam.clipsStarted === 0) status = "Generating the first clip…";
  else status = `Playing clip ${jam.currentClip + 1}.`;
  $("jam-status").textContent = status;
  const behindLine = $("jam-behind");
  if (jam.behind) {
    behindLine.textContent = jam.looping
      ? `The next clip is late: looping clip ${loop.clip.index + 1} until it arrives.`
      : "The next clip is late: waiting for it.";
  }
  behindLine.hidden = !jam.behind;
  $("jam-buffered").textContent = `${jam.bufferedAheadS.toFixed(1)} s`;
  $("jam-count").textContent = `${jam.clipsStarted} played, ${jam.clipsReceived} received`;
  const current = jam.clips[jam.currentClip];
  $("jam-alpha").textContent = current ? current.alpha.toFixed(2) : "–";
  $("jam-steer").disabled = !jam.playing;
}

export function drawTimeline() {
  const canvas = $("jam-timeline");
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.fillStyle = "#000";
  g.fillRect(0, 0, width, height);
  const playheadX = Math.round(width * 0.3);
  if (audioContext) {
    const now = audioContext.currentTime;
    for (const clip of jam.clips) {
      if (clip.startTime === null || !images.has(clip.index)) continue;
      const x = playheadX + (clip.startTime - now) * TIMELINE_PX_PER_S;
      const w = clip.durationS * TIMELINE_PX_PER_S;
      if (x + w < 0 || x > width) continue;
      g.drawImage(images.get(clip.index), x, 0, w, height);
    }
    if (jam.behind) {
      const x = playheadX + (nextStartTime - now) * TIMELINE_PX_PER_S;
      g.fillStyle = "rgba(180, 83, 9, 0.5)";
      g.fillRect(x, 0, playheadX - x, height);
    }
  }
  g.fillStyle = "#fff";
  g.fillRect(playheadX, 0, 2, height);
  if (jam.playing) requestAnimationFrame(drawTimeline);
}

function showJamError(message) {
  $("jam-error").textContent = message;
  $("jam-error").hidden = false;
}

// "What to hear next": sent over the session, heard from the next clip it generates.
export function steerJam() {
  const prompt = $("jam-next-prompt").value.trim();
  if (!jam.playing || !prompt) return;
  send({ type: "steer", prompt });
  jam.steers.push({ prompt, at: Date.now() });
  $("jam-error").hidden = true;
}

export async function startJam() {
  if (!$("jam-form").reportValidity()) return;
  if (!audioContext) {
    audioContext = new AudioContext();
    output = audioContext.createGain();
    output.connect(audioContext.destination);
  }
  await audioContext.resume();
  buffers.clear();
  images.clear();
  Object.assign(jam, {
    playing: true,
    status: "connecting",
    sessionId: null,
    clips: [],
    clipsReceived: 0,
    clipsDecoded: 0,
    clipsStarted: 0,
    bufferedAheadS: 0,
    playedS: 0,
    behind: false,
    looping: false,
    underruns: 0,
    loops: 0,
    currentClip: null,
    spectrogramShown: false,
    errors: [],
    refusals: [],
    steers: [],
    reconnecting: false,
    reconnects: 0,
  });
  nextStartTime = 0;
  nextToSchedule = 0;
  lastReportAt = 0;
  loop = null;
  $("jam-error").hidden = true;
  $("jam-play").textContent = "Stop";
  tickTimer = setInterval(tick, TICK_MS);
  openSession();
  requestAnimationFrame(drawTimeline);
}

export function stopJam(status = "Stopped.") {
  jam.playing = false;
  jam.behind = false;
  jam.looping = false;
  jam.status = status;
  const closing = socket;
  socket = null;
  if (closing) closing.close(1000, "the listener stopped");
  for (const source of sources) source.stop();
  sources.clear();
  loop = null;
  clearInterval(tickTimer);
  $("jam-play").textContent = "Play";
  renderJam();
}
