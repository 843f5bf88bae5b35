// The jam: clips requested ahead over run_inference/, alpha walking 0 -> 1 and on, played
// back to back on one AudioContext timeline with their spectrograms scrolling past.

import { ApiError, api } from "./api.js";
import { $, state } from "./state.js";

const ALPHA_STEP = 0.25; // four clips per transition, like the riffusion web app
const MAX_AHEAD = 3; // clips requested or waiting ahead of the one playing (web app: 3)
const CROSSFADE_S = 0.01; // consecutive clips overlap this much: no gap, no click
const START_DELAY_S = 0.1; // scheduling margin when (re)starting the timeline
const RETRY_BASE_S = 1;
const RETRY_MAX_S = 10;
const TIMELINE_PX_PER_S = 50; // 5.12 s clip -> 256 px: square like its 512x512 image
const TICK_MS = 100;
const HISTORY_S = 60; // longer than the timeline shows left of the playhead

const jam = state.jam;
let audioContext = null;
let output = null;
let runId = 0; // bumped on stop: late answers of an old run are dropped
let walker = null;
let nextStartTime = 0; // where the next clip starts on the AudioContext clock
let nextToSchedule = 0;
const buffers = new Map(); // clip index -> AudioBuffer
const images = new Map(); // clip index -> loaded <img>
const sources = new Set();
const controllers = new Set();
let tickTimer = null;

function jamSettings() {
  return {
    startPrompt: $("jam-start-prompt").value.trim(),
    startSeed: Number.parseInt($("jam-start-seed").value, 10),
    endPrompt: $("jam-end-prompt").value.trim(),
    endSeed: Number.parseInt($("jam-end-seed").value, 10),
    seedImageId: $("jam-seed-image").value,
    maskImageId: $("jam-mask").value || null,
    denoising: Number($("jam-denoising").value),
    steps: Number.parseInt($("jam-steps").value, 10),
  };
}

// Alpha walks 0 -> 1 in quarter steps; at 1 the end input becomes the start and the
// next transition heads for the end prompt (as edited by then) with the next seed.
function nextClipInputs() {
  if (walker.first) {
    walker.first = false;
  } else {
    walker.alpha = Math.round((walker.alpha + ALPHA_STEP) * 1e6) / 1e6;
    if (walker.alpha > 1) {
      walker.start = walker.end;
      walker.end = { prompt: jamSettings().endPrompt, seed: walker.end.seed + 1 };
      walker.alpha = ALPHA_STEP;
    }
  }
  return { alpha: walker.alpha, start: { ...walker.start }, end: { ...walker.end } };
}

function newClip() {
  const inputs = nextClipInputs();
  const clip = {
    index: jam.clips.length,
    alpha: inputs.alpha,
    start: inputs.start,
    end: inputs.end,
    status: "requested",
    attempts: 0,
    generationS: null,
    durationS: null,
    startTime: null,
    endTime: null,
    error: null,
  };
  jam.clips.push(clip);
  return clip;
}

function clipRequest(clip) {
  const settings = jamSettings();
  const input = (side) => ({ prompt: side.prompt, seed: side.seed, denoising: settings.denoising });
  return {
    alpha: clip.alpha,
    num_inference_steps: settings.steps,
    seed_image_id: settings.seedImageId,
    mask_image_id: settings.maskImageId,
    start: input(clip.start),
    end: input(clip.end),
  };
}

// Keep MAX_AHEAD clips requested or buffered beyond the one playing.
function pump() {
  if (!jam.playing) return;
  const ahead = jam.clips.filter((clip) => !["playing", "played"].includes(clip.status)).length;
  for (let i = ahead; i < MAX_AHEAD; i += 1) requestClip(newClip(), runId);
}

async function requestClip(clip, run) {
  clip.attempts += 1;
  clip.status = clip.attempts > 1 ? "retrying" : "requested";
  const controller = new AbortController();
  controllers.add(controller);
  jam.inFlight += 1;
  const sent = performance.now();
  try {
    const response = await api("run_inference/", {
      method: "POST",
      json: clipRequest(clip),
      signal: controller.signal,
    });
    const payload = await response.json();
    if (run !== runId) return;
    clip.generationS = (performance.now() - sent) / 1000;
    clip.status = "received";
    jam.clipsReceived += 1;
    const [buffer, image] = await Promise.all([decodeAudio(payload.audio), loadImage(payload.image)]);
    if (run !== runId) return;
    buffers.set(clip.index, buffer);
    images.set(clip.index, image);
    // The MP3 may carry encoder padding at the end: play the clip's own length.
    clip.durationS = Math.min(buffer.duration, payload.duration_s || buffer.duration);
    clip.status = "decoded";
    jam.clipsDecoded += 1;
    if (clip.error) {
      jam.recoveries += 1;
      showJamError(`${clip.error} Recovered: clip ${clip.index + 1} arrived on retry.`);
      clip.error = null;
    }
    scheduleReady();
  } catch (err) {
    if (err.name === "AbortError" || run !== runId) return;
    const message = err instanceof ApiError ? err.message : `Could not play the clip: ${err.message}`;
    clip.error = message;
    jam.errors.push({ clip: clip.index, status: err.status ?? null, message, at: Date.now() });
    if (err.status === 400 || err.status === 401) {
      // The request itself is wrong (or no key was given): retrying cannot help.
      showJamError(`${message} Playback stopped.`);
      stopJam("stopped after an error");
      return;
    }
    const delayS =
      err.retryAfterS ?? Math.min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (clip.attempts - 1));
    clip.status = "waiting to retry";
    showJamError(`${message} Retrying clip ${clip.index + 1} in ${delayS.toFixed(0)} s.`);
    setTimeout(() => {
      if (run === runId) requestClip(clip, run);
    }, delayS * 1000);
  } finally {
    controllers.delete(controller);
    jam.inFlight -= 1;
  }
  pump();
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
    // First clip, or generation fell behind: start the timeline again just ahead of now.
    const when = nextStartTime > now + 0.02 ? nextStartTime : now + START_DELAY_S;
    const end = when + clip.durationS;
    const source = audioContext.createBufferSource();
    source.buffer = buffers.get(clip.index);
    const gain = audioContext.createGain();
    gain.gain.setValueAtTime(0, when);
    gain.gain.linearRampToValueAtTime(1, when + CROSSFADE_S);
    gain.gain.setValueAtTime(1, end - CROSSFADE_S);
    gain.gain.linearRampToValueAtTime(0, end);
    source.connect(gain).connect(output);
    source.start(when, 0, clip.durationS);
    sources.add(source);
    source.onended = () => sources.delete(source);
    clip.startTime = when;
    clip.endTime = end;
    clip.status = "scheduled";
    nextStartTime = end - CROSSFADE_S;
    nextToSchedule += 1;
  }
}

function tick() {
  if (!audioContext) return;
  const now = audioContext.currentTime;
  jam.audioTime = now;
  jam.audioState = audioContext.state;
  for (const clip of jam.clips) {
    if (clip.status !== "scheduled" && clip.status !== "playing") continue;
    if (now >= clip.startTime && clip.status === "scheduled") {
      jam.clipsStarted += 1;
      clip.status = "playing";
      showCurrentClip(clip);
    }
    if (now >= clip.endTime) {
      clip.status = "played";
      buffers.delete(clip.index); // keep memory bounded on endless runs
    }
  }
  // Spectrograms that have scrolled off the timeline are no longer needed.
  for (const [index, _image] of images) {
    const clip = jam.clips[index];
    if (index !== jam.currentClip && clip.endTime !== null && now - clip.endTime > HISTORY_S) {
      images.delete(index);
    }
  }
  jam.bufferedAheadS = Math.max(0, nextStartTime - now);
  const behind = jam.playing && jam.clipsStarted > 0 && now >= nextStartTime;
  if (behind && !jam.behind) jam.underruns += 1;
  jam.behind = behind;
  if (jam.playing) pump();
  renderJam();
}

function showCurrentClip(clip) {
  jam.currentClip = clip.index;
  const img = $("jam-spectrogram");
  img.src = images.get(clip.index).src;
  img.hidden = false;
  jam.spectrogramShown = true;
  const describe = (side) => `${side.prompt} (seed ${side.seed})`;
  const generated = clip.generationS === null ? "" : ` · generated in ${clip.generationS.toFixed(1)} s`;
  $("jam-caption").textContent =
    `Clip ${clip.index + 1} · alpha ${clip.alpha.toFixed(2)} · ` +
    `${describe(clip.start)} → ${describe(clip.end)}${generated}`;
}

function renderJam() {
  const waitingFor = jam.clips.find((clip) => !["scheduled", "playing", "played"].includes(clip.status));
  let status;
  if (!jam.playing) status = jam.status;
  else if (jam.clipsStarted === 0) status = "Generating the first clips…";
  else status = `Playing clip ${jam.currentClip + 1}.`;
  $("jam-status").textContent = status;
  const behindLine = $("jam-behind");
  if (jam.behind) {
    const waited = waitingFor ? ` (clip ${waitingFor.index + 1}: ${waitingFor.status})` : "";
    behindLine.textContent = `Generation is behind playback: waiting for the next clip${waited}.`;
  }
  behindLine.hidden = !jam.behind;
  $("jam-buffered").textContent = `${jam.bufferedAheadS.toFixed(1)} s`;
  $("jam-count").textContent = `${jam.clipsStarted} played, ${jam.clipsReceived} received`;
  const current = jam.clips[jam.currentClip];
  $("jam-alpha").textContent = current ? current.alpha.toFixed(2) : "–";
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

export async function startJam() {
  if (!$("jam-form").reportValidity()) return;
  if (!audioContext) {
    audioContext = new AudioContext();
    output = audioContext.createGain();
    output.connect(audioContext.destination);
  }
  await audioContext.resume();
  runId += 1;
  buffers.clear();
  images.clear();
  Object.assign(jam, {
    playing: true,
    status: "playing",
    clips: [],
    clipsReceived: 0,
    clipsDecoded: 0,
    clipsStarted: 0,
    bufferedAheadS: 0,
    behind: false,
    underruns: 0,
    currentClip: null,
    spectrogramShown: false,
    errors: [],
    recoveries: 0,
  });
  const settings = jamSettings();
  walker = {
    first: true,
    alpha: 0,
    start: { prompt: settings.startPrompt, seed: settings.startSeed },
    end: { prompt: settings.endPrompt, seed: settings.endSeed },
  };
  nextStartTime = 0;
  nextToSchedule = 0;
  $("jam-error").hidden = true;
  $("jam-play").textContent = "Stop";
  tickTimer = setInterval(tick, TICK_MS);
  pump();
  requestAnimationFrame(drawTimeline);
}

export function stopJam(status = "Stopped.") {
  runId += 1;
  jam.playing = false;
  jam.behind = false;
  jam.status = status;
  for (const controller of controllers) controller.abort();
  for (const source of sources) source.stop();
  sources.clear();
  clearInterval(tickTimer);
  $("jam-play").textContent = "Play";
  renderJam();
}
