"""The playground page (/ui) in headless Chromium against a real `bentoml serve` (tiny model).

The shared keyed instance (tests/shared_servers.py) has an API key, so the page must ask
for it (the jam's session sends it in its start message); the seed images are
cropped to 64 px (0.64 s clips, unless a screenshot is asked for) and requests use
one denoising step to keep CPU generation short. Chromium is Debian's package
(`make browser` installs it), driven by playwright; nothing is downloaded at run time.

    RIFFUSION_UI_SCREENSHOT=docs/playground.png \\
        uv run --frozen --all-extras pytest tests/test_ui.py -k jam

also saves a screenshot of the jam in full swing (the one in docs/).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from load_tests.server import LocalServer
from tests.shared_servers import SHARED_API_KEY as API_KEY
from tests.shared_servers import SMALL_CLIP_PX

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("RIFFUSION_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT_ENV = "RIFFUSION_UI_SCREENSHOT"
# 0.64 s clips keep Griffin-Lim on CPU short; the docs screenshot shows full 5.12 s clips.
CLIP_PX = SMALL_CLIP_PX
STEPS = "1"
# CPU generation on a busy two-core machine takes tens of seconds per batch.
CLIP_TIMEOUT_MS = 240_000 if CLIP_PX == 64 else 900_000

JAM_STATE = """() => {
  const jam = window.playground.jam;
  return {
    audioState: jam.audioState, audioTime: jam.audioTime, started: jam.clipsStarted,
    behind: jam.behind, underruns: jam.underruns, looping: jam.looping,
    errors: jam.errors, spectrogramShown: jam.spectrogramShown,
    clips: jam.clips.map((c) => ({index: c.index, alpha: c.alpha, status: c.status,
                                 durationS: c.durationS, start: c.start, end: c.end})),
  };
}"""


@pytest.fixture(scope="module")
def server(keyed_server: LocalServer) -> str:
    return keyed_server.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            # Jam playback starts from a click in real use; the test's click counts too,
            # but headless Chromium is stricter about audio without this.
            args=["--autoplay-policy=no-user-gesture-required"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    """The playground, opened without a key: it asks for one, and gets it."""
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{server}/ui")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    page.wait_for_function("window.playground.seedImages.length > 0")
    yield page
    context.close()


def test_page_and_assets_are_public_and_self_contained(server: str) -> None:
    redirect = httpx.get(f"{server}/ui")
    assert redirect.status_code == 307
    assert redirect.headers["location"] == "ui/"
    html = httpx.get(f"{server}/ui/")
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert {"playground.js", "playground.css"} <= set(assets)
    for asset in assets:
        # No CDN: every asset is a relative URL the service itself answers.
        assert "//" not in asset, asset
        if asset.startswith("../"):
            continue  # the service root (API docs)
        assert httpx.get(f"{server}/ui/{asset}").status_code == 200, asset
    script = httpx.get(f"{server}/ui/playground.js").text
    assert "http://" not in script and "https://" not in script
    # The API itself still needs the key.
    assert httpx.get(f"{server}/model_info").status_code == 401
    # The OpenAPI page links the playground.
    docs = httpx.get(f"{server}/docs.json", headers={"Authorization": f"Bearer {API_KEY}"})
    assert "[/ui](/ui)" in docs.text


def test_no_file_the_page_loads_is_missing(browser: Any, server: str) -> None:
    """Every request of a page load is answered (the favicon was a 404 on every load)."""
    context = browser.new_context()
    page = context.new_page()
    failures: list[str] = []
    page.on("response", lambda r: r.status >= 400 and failures.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: failures.append(f"failed {r.url}"))
    try:
        page.goto(f"{server}/ui")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", API_KEY)
        page.click("#key-save")
        page.wait_for_function("window.playground.seedImages.length > 0")
        # The icon the page names is requested once it has loaded.
        page.wait_for_load_state("networkidle")
        icons = page.evaluate("[...document.querySelectorAll('link[rel=icon]')].map((l) => l.href)")
    finally:
        context.close()
    # Only the first calls, made before the key was typed, were refused (401).
    assert [f for f in failures if not f.startswith("401 ")] == [], failures
    assert icons and all(httpx.get(icon).status_code == 200 for icon in icons), icons


def test_the_model_badge_recovers_from_a_wrong_key(browser: Any, server: str) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(f"{server}/ui")
        for attempt in (1, 2, 3):  # a wrong key, and the page asks again: three tries
            page.wait_for_function(
                f"window.playground.auth.dialogOpen && window.playground.auth.prompts === {attempt}"
            )
            page.fill("#key-input", "not-the-key")
            page.click("#key-save")
        badge = page.locator("#model-info")
        page.wait_for_function("window.playground.loadError !== null")
        assert badge.inner_text() == "model: unknown (no valid API key)"
        page.click("#api-key-button")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", API_KEY)
        page.click("#key-save")
        page.wait_for_function("window.playground.seedImages.length > 0")
        assert badge.inner_text() == "model: tiny test model (noise, not music)"
        assert page.locator("#jam-error").is_hidden()
    finally:
        context.close()


def test_result_players_show_only_with_a_result(page: Any) -> None:
    """No empty, disabled player or dead Download link before a result or after an error."""
    for panel in ("text", "audio"):
        page.click(f"#tabs [data-panel={panel}]")
        assert page.locator(f"#{panel}").is_visible()
        assert page.locator(f"#{panel}-result").is_hidden(), panel
        assert page.locator(f"#{panel}-result audio").is_hidden(), panel
        assert page.locator(f"#{panel}-result a.download").is_hidden(), panel
    page.set_input_files(
        "#audio-file", {"name": "notes.wav", "mimeType": "audio/wav", "buffer": b"not audio"}
    )
    page.fill("#audio-steps", STEPS)
    page.click("#audio-run")
    page.wait_for_function("window.playground.audio.status === 'error'", timeout=60_000)
    assert page.locator("#audio-error").is_visible()
    assert page.locator("#audio-result").is_hidden()


def test_the_bento_carries_the_playground() -> None:
    # bentoml build selects files with gitignore-style patterns (pathspec), as here.
    import pathspec
    import yaml

    from serving.ui import ASSETS_DIR

    include = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    spec = pathspec.PathSpec.from_lines("gitwildmatch", include)
    assets = sorted(path.relative_to(ROOT).as_posix() for path in ASSETS_DIR.iterdir())
    assert "serving/playground/index.html" in assets
    assert spec.match_file("serving/ui.py")
    for asset in assets:
        assert spec.match_file(asset), asset


class SessionProxy:
    """The page's /session WebSocket, passed through to the server; clips can be held back.

    Records what the page sends (start, steer, played). ``hold_after`` clips, further
    clips wait here until ``release()``: the page's buffer runs dry, as when the server
    is late, whatever the machine's speed.
    """

    def __init__(self, hold_after: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.clips = 0
        self.hold_after = hold_after
        self.held: list[str | bytes] = []
        self.page_side: Any = None

    def route(self, ws: Any) -> None:
        self.page_side = ws
        server = ws.connect_to_server()
        ws.on_message(lambda message: self._from_page(server, message))
        server.on_message(self._from_server)

    def _from_page(self, server: Any, message: str | bytes) -> None:
        self.sent.append(json.loads(message))
        server.send(message)

    def _from_server(self, message: str | bytes) -> None:
        if json.loads(message).get("type") == "clip":
            self.clips += 1
            if self.hold_after is not None and self.clips > self.hold_after:
                self.held.append(message)
                return
        self.page_side.send(message)

    def release(self) -> None:
        self.hold_after = None
        for message in self.held:
            self.page_side.send(message)
        self.held.clear()


def test_jam_streams_a_session_and_a_prompt_typed_mid_play_is_heard(page: Any) -> None:
    proxy = SessionProxy()
    page.route_web_socket(re.compile(r".*/session$"), proxy.route)
    page.fill("#jam-steps", STEPS)
    page.click("#jam-play")
    page.wait_for_function(
        "window.playground.jam.clipsStarted >= 2", timeout=CLIP_TIMEOUT_MS, polling=200
    )
    state = page.evaluate(JAM_STATE)
    assert state["audioState"] == "running"
    started = [clip for clip in state["clips"] if clip["status"] in ("playing", "played")]
    assert all(clip["durationS"] > 0.5 for clip in started)  # decoded clips
    # The session walks alpha a quarter per clip from the start prompt, seed after seed.
    assert [clip["alpha"] for clip in state["clips"][:2]] == [0.0, 0.25]
    assert state["clips"][0]["start"] == {"prompt": "church bells on sunday", "seed": 42}
    assert state["clips"][0]["end"] == {"prompt": "church bells on sunday", "seed": 43}
    start = proxy.sent[0]
    assert start["type"] == "start" and start["api_key"] == API_KEY
    assert start["num_inference_steps"] == int(STEPS) and start["seed_image_id"] == "og_beat"
    page.wait_for_function(f"window.playground.jam.audioTime > {state['audioTime'] + 0.3}")
    # The page tells the server how far it has played.
    page.wait_for_function("window.playground.jam.playedS > 0.5", timeout=CLIP_TIMEOUT_MS)
    assert any(m["type"] == "played" and m["position_s"] > 0 for m in proxy.sent)

    # The clip now playing shows its spectrogram, and the timeline has drawn it.
    spectrogram = page.locator("#jam-spectrogram")
    assert spectrogram.is_visible()
    assert spectrogram.evaluate("img => img.complete && img.naturalHeight") == 512
    lit = page.evaluate(
        """() => {
          const canvas = document.getElementById('jam-timeline');
          const g = canvas.getContext('2d');
          const pixels = g.getImageData(0, 0, canvas.width, canvas.height).data;
          let lit = 0;
          for (let i = 0; i < pixels.length; i += 4) {
            if (pixels[i] + pixels[i + 1] + pixels[i + 2] > 60) lit++;
          }
          return lit;
        }"""
    )
    assert lit > 64 * 64

    # What to hear next, typed while it plays: a later clip heads for it, and is heard.
    page.fill("#jam-next-prompt", "jazz with piano")
    page.click("#jam-steer")
    page.wait_for_function(
        """() => window.playground.jam.clips.some((c) =>
             c.end.prompt === 'jazz with piano' && ['playing', 'played'].includes(c.status))""",
        timeout=CLIP_TIMEOUT_MS,
        polling=200,
    )
    assert {"type": "steer", "prompt": "jazz with piano"} in proxy.sent
    screenshot = os.environ.get(SCREENSHOT_ENV)
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    page.click("#jam-play")  # stop
    assert page.evaluate("window.playground.jam.playing") is False
    assert page.locator("#jam-steer").is_disabled()


def test_jam_loops_the_last_clip_while_the_next_is_late(page: Any) -> None:
    proxy = SessionProxy(hold_after=2)
    page.route_web_socket(re.compile(r".*/session$"), proxy.route)
    page.fill("#jam-steps", STEPS)
    page.click("#jam-play")
    # Two clips play, then the third is late: the second one loops, shown as such.
    page.wait_for_function("window.playground.jam.looping", timeout=CLIP_TIMEOUT_MS, polling=100)
    behind = page.locator("#jam-behind")
    assert behind.is_visible()
    assert "looping clip 2" in behind.inner_text()
    state = page.evaluate(JAM_STATE)
    assert state["underruns"] == 1 and state["started"] == 2
    # The late clip arrives: the loop ends and playback goes on with it.
    proxy.release()
    page.wait_for_function(
        "window.playground.jam.clipsStarted >= 3 && !window.playground.jam.looping",
        timeout=CLIP_TIMEOUT_MS,
        polling=100,
    )
    assert behind.is_hidden()
    page.click("#jam-play")  # stop


def test_jam_says_when_the_service_is_full(page: Any) -> None:
    def full(ws: Any) -> None:  # the server's answer when admission refuses a listener
        ws.on_message(
            lambda _message: (
                ws.send(
                    json.dumps(
                        {
                            "type": "refused",
                            "message": "the service is full: another listener would need 95 %",
                            "retry_after_s": 30,
                        }
                    )
                ),
                ws.close(code=1013, reason="the service is full"),
            )
        )

    page.route_web_socket(re.compile(r".*/session$"), full)
    page.click("#jam-play")
    page.wait_for_function("window.playground.jam.refusals.length === 1")
    error = page.locator("#jam-error")
    assert error.is_visible()
    assert "service is full" in error.inner_text() and "retry in 30 s" in error.inner_text()
    assert page.evaluate("window.playground.jam.playing") is False


def test_text_to_audio_panel_shows_progress_and_offers_the_file(page: Any) -> None:
    page.click("#tabs [data-panel=text]")
    page.fill("#text-steps", STEPS)
    page.fill("#text-duration", "0.64")
    page.select_option("#text-format", "wav")
    page.click("#text-run")
    assert page.locator("#text-progress").is_visible()
    page.wait_for_function(
        "window.playground.text.status !== 'working'", timeout=CLIP_TIMEOUT_MS, polling=200
    )
    assert page.evaluate("window.playground.text.status") == "done"
    assert page.locator("#text-progress").is_hidden()
    link = page.locator("#text-result a.download")
    assert link.get_attribute("download") == "text_to_audio.wav"
    with page.expect_download() as download_info:
        link.click()
    audio, sample_rate = sf.read(download_info.value.path())
    assert len(audio) / sample_rate == pytest.approx(0.64, abs=0.05)


def test_audio_to_audio_panel_reports_errors_in_words_then_riffs(page: Any) -> None:
    page.click("#tabs [data-panel=audio]")
    page.fill("#audio-steps", STEPS)
    page.select_option("#audio-format", "wav")
    # Not audio: the service's 400 names the field, and the page says it in words.
    page.set_input_files(
        "#audio-file", {"name": "notes.wav", "mimeType": "audio/wav", "buffer": b"not audio"}
    )
    page.click("#audio-run")
    page.wait_for_function("window.playground.audio.status === 'error'", timeout=60_000)
    message = page.locator("#audio-error").inner_text()
    assert message.startswith("The service rejected the request (400): audio:"), message

    rate = 22050
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    wav = io.BytesIO()
    sf.write(wav, tone, rate, format="WAV")
    page.set_input_files(
        "#audio-file", {"name": "tone.wav", "mimeType": "audio/wav", "buffer": wav.getvalue()}
    )
    page.click("#audio-run")
    page.wait_for_function(
        "window.playground.audio.status !== 'working'", timeout=CLIP_TIMEOUT_MS, polling=200
    )
    assert page.evaluate("window.playground.audio.status") == "done"
    assert page.evaluate("window.playground.audio.uploadFraction") == 1
    assert page.locator("#audio-error").is_hidden()
    assert page.locator("#audio-result a.download").get_attribute("download") == (
        "audio_to_audio.wav"
    )


def readme_python_client() -> str:
    """The README's Python client snippet (the code block after its marker)."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- python-client -->\s*```python\n(.*?)```", readme, re.DOTALL)
    assert match, "README lost its Python client snippet"
    return match.group(1)


def test_readme_python_client_works_against_a_served_instance(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    snippet = readme_python_client()
    # Same calls, on this instance, with the CPU-friendly sizes of the tiny model.
    for old, new in [
        ("http://localhost:3000", server),
        ("num_inference_steps=50", f"num_inference_steps={STEPS}"),
        ("duration_s=5.12", "duration_s=0.64"),
    ]:
        assert old in snippet, old
        snippet = snippet.replace(old, new)
    monkeypatch.setenv("RIFFUSION_API_KEY", API_KEY)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md python-client", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    duration, image_type, audio_type = printed[0].split()
    assert float(duration) == pytest.approx(CLIP_PX / 100, abs=0.02)
    assert (image_type, audio_type) == ("data:image/jpeg;base64", "data:audio/mpeg;base64")
    assert "og_beat" in printed[1]
    assert sf.info(str(tmp_path / "beat.wav")).duration == pytest.approx(0.64, abs=0.05)
    assert sf.info(str(tmp_path / "riff.mp3")).duration == pytest.approx(0.64, abs=0.1)
