// The one-shot panels: text to audio (JSON) and audio to audio (multipart upload).

import { ApiError, api } from "./api.js";
import { $, state } from "./state.js";

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

export function textToAudio(event) {
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

export function audioToAudio(event) {
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
