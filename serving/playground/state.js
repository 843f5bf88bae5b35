// The page's state, shared by its modules; window.playground is read by the browser tests.

export const KEY_STORAGE = "riffusion.apiKey";

export const $ = (id) => document.getElementById(id);

export const state = {
  auth: { keySet: Boolean(sessionStorage.getItem(KEY_STORAGE)), prompts: 0, dialogOpen: false },
  modelInfo: null,
  seedImages: [],
  loadError: null,
  jam: {
    playing: false,
    status: "stopped",
    sessionId: null,
    clips: [], // {index, alpha, start, end, status, durationS, startTime, underrunS, ...}
    clipsReceived: 0,
    clipsDecoded: 0,
    clipsStarted: 0,
    bufferedAheadS: 0,
    behind: false, // playback ran out of generated audio and is waiting
    underruns: 0,
    looping: false, // the last clip loops while the next one is late
    loops: 0,
    playedS: 0,
    steers: [], // {prompt, at}
    refusals: [], // the server's refused messages
    reconnects: 0,
    currentClip: null,
    spectrogramShown: false,
    errors: [], // the server's error messages, {status, field, message, at}
    audioTime: 0,
    audioState: "none",
  },
  text: { status: "idle", error: null, elapsedS: 0, filename: null, bytes: 0 },
  audio: { status: "idle", error: null, elapsedS: 0, uploadFraction: 0, filename: null, bytes: 0 },
};
window.playground = state;
