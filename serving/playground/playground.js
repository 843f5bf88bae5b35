// Riffusion playground: plain browser JavaScript, no build step, no third-party code.
//
// Every call goes to the service's public endpoints (the page lives at <service>/ui/):
//   jam            POST run_inference/ (one clip per request, alpha walking 0 -> 1 and on)
//   text to audio  POST text_to_audio
//   audio to audio POST audio_to_audio (multipart)
// The page's state is window.playground, read by the browser tests.
"use strict";

(() => {
  const SERVICE_ROOT = new URL("../", document.baseURI);
  const KEY_STORAGE = "riffusion.apiKey";
  const ALPHA_STEP = 0.25; // four clips per transition, like the riffusion web app
  const MAX_AHEAD = 3; // clips requested or waiting ahead of the one playing (web app: 3)
  const CROSSFADE_S = 0.01; // consecutive clips overlap this much: no gap, no click
  const START_DELAY_S = 0.1; // scheduling margin when (re)starting the timeline
  const RETRY_BASE_S = 1;
  const RETRY_MAX_S = 10;
  const TIMELINE_PX_PER_S = 50; // 5.12 s clip -> 256 px: square like its 512x512 image
  const TICK_MS = 100;
  const HISTORY_S = 60; // longer than the timeline shows left of the playhead

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ state
  const state = {
    auth: { keySet: Boolean(sessionStorage.getItem(KEY_STORAGE)), prompts: 0, dialogOpen: false },
    modelInfo: null,
    seedImages: [],
    loadError: null,
    jam: {
      playing: false,
      status: "stopped",
      clips: [], // {index, alpha, start, end, status, attempts, durationS, startTime, ...}
      clipsReceived: 0,
      clipsDecoded: 0,
      clipsStarted: 0,
      inFlight: 0,
      bufferedAheadS: 0,
      behind: false, // playback ran out of generated audio and is waiting
      underruns: 0,
      currentClip: null,
      spectrogramShown: false,
      errors: [], // {clip, status, message, at}
      recoveries: 0,
      audioTime: 0,
      audioState: "none",
    },
    text: { status: "idle", error: null, elapsedS: 0, filename: null, bytes: 0 },
    audio: { status: "idle", error: null, elapsedS: 0, uploadFraction: 0, filename: null, bytes: 0 },
  };
  window.playground = state;

  // -------------------------------------------------------------- API calls
  class ApiError extends Error {
    constructor(status, message, retryAfterS = null) {
      super(message);
      this.name = "ApiError";
      this.status = status;
      this.retryAfterS = retryAfterS;
    }
  }

  function describeError(status, statusText, body) {
    let detail = "";
    if (body && typeof body.error === "string") detail = body.error;
    else if (body && body.detail) detail = JSON.stringify(body.detail);
    const suffix = detail ? `: ${detail}` : ".";
    switch (status) {
      case 400:
      case 422:
        return `The service rejected the request (${status})${suffix}`;
      case 401:
        return "The service needs a valid API key (401 Unauthorized).";
      case 413:
        return `The upload is too large (413)${suffix}`;
      case 429:
        return "The service is busy (429 Too Many Requests): too many requests are in flight.";
      case 503:
        return `The model service is at capacity or restarting (503)${suffix}`;
      case 504:
        return "The request took too long and the service gave up (504 Gateway Timeout).";
      default:
        return `The service answered ${status} ${statusText}${suffix}`;
    }
  }

  async function errorFrom(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: the status line says enough
    }
    const retryAfter = Number.parseFloat(response.headers.get("Retry-After"));
    return new ApiError(
      response.status,
      describeError(response.status, response.statusText, body),
      Number.isFinite(retryAfter) ? retryAfter : null,
    );
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  // One dialog for however many requests got a 401 at the same time.
  let keyPrompt = null;
  function askForKey(reason) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      const dialog = $("key-dialog");
      const reasonLine = $("key-dialog-reason");
      reasonLine.textContent = reason || "";
      reasonLine.hidden = !reason;
      $("key-input").value = "";
      state.auth.prompts += 1;
      state.auth.dialogOpen = true;
      dialog.addEventListener(
        "close",
        () => {
          state.auth.dialogOpen = false;
          keyPrompt = null;
          const key = $("key-input").value.trim();
          if (dialog.returnValue === "save" && key) {
            sessionStorage.setItem(KEY_STORAGE, key);
            state.auth.keySet = true;
            resolve(true);
          } else {
            resolve(false);
          }
        },
        { once: true },
      );
      dialog.returnValue = "";
      dialog.showModal();
    });
    return keyPrompt;
  }

  // fetch, or XMLHttpRequest when upload progress is wanted; a Response either way.
  function send(path, { method = "GET", json, form, signal, onUploadProgress } = {}) {
    const url = new URL(path, SERVICE_ROOT);
    const headers = { ...authHeaders() };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    if (!onUploadProgress) return fetch(url, { method, headers, body, signal });
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open(method, url);
      xhr.responseType = "blob";
      for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
      xhr.upload.onprogress = (event) => {
        if (event.lengthComputable) onUploadProgress(event.loaded / event.total);
      };
      xhr.upload.onload = () => onUploadProgress(1);
      xhr.onload = () => {
        const responseHeaders = new Headers();
        for (const line of xhr.getAllResponseHeaders().trim().split(/[\r\n]+/)) {
          const at = line.indexOf(":");
          if (at > 0) responseHeaders.append(line.slice(0, at).trim(), line.slice(at + 1).trim());
        }
        resolve(
          new Response(xhr.response, {
            status: xhr.status,
            statusText: xhr.statusText,
            headers: responseHeaders,
          }),
        );
      };
      xhr.onerror = () => reject(new TypeError("network error"));
      xhr.onabort = () => reject(new DOMException("aborted", "AbortError"));
      if (signal) signal.addEventListener("abort", () => xhr.abort(), { once: true });
      xhr.send(body);
    });
  }

  // A successful Response, or ApiError in words. A 401 asks for the key and retries.
  async function api(path, options = {}) {
    for (let attempt = 0; ; attempt += 1) {
      let response;
      try {
        response = await send(path, options);
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new ApiError(0, "Could not reach the service (network error): is it running?");
      }
      if (response.ok) return response;
      if (response.status === 401 && attempt < 3) {
        const reason = state.auth.keySet ? "The service refused that key (401)." : "";
        if (await askForKey(reason)) continue;
      }
      throw await errorFrom(response);
    }
  }

  // ----------------------------------------------------------- page set-up
  function setUpTabs() {
    const tabs = document.querySelectorAll("#tabs [role=tab]");
    for (const tab of tabs) {
      tab.addEventListener("click", () => {
        for (const other of tabs) {
          const selected = other === tab;
          other.setAttribute("aria-selected", String(selected));
          $(other.dataset.panel).hidden = !selected;
        }
      });
    }
  }

  function bindRangeOutput(inputId, outputId) {
    const update = () => {
      $(outputId).textContent = Number($(inputId).value).toFixed(2);
    };
    $(inputId).addEventListener("input", update);
    update();
  }

  async function loadServiceInfo() {
    try {
      const info = await (await api("model_info")).json();
      state.modelInfo = info;
      const badge = $("model-info");
      badge.textContent = info.is_tiny
        ? "model: tiny test model (noise, not music)"
        : `model: ${info.model_id} on ${info.device}`;
      badge.classList.toggle("tiny", Boolean(info.is_tiny));
      badge.title = info.note || "";

      const listing = await (await api("seed_images")).json();
      state.seedImages = listing.seed_images;
      fillSelect($("jam-seed-image"), listing.seed_images, "seed", "og_beat");
      fillSelect($("jam-mask"), listing.seed_images, "mask", "");
    } catch (err) {
      state.loadError = err.message;
      $("jam-error").textContent = `Could not load the service's seed images: ${err.message}`;
      $("jam-error").hidden = false;
    }
  }

  function fillSelect(select, images, kind, keep) {
    const first = kind === "mask" ? [new Option("none", "")] : [];
    const options = images
      .filter((image) => image.kind === kind)
      .map((image) => {
        const option = new Option(image.id, image.id);
        option.title = image.description;
        return option;
      });
    select.replaceChildren(...first, ...options);
    if ([...select.options].some((option) => option.value === keep)) select.value = keep;
  }

  // -------------------------------------------------------------------- jam
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

  function drawTimeline() {
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

  async function startJam() {
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

  function stopJam(status = "Stopped.") {
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

  // ---------------------------------------------------- one-shot generation
  function filenameOf(response, fallback) {
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = /filename="?([^";]+)"?/.exec(disposition);
    return match ? match[1] : fallback;
  }

  // Runs one request for a panel ("text" or "audio"): progress, result player, errors.
  async function runPanel(panel, makeRequest) {
    const panelState = state[panel];
    const button = $(`${panel}-run`);
    const progress = $(`${panel}-progress`);
    const bar = progress.querySelector("progress");
    const elapsed = progress.querySelector(".elapsed");
    const result = $(`${panel}-result`);
    const started = performance.now();
    let phase = "Generating…";
    Object.assign(panelState, { status: "working", error: null, elapsedS: 0 });
    $(`${panel}-error`).hidden = true;
    button.disabled = true;
    progress.hidden = false;
    bar.removeAttribute("value");
    const timer = setInterval(() => {
      panelState.elapsedS = (performance.now() - started) / 1000;
      elapsed.textContent = `${phase} ${panelState.elapsedS.toFixed(1)} s`;
    }, 100);
    const setPhase = (text, fraction) => {
      phase = text;
      if (fraction === null) bar.removeAttribute("value");
      else bar.value = fraction;
    };
    try {
      const { response, fallbackName } = await makeRequest(setPhase);
      const blob = await response.blob();
      const url = URL.createObjectURL(blob);
      const player = result.querySelector("audio");
      const link = result.querySelector("a.download");
      if (player.src) URL.revokeObjectURL(player.src);
      player.src = url;
      link.href = url;
      link.download = filenameOf(response, fallbackName);
      link.textContent = `Download ${link.download}`;
      result.hidden = false;
      Object.assign(panelState, { status: "done", filename: link.download, bytes: blob.size });
    } catch (err) {
      const message = err instanceof ApiError ? err.message : `Something went wrong: ${err.message}`;
      Object.assign(panelState, { status: "error", error: message });
      $(`${panel}-error`).textContent = message;
      $(`${panel}-error`).hidden = false;
    } finally {
      clearInterval(timer);
      panelState.elapsedS = (performance.now() - started) / 1000;
      progress.hidden = true;
      button.disabled = false;
    }
  }

  function textToAudio(event) {
    event.preventDefault();
    const format = $("text-format").value;
    const body = {
      prompt: $("text-prompt").value,
      seed: Number.parseInt($("text-seed").value, 10),
      num_inference_steps: Number.parseInt($("text-steps").value, 10),
      duration_s: Number($("text-duration").value),
      format,
    };
    const negative = $("text-negative").value.trim();
    if (negative) body.negative_prompt = negative;
    return runPanel("text", async () => ({
      response: await api("text_to_audio", { method: "POST", json: body }),
      fallbackName: `text_to_audio.${format}`,
    }));
  }

  function audioToAudio(event) {
    event.preventDefault();
    const format = $("audio-format").value;
    const form = new FormData();
    form.append("audio", $("audio-file").files[0]);
    form.append("prompt", $("audio-prompt").value);
    const endPrompt = $("audio-end-prompt").value.trim();
    if (endPrompt) form.append("end_prompt", endPrompt);
    form.append("denoising", $("audio-denoising").value);
    form.append("seed", $("audio-seed").value);
    form.append("num_inference_steps", $("audio-steps").value);
    form.append("format", format);
    return runPanel("audio", async (setPhase) => {
      setPhase("Uploading…", 0);
      const response = await api("audio_to_audio", {
        method: "POST",
        form,
        onUploadProgress: (fraction) => {
          state.audio.uploadFraction = fraction;
          if (fraction < 1) setPhase(`Uploading ${(fraction * 100).toFixed(0)}%…`, fraction);
          else setPhase("Uploaded; generating…", null);
        },
      });
      return { response, fallbackName: `audio_to_audio.${format}` };
    });
  }

  // -------------------------------------------------------------- wiring
  setUpTabs();
  bindRangeOutput("jam-denoising", "jam-denoising-value");
  bindRangeOutput("audio-denoising", "audio-denoising-value");
  $("jam-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (jam.playing) stopJam();
    else startJam();
  });
  $("text-form").addEventListener("submit", textToAudio);
  $("audio-form").addEventListener("submit", audioToAudio);
  $("api-key-button").addEventListener("click", () => askForKey(""));
  drawTimeline();
  loadServiceInfo();
})();
