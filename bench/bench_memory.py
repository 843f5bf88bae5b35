"""Memory check: no single request, whatever its input, raises a worker's RSS by > 300 MB.

Serves the tiny model (``load_tests.server.LocalServer``), then sends one request at
a time from a list of hostile and heavy inputs while sampling the resident memory of
the API worker and the model worker every 10 ms. For each request it reports the
peak rise over the RSS just before it, and fails (exit 1) when any rise passes the
limit. Figures: docs/benchmarks.md.

    uv run --frozen --all-extras python -m bench.bench_memory [--limit-mb 300] [--only TEXT]

``--stages`` instead measures, in this process, where the model worker's memory
goes for the two heaviest shapes (one 20.48 s clip, 16 clips of 5.12 s): one VAE
call over all the clips, Griffin-Lim over all of them, and the pipeline's whole
post-processing (``RiffusionPipeline.finish``), each from a trimmed heap. Griffin-Lim
runs 2 iterations there (its memory does not grow with the iteration count).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import soundfile as sf

from load_tests.server import LocalServer

API_KEY = "memory-check"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_UPLOAD_MB = 20.0
SAMPLE_S = 0.01


def tone(sample_rate: int, seconds: float, fmt: str = "WAV") -> bytes:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    buffer = io.BytesIO()
    samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(buffer, samples, sample_rate, format=fmt)
    return buffer.getvalue()


def flac_of_unstated_length(seconds: float) -> bytes:
    data = bytearray(tone(44100, seconds, "FLAC"))
    data[8 + 13] &= 0xF0  # STREAMINFO total samples = 0: "unknown"
    data[8 + 14 : 8 + 18] = b"\0\0\0\0"
    return bytes(data)


def chunked(total_bytes: int, piece: int = 1 << 20) -> Callable[[], object]:
    def body() -> object:
        sent = 0
        yield b'{"prompt": "'
        while sent < total_bytes:
            yield b"a" * piece
            sent += piece

    return body


def upload(payload: bytes, name: str = "track.wav", **fields: str) -> dict[str, object]:
    return {
        "files": {"audio": (name, payload, "audio/wav")},
        "data": {"prompt": "guitar", "num_inference_steps": "1", **fields},
    }


# (name, method, path, httpx keyword arguments)
CASES: list[tuple[str, str, str, Callable[[], dict[str, object]]]] = [
    ("wav 4001 Hz, 1 s (coprime rate)", "POST", "/audio_to_audio", lambda: upload(tone(4001, 1))),
    ("wav 8009 Hz, 1 s (coprime rate)", "POST", "/audio_to_audio", lambda: upload(tone(8009, 1))),
    ("wav 383999 Hz, 0.5 s", "POST", "/audio_to_audio", lambda: upload(tone(383_999, 0.5))),
    (
        "flac of unstated length, 30 s",
        "POST",
        "/audio_to_audio",
        lambda: upload(flac_of_unstated_length(30)),
    ),
    (
        "upload at the 20 MiB limit (zeros)",
        "POST",
        "/audio_to_audio",
        lambda: upload(b"\0" * int(MAX_UPLOAD_MB * 2**20 - 4096)),
    ),
    (
        "wav 10 s, 44.1 kHz (2 clips, 1 step)",
        "POST",
        "/audio_to_audio",
        lambda: upload(tone(44100, 10)),
    ),
    (
        "chunked JSON body, 200 MB",
        "POST",
        "/text_to_audio",
        lambda: {
            "content": chunked(200 * 2**20)(),
            "headers": {"Content-Type": "application/json"},
        },
    ),
    (
        "text_to_audio 20.48 s (widest clip), 1 step",
        "POST",
        "/text_to_audio",
        lambda: {"json": {"prompt": "drums", "duration_s": 20.48, "num_inference_steps": 1}},
    ),
    (
        "prompt of 1000 characters, 3 CLIP windows",
        "POST",
        "/text_to_audio",
        lambda: {
            "json": {
                "prompt": ("word " * 200)[:999],
                "negative_prompt": "x" * 1000,
                "duration_s": 0.64,
                "num_inference_steps": 1,
            }
        },
    ),
    (
        "interpolate 16 clips, 1 step",
        "POST",
        "/interpolate",
        lambda: {
            "json": {
                "start": {"prompt": "a"},
                "end": {"prompt": "b"},
                "num_clips": 16,
                "num_inference_steps": 1,
                "format": "wav",
            }
        },
    ),
    (
        "web app request, 1 step",
        "POST",
        "/run_inference/",
        lambda: {"json": {"start": {"prompt": "bells"}, "num_inference_steps": 1}},
    ),
]


class PeakSampler:
    """Samples the RSS of some processes in a thread; ``peaks`` holds the highest seen."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self.peaks = {name: 0 for name in processes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                with contextlib.suppress(psutil.Error):
                    self.peaks[name] = max(self.peaks[name], process.memory_info().rss)
            time.sleep(SAMPLE_S)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def workers(server: LocalServer) -> dict[str, psutil.Process]:
    assert server.process is not None
    found: dict[str, psutil.Process] = {}
    for child in psutil.Process(server.process.pid).children(recursive=True):
        command = child.cmdline()
        if "--service-name" not in command:
            continue
        service_name = command[command.index("--service-name") + 1]
        found["model" if service_name == "riffusion_model" else "api"] = child
    if set(found) != {"api", "model"}:
        raise SystemExit(f"could not find both workers: {found}")
    return found


def rise_mb(work: Callable[[], object]) -> float:
    """Peak RSS rise of this process while ``work`` runs, from a trimmed heap."""
    from riffusion.heap import release_freed_memory

    process = psutil.Process()
    release_freed_memory()
    before = process.memory_info().rss
    with PeakSampler({"self": process}) as sampler:
        work()
    return max(0, sampler.peaks["self"] - before) / 2**20


def stages() -> int:
    """Print the post-processing stages' RSS rises (see the module docstring)."""
    import torch

    from riffusion.pipeline import RiffusionPipeline
    from riffusion.spectrogram import SpectrogramParams

    params = SpectrogramParams(num_griffin_lim_iters=2)
    pipeline = RiffusionPipeline.load("tiny", spectrogram_params=params)
    print(f"{'stage':54} {'+MB':>7}")
    with torch.inference_mode():
        for clips, width in ((1, 2048), (1, 2048), (16, 512)):  # the first pays warm-up
            for stage, rise in stage_rises(pipeline, clips, width):
                print(f"{clips} x {width} px: {stage:42} {rise:7.1f}", flush=True)
    return 0


def stage_rises(pipeline: Any, clips: int, width: int) -> list[tuple[str, float]]:
    """(stage, RSS rise in MB) of post-processing ``clips`` clips ``width`` px wide."""
    import torch

    from riffusion.schemas import GenerationJob, PromptInput
    from riffusion.spectrogram import get_converter, mel_amplitudes_from_pixels

    params = pipeline.spectrogram_params
    jobs = [
        GenerationJob(
            start=PromptInput(prompt="drums", seed=seed), num_inference_steps=1, width=width
        )
        for seed in range(clips)
    ]
    states = [pipeline.prepare(job, index) for index, job in enumerate(jobs)]
    latents = torch.cat([state.latents for state in states])
    mel = mel_amplitudes_from_pixels(pipeline.decode_pixels(latents), params)
    converter = get_converter(params, pipeline.device)
    generators = [torch.Generator().manual_seed(seed) for seed in range(clips)]
    return [
        ("VAE decode, one call", rise_mb(lambda: pipeline.decode_pixels(latents))),
        (
            "Griffin-Lim",
            rise_mb(lambda: converter.waveform_from_mel_amplitudes(mel, generators)),
        ),
        ("post-processing (finish)", rise_mb(lambda: pipeline.finish(states))),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit-mb", type=float, default=300.0)
    parser.add_argument(
        "--stages", action="store_true", help="in-process breakdown of post-processing"
    )
    parser.add_argument(
        "--only", default="", help="run only the requests whose name contains this text"
    )
    args = parser.parse_args(argv)
    if args.stages:
        return stages()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    env = {
        "RIFFUSION_API_KEY": API_KEY,
        "RIFFUSION_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "RIFFUSION_MAX_UPLOAD_SECONDS": "120",
        "RIFFUSION_MAX_LATENCY_MS": "600000",
        "BENTOML_HOME": str(tmp / "bentoml"),
        "HF_HUB_OFFLINE": "1",
    }
    worst = 0.0
    with LocalServer(tmp / "serve.log", "tiny", env, 600) as server:
        processes = workers(server)
        client = httpx.Client(base_url=server.url, headers=AUTH, timeout=600)
        print(f"{'request':48} {'status':>6} {'API +MB':>8} {'model +MB':>9} {'s':>6}")
        for name, method, path, kwargs in CASES:
            if args.only not in name:
                continue
            before = {n: p.memory_info().rss for n, p in processes.items()}
            began = time.perf_counter()
            with PeakSampler(processes) as sampler:
                try:
                    status = client.request(method, path, **kwargs()).status_code  # type: ignore[arg-type]
                except httpx.HTTPError as exc:
                    status = type(exc).__name__  # type: ignore[assignment]
            seconds = time.perf_counter() - began
            rise = {n: max(0, sampler.peaks[n] - before[n]) / 2**20 for n in processes}
            worst = max(worst, *rise.values())
            print(f"{name:48} {status!s:>6} {rise['api']:8.1f} {rise['model']:9.1f} {seconds:6.1f}")
    verdict = "OK" if worst <= args.limit_mb else "OVER THE LIMIT"
    print(f"worst single-request RSS rise: {worst:.1f} MB (limit {args.limit_mb:g} MB): {verdict}")
    return 0 if worst <= args.limit_mb else 1


if __name__ == "__main__":
    sys.exit(main())
