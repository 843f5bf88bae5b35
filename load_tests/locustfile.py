"""Locust traffic model for the Riffusion service.

User classes (pick by name on the locust command line, default: both):

- ``WebAppListener``: behaves like the riffusion web app. It keeps up to three
  ``/run_inference/`` requests ahead of playback, plays each clip for its
  ``duration_s``, walks alpha 0 -> 1 in 0.25 steps and then moves on to a new
  prompt/seed. Every hand-over from one clip to the next is reported as a
  ``PLAYBACK fell_behind`` request: a failure when the next clip was not ready
  (the listener heard silence); its response time is how long the listener waited.
- ``ApiClient``: a mix of text-to-audio, short audio-to-audio uploads and
  interpolation.
- ``SessionListener``: a listener on a ``/session`` WebSocket: the server streams
  clips against its playback. Reported as ``SESSION open`` (a failure when refused:
  the service was full) and one ``SESSION underrun`` per clip, a failure when it
  arrived after the audio ran out; its response time is how long the silence lasted.
  Sessions play in real time: ``--playback-speed`` does not apply.

Load shapes: set ``LOADTEST_SHAPE=ramp|spike|soak`` to make one shape class
active; it scales with ``--users`` and ``--run-time``. Without it, locust's plain
``-u/-r/-t`` apply.

Extra options: ``--playback-speed`` (play clips faster for short runs),
``--num-inference-steps``, ``--seed-image-id``, ``--duration-tolerance``,
``--request-timeout``, ``--auth-token`` (sent as a bearer token).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gevent
import websocket
from gevent.greenlet import Greenlet
from gevent.pool import Group
from locust import HttpUser, LoadTestShape, User, between, constant, events, task
from locust.clients import ResponseContextManager
from requests import Response

# Importable both as `load_tests.locustfile` and as a file handed to `locust -f`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_tests.client import DEFAULT_SEED_IMAGE_ID, WEB_APP_STEPS
from load_tests.session_client import SessionListener as SessionListener_
from load_tests.traffic import (
    DEFAULT_DURATION_TOLERANCE_S,
    PROMPTS,
    SHAPES,
    AlphaWalk,
    CheckedClip,
    check_audio_file,
    check_clip_payload,
    check_interpolation_payload,
    shape_users,
    synth_wav,
)

SHAPE_ENV = "LOADTEST_SHAPE"
SELECTED_SHAPE = os.environ.get(SHAPE_ENV, "").strip().lower()
if SELECTED_SHAPE not in ("", *SHAPES):
    raise ValueError(f"{SHAPE_ENV}={SELECTED_SHAPE!r}: choose one of {', '.join(SHAPES)}")

MAX_CLIPS_AHEAD = 3  # the web app's prefetch depth
# A hand-over later than this counts as falling behind (greenlet scheduling jitter is far smaller).
HANDOFF_SLACK_S = 0.1
PLAYBACK_REQUEST_TYPE = "PLAYBACK"
FELL_BEHIND_NAME = "fell_behind"
FAILED_CLIP_BACKOFF_S = 1.0
T = TypeVar("T")


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    # On the parser itself: only LocustArgumentParser.add_argument knows is_secret.
    parser.add_argument(
        "--playback-speed",
        type=float,
        default=1.0,
        env_var="LOADTEST_PLAYBACK_SPEED",
        help="Play clips this many times faster than real time (short smoke runs). Default 1.",
    )
    parser.add_argument(
        "--num-inference-steps",
        type=int,
        default=WEB_APP_STEPS,
        env_var="LOADTEST_NUM_INFERENCE_STEPS",
        help="Diffusion steps per request (the web app sends 50).",
    )
    parser.add_argument(
        "--seed-image-id",
        default=DEFAULT_SEED_IMAGE_ID,
        env_var="LOADTEST_SEED_IMAGE_ID",
        help="Seed image id the listeners riff on.",
    )
    parser.add_argument(
        "--duration-tolerance",
        type=float,
        default=DEFAULT_DURATION_TOLERANCE_S,
        env_var="LOADTEST_DURATION_TOLERANCE",
        help="Allowed difference (s) between a clip's audio length and its declared duration.",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        env_var="LOADTEST_REQUEST_TIMEOUT",
        help="Client timeout per request in seconds (the web app gives up after 20-60 s).",
    )
    parser.add_argument(
        "--auth-token",
        default="",
        env_var="LOADTEST_AUTH_TOKEN",
        is_secret=True,
        help="Bearer token for protected deployments (e.g. a BentoCloud API token).",
    )


@events.test_start.add_listener
def validate_options(environment: Any, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    if options.playback_speed <= 0:
        raise ValueError(f"--playback-speed must be > 0, got {options.playback_speed}")
    if options.num_inference_steps < 1:
        raise ValueError(f"--num-inference-steps must be >= 1, got {options.num_inference_steps}")


def http_failure_reason(response: ResponseContextManager) -> str:
    """``HTTP <status>: <detail>`` with the server's own message when it gave one."""
    if response.status_code == 0:
        return f"connection error: {str(response.error)[:160]}"
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = str(body.get("error") or body.get("detail") or body.get("message") or "")
    except ValueError:
        detail = response.text or ""
    detail = " ".join(detail.split())[:120]
    return f"HTTP {response.status_code}: {detail}" if detail else f"HTTP {response.status_code}"


class RiffusionUser(HttpUser):
    """Options and request helpers shared by the user classes."""

    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.playback_speed = float(getattr(options, "playback_speed", 1.0))
        self.num_inference_steps = int(getattr(options, "num_inference_steps", WEB_APP_STEPS))
        self.seed_image_id = str(getattr(options, "seed_image_id", DEFAULT_SEED_IMAGE_ID))
        self.tolerance_s = float(
            getattr(options, "duration_tolerance", DEFAULT_DURATION_TOLERANCE_S)
        )
        self.request_timeout = float(getattr(options, "request_timeout", 60.0))
        token = str(getattr(options, "auth_token", "") or "")
        if token:
            self.client.headers["Authorization"] = f"Bearer {token}"
        self.rng = random.Random()

    def post_checked(self, path: str, check: Callable[[Response], T], **kwargs: Any) -> T | None:
        """POST, then ``check`` the answer; a bad one becomes a failure with its reason."""
        with self.client.post(
            path, name=path, catch_response=True, timeout=self.request_timeout, **kwargs
        ) as response:
            if response.status_code != 200:
                response.failure(http_failure_reason(response))
                return None
            try:
                result = check(response)
            except ValueError as error:  # ResponseCheckError, or a body that is not JSON
                response.failure(f"bad response: {error}")
                return None
            response.success()
            return result


class FellBehind(Exception):
    """The next clip was not ready when the previous one finished playing."""


class WebAppListener(RiffusionUser):
    """One browser tab of the riffusion web app, playing an endless jam."""

    weight = 3
    wait_time = constant(0)  # playback itself paces the listener

    def on_start(self) -> None:
        super().on_start()
        self.walk = AlphaWalk(self.rng, self.num_inference_steps, self.seed_image_id)
        self.fetches: Group = Group()
        self.queued: deque[Greenlet] = deque()
        self.clips_played = 0

    def on_stop(self) -> None:
        self.fetches.kill(block=False)

    def fetch_clip(self, body: dict[str, Any]) -> CheckedClip | None:
        return self.post_checked(
            "/run_inference/",
            lambda response: check_clip_payload(response.json(), tolerance_s=self.tolerance_s),
            json=body,
        )

    def request_ahead(self) -> None:
        while len(self.queued) < MAX_CLIPS_AHEAD:
            self.queued.append(self.fetches.spawn(self.fetch_clip, self.walk.next_body()))

    @task
    def play_next_clip(self) -> None:
        """Wait for the next clip, report the hand-over, then play it."""
        self.request_ahead()
        waiting_since = time.perf_counter()
        clip = self.queued.popleft().get()
        waited_s = time.perf_counter() - waiting_since
        if self.clips_played > 0:  # the first clip is start-up latency, not a stall
            self.report_handoff(waited_s, clip)
        self.request_ahead()  # the web app asks for the next clip as this one starts
        if clip is None:
            gevent.sleep(FAILED_CLIP_BACKOFF_S)  # like a browser retrying, not a tight loop
            return
        self.clips_played += 1
        gevent.sleep((clip.reported_duration_s or clip.audio_duration_s) / self.playback_speed)

    def report_handoff(self, waited_s: float, clip: CheckedClip | None) -> None:
        error: FellBehind | None = None
        if clip is None:
            error = FellBehind("clip request failed: the listener hears silence")
        elif waited_s > HANDOFF_SLACK_S:
            error = FellBehind("clip not ready when the previous one finished")
        self.environment.events.request.fire(
            request_type=PLAYBACK_REQUEST_TYPE,
            name=FELL_BEHIND_NAME,
            response_time=waited_s * 1000.0,
            response_length=0,
            exception=error,
            context={},
        )


class ApiClient(RiffusionUser):
    """An API consumer: text-to-audio, short audio-to-audio uploads and interpolation."""

    weight = 1
    wait_time = between(0.5, 2.0)

    def prompt_input(self) -> dict[str, Any]:
        return {"prompt": self.rng.choice(PROMPTS), "seed": self.rng.randrange(0, 2**31)}

    def check_audio_file(self, response: Response, expected_duration_s: float) -> float:
        return check_audio_file(
            response.content,
            response.headers.get("content-type"),
            expected_duration_s=expected_duration_s,
            declared_duration_s=response.headers.get("x-riffusion-duration-seconds"),
            tolerance_s=self.tolerance_s,
        )

    @task(3)
    def text_to_audio(self) -> None:
        duration_s = self.rng.choice([2.0, 3.0, 5.12])
        body = {
            **self.prompt_input(),
            "duration_s": duration_s,
            "num_inference_steps": self.num_inference_steps,
            "format": "mp3",
        }
        self.post_checked(
            "/text_to_audio",
            lambda response: self.check_audio_file(response, duration_s),
            json=body,
        )

    @task(2)
    def audio_to_audio(self) -> None:
        duration_s = self.rng.choice([2.0, 2.5, 3.0])
        upload = synth_wav(duration_s, seed=self.rng.randrange(1000))
        form = {
            **self.prompt_input(),
            "denoising": "0.5",
            "num_inference_steps": str(self.num_inference_steps),
            "format": "wav",
        }
        self.post_checked(
            "/audio_to_audio",
            lambda response: self.check_audio_file(response, duration_s),
            files={"audio": ("upload.wav", upload, "audio/wav")},
            data={key: str(value) for key, value in form.items()},
        )

    @task(1)
    def interpolate(self) -> None:
        num_clips = 2
        body = {
            "start": self.prompt_input(),
            "end": self.prompt_input(),
            "num_clips": num_clips,
            "num_inference_steps": self.num_inference_steps,
            "seed_image_id": self.seed_image_id,
            "format": "mp3",
        }
        self.post_checked(
            "/interpolate",
            lambda response: check_interpolation_payload(
                response.json(), num_clips, self.tolerance_s
            ),
            json=body,
        )


SESSION_REQUEST_TYPE = "SESSION"


class Underrun(Exception):
    """A listener's buffer ran dry before the next clip arrived."""


class SessionListener(User):
    """One listener on a session: opens it, plays every clip in real time, steers now and then."""

    weight = 3
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.rng = random.Random()
        token = str(getattr(options, "auth_token", "") or "") or None
        settings = {
            "prompt": self.rng.choice(PROMPTS),
            "seed": self.rng.randrange(0, 2**31),
            "num_inference_steps": int(getattr(options, "num_inference_steps", WEB_APP_STEPS)),
            "seed_image_id": str(getattr(options, "seed_image_id", DEFAULT_SEED_IMAGE_ID)),
        }
        self.listener = SessionListener_(
            self.host or "", settings, api_key=token, timeout_s=self._timeout()
        )
        self.opened = False

    def _timeout(self) -> float:
        return float(getattr(self.environment.parsed_options, "request_timeout", 60.0))

    def on_stop(self) -> None:
        self.listener.close()

    def fire(self, name: str, seconds: float, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=SESSION_REQUEST_TYPE,
            name=name,
            response_time=seconds * 1000.0,
            response_length=0,
            exception=error,
            context={},
        )

    @task
    def listen(self) -> None:
        if not self.opened:
            try:
                answer = self.listener.open()
            except (OSError, ValueError, websocket.WebSocketException) as error:
                self.fire("open", 0.0, error)
                gevent.sleep(FAILED_CLIP_BACKOFF_S)
                return
            refused = answer.get("type") != "accepted"
            self.fire("open", self.listener.report.open_s, Refused(answer) if refused else None)
            if refused:  # like a client told to retry later: this listener gives up
                self.stop()
                return
            self.opened = True
        underruns = len(self.listener.report.underruns)
        for clip in self.listener.clips(count=1):
            silent = self.listener.report.underruns[underruns:]
            self.fire(
                "underrun",
                sum(silent),
                Underrun(f"{sum(silent):.2f} s of silence before clip {clip['index']}")
                if silent
                else None,
            )
            if self.rng.random() < 0.1:  # now and then, ask for something else
                self.listener.steer(self.rng.choice(PROMPTS))
            return
        self.fire("ended", 0.0, Refused({"message": self.listener.report.ended_by}))
        self.stop()


class Refused(Exception):
    """The session was refused or ended by the server."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(str(answer.get("message") or answer)[:160])


class TrafficShape(LoadTestShape):
    """Users over time from ``traffic.shape_users``, scaled by ``--users`` and ``--run-time``."""

    abstract = True
    use_common_options = True
    shape_name = ""

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        users = int(getattr(options, "num_users", None) or 1)
        spawn_rate = float(getattr(options, "spawn_rate", None) or 1.0)
        run_time_s = float(getattr(options, "run_time", None) or 60)
        wanted = shape_users(self.shape_name, self.get_run_time(), run_time_s, users)
        if wanted is None:
            return None
        # A spike arrives at once; ramps and soaks use the requested spawn rate.
        return wanted, float(users) if self.shape_name == "spike" else spawn_rate


class RampShape(TrafficShape):
    abstract = SELECTED_SHAPE != "ramp"
    shape_name = "ramp"


class SpikeShape(TrafficShape):
    abstract = SELECTED_SHAPE != "spike"
    shape_name = "spike"


class SoakShape(TrafficShape):
    abstract = SELECTED_SHAPE != "soak"
    shape_name = "soak"
