// Riffusion playground: plain browser JavaScript modules, no build step, no third-party code.
//
// Every call goes to the service's public endpoints (the page lives at <service>/ui/):
//   jam            WebSocket session/ (a listener session: clips streamed against playback,
//                  steered by "what to hear next"; docs/sessions.md): jam.js
//   text to audio  POST text_to_audio: panels.js
//   audio to audio POST audio_to_audio (multipart): panels.js
// api.js makes the calls (and asks for the API key); state.js holds the page's state,
// window.playground, read by the browser tests. This module sets the page up.

import { api, askForKey, onKeySaved } from "./api.js";
import { drawTimeline, startJam, steerJam, stopJam } from "./jam.js";
import { audioToAudio, textToAudio } from "./panels.js";
import { $, state } from "./state.js";

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
  const badge = $("model-info");
  state.loadError = null;
  try {
    const info = await (await api("model_info")).json();
    state.modelInfo = info;
    badge.textContent = info.is_tiny
      ? "model: tiny test model (noise, not music)"
      : `model: ${info.model_id} on ${info.device}`;
    badge.classList.toggle("tiny", Boolean(info.is_tiny));
    badge.classList.remove("failed");
    badge.title = info.note || "";

    const listing = await (await api("seed_images")).json();
    state.seedImages = listing.seed_images;
    fillSelect($("jam-seed-image"), listing.seed_images, "seed", "og_beat");
    fillSelect($("jam-mask"), listing.seed_images, "mask", "");
    $("jam-error").hidden = true;
  } catch (err) {
    state.loadError = err.message;
    if (!state.modelInfo) {
      // Never "model: …" forever: say why, and load again once a key is saved.
      badge.textContent = err.status === 401 ? "model: unknown (no valid API key)" : "model: unknown";
      badge.classList.add("failed");
      badge.title = err.message;
    }
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

setUpTabs();
bindRangeOutput("jam-denoising", "jam-denoising-value");
bindRangeOutput("audio-denoising", "audio-denoising-value");
$("jam-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.jam.playing) stopJam();
  else startJam();
});
$("jam-next").addEventListener("submit", (event) => {
  event.preventDefault();
  steerJam();
});
$("text-form").addEventListener("submit", textToAudio);
$("audio-form").addEventListener("submit", audioToAudio);
$("api-key-button").addEventListener("click", () => askForKey(""));
onKeySaved(() => {
  if (state.loadError) loadServiceInfo();
});
drawTimeline();
loadServiceInfo();
