// Calls to the service's public endpoints: errors in words, the API key asked for on a 401.

import { $, KEY_STORAGE, state } from "./state.js";

const SERVICE_ROOT = new URL("../", document.baseURI);

export class ApiError extends Error {
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

// Called whenever the user saves a key (a page part that failed for want of one retries).
const keySavedListeners = [];
export function onKeySaved(listener) {
  keySavedListeners.push(listener);
}

// One dialog for however many requests got a 401 at the same time.
let keyPrompt = null;
export function askForKey(reason) {
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
          for (const listener of keySavedListeners) listener();
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
export async function api(path, options = {}) {
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
