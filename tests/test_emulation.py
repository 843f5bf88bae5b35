"""The emulated accelerator (riffusion/emulation.py): its calls take the profile's time on
one device timeline, it changes no result, a Bento refuses it unless allowed, and a served
instance answers clips through it and says so in /model_info.

Timings are asserted as lower bounds only (a loaded machine makes every call slower,
never faster), with upper bounds far above the profile's time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from riffusion.emulation import PROFILES, EmulatedPipeline, get_profile, load_emulated
from riffusion.models import build_tiny_components
from riffusion.pipeline import RiffusionPipeline
from riffusion.schemas import GenerationJob, PromptInput
from serving.startup_checks import (
    StartupRefused,
    refuse_emulation_in_bento,
    running_from_bento,
)

ROOT = Path(__file__).resolve().parents[1]
GENEROUS_S = 30.0  # an upper bound no loaded machine should reach


@pytest.fixture(scope="module")
def h100() -> EmulatedPipeline:
    return load_emulated("h100")


def _timed(call: object, *args: object) -> float:
    began = time.monotonic()
    call(*args)  # type: ignore[operator]
    return time.monotonic() - began


@pytest.mark.parametrize(("samples", "latent_width"), [(2, 64), (16, 64), (8, 128)])
def test_unet_step_takes_the_profiles_time(
    h100: EmulatedPipeline, samples: int, latent_width: int
) -> None:
    """Fixed cost plus a per-sample cost that grows with the latent area."""
    latents = torch.randn(samples, 4, 64, latent_width)
    text = torch.randn(samples, 77, 32)
    expected = h100.profile.unet_step.seconds(samples, latent_width / 64)
    seconds = _timed(h100.unet_forward, latents, torch.ones(samples), text)
    assert expected <= seconds < expected + GENEROUS_S


def test_decode_and_griffin_lim_take_the_profiles_time(h100: EmulatedPipeline) -> None:
    """Per image / clip, scaled by width: 3 clips of 1024 px cost 6 of 512 px, plus fixed."""
    latents = torch.randn(3, 4, 64, 128)
    expected_decode = h100.profile.vae_decode.seconds(3, 2.0)
    began = time.monotonic()
    pixels = h100.decode_pixels(latents)
    assert expected_decode <= time.monotonic() - began < expected_decode + GENEROUS_S
    assert pixels.shape == (3, 3, 512, 1024) and pixels.dtype == torch.uint8

    generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
    expected_vocode = h100.profile.griffin_lim.seconds(3, 2.0)
    began = time.monotonic()
    waveforms = h100.griffin_lim(pixels, generators)
    assert expected_vocode <= time.monotonic() - began < expected_vocode + GENEROUS_S
    assert len(waveforms) == 3


def test_seed_image_encode_takes_the_profiles_time_once_per_seed(h100: EmulatedPipeline) -> None:
    """Admission encodes the seed image (cached per image and seed, as the real one)."""
    job = GenerationJob(start=PromptInput(prompt="bells", seed=11), seed_image_id="og_beat")
    expected = h100.profile.vae_encode.seconds(1)
    busy = h100.clock.stats()["busy_s"]
    state = h100.prepare(job)
    assert h100.clock.stats()["busy_s"] - busy == pytest.approx(expected)
    assert state.init_latents is not None and state.init_latents.shape == (1, 4, 64, 64)
    h100.prepare(job)  # same image and seed: from the cache, no device time
    assert h100.clock.stats()["busy_s"] - busy == pytest.approx(expected)


def test_calls_from_two_threads_share_one_device(h100: EmulatedPipeline) -> None:
    """A decode on the post-processing thread delays the engine's step: one timeline."""
    latents = torch.randn(8, 4, 64, 64)
    decode_s = h100.profile.vae_decode.seconds(8)
    step_s = h100.profile.unet_step.seconds(16)
    decoding = threading.Thread(target=h100.decode_pixels, args=(latents,))
    began = time.monotonic()
    decoding.start()
    h100.unet_forward(torch.randn(16, 4, 64, 64), torch.ones(16), torch.randn(16, 77, 32))
    decoding.join()
    assert time.monotonic() - began >= decode_s + step_s


def test_placeholders_have_the_real_outputs_shapes() -> None:
    """Without the tiny model's compute, each stage returns what the real one would:
    same shapes and dtypes, so the engine, loudness and encoders do their usual work."""
    real = load_emulated("zero")
    real.profile = dataclasses.replace(real.profile, runs_model=True)
    fake = load_emulated("zero")
    latents = torch.randn(2, 4, 64, 8)
    real_pixels, fake_pixels = real.decode_pixels(latents), fake.decode_pixels(latents)
    assert (real_pixels.shape, real_pixels.dtype) == (fake_pixels.shape, fake_pixels.dtype)
    generators = [torch.Generator().manual_seed(seed) for seed in range(2)]
    real_waves = real.griffin_lim(real_pixels, generators)
    fake_waves = fake.griffin_lim(fake_pixels, generators)
    assert [(w.shape, w.dtype) for w in real_waves] == [(w.shape, w.dtype) for w in fake_waves]
    assert all(np.abs(w).max() > 0 for w in fake_waves)  # not silence: the encoders work


def test_running_the_model_under_emulation_changes_no_result() -> None:
    """With the model's compute on, an emulated pipeline gives the plain pipeline's clip."""
    job = GenerationJob(start=PromptInput(prompt="bells", seed=3), num_inference_steps=3, width=64)
    plain = RiffusionPipeline(build_tiny_components(device="cpu"))
    profile = dataclasses.replace(get_profile("h100"), runs_model=True)
    emulated = EmulatedPipeline(build_tiny_components(device="cpu"), profile)
    [expected] = plain.run([job])
    [clip] = emulated.run([job])
    torch.testing.assert_close(clip.latents, expected.latents)
    np.testing.assert_allclose(clip.audio.samples, expected.audio.samples, atol=1e-5)


def test_the_engine_sees_a_gpu() -> None:
    """Decodes grouped, post-processing on its own thread: the GPU device policy."""
    pipeline = load_emulated("a10g")
    assert pipeline.policy.batch_together and pipeline.policy.postprocess == "thread"
    emulated = pipeline.describe()["emulated"]
    assert emulated["accelerator"] == "a10g" and "EMULATED" in emulated["note"]


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="a10g"):
        get_profile("tpu")
    assert set(PROFILES) == {"a10g", "h100", "zero"}


def test_a_bento_refuses_emulation_unless_allowed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "service.py").write_text("")
    assert not running_from_bento(src / "service.py")
    (tmp_path / "bento.yaml").write_text("service: service:Riffusion\n")
    assert running_from_bento(src / "service.py")
    assert not running_from_bento(ROOT / "service.py")  # a source checkout
    with pytest.raises(StartupRefused, match="RIFFUSION_ALLOW_EMULATION=1"):
        refuse_emulation_in_bento("h100", allowed=False, in_bento=True)
    refuse_emulation_in_bento("h100", allowed=True, in_bento=True)
    refuse_emulation_in_bento("h100", allowed=False, in_bento=False)
    refuse_emulation_in_bento(None, allowed=False, in_bento=True)


def test_bento_layout_serve_with_emulation_stops_in_one_line(tmp_path: Path) -> None:
    """`bentoml serve` from a Bento's layout (sources in src/ beside bento.yaml) with
    RIFFUSION_EMULATE set: the server stops before it listens, naming the opt-in."""
    from load_tests.server import refused_start

    src = tmp_path / "bento" / "src"
    shutil.copytree(ROOT / "riffusion", src / "riffusion")
    shutil.copytree(ROOT / "serving", src / "serving")
    shutil.copy(ROOT / "service.py", src / "service.py")
    (src.parent / "bento.yaml").write_text("service: service:Riffusion\n")
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "home"),
        "BENTOML_DO_NOT_TRACK": "1",
        "RIFFUSION_MODEL": "tiny",
        "RIFFUSION_EMULATE": "h100",
    }
    env.pop("RIFFUSION_ALLOW_EMULATION", None)
    output = refused_start(src, env)
    assert "RIFFUSION_EMULATE=h100" in output and "RIFFUSION_ALLOW_EMULATION=1" in output


@pytest.fixture(scope="module")
def emulated_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One served instance: tiny model, emulated H100 (its own BENTOML_HOME)."""
    from load_tests.server import LocalServer

    home = tmp_path_factory.mktemp("emulated-home")
    env: dict[str, str | None] = {
        "BENTOML_HOME": str(home),
        "RIFFUSION_EMULATE": "h100",
        "RIFFUSION_API_KEY": None,
        "RIFFUSION_AUTH": "optional",
    }
    with LocalServer(home / "serve.log", "tiny", env, ready_timeout_s=600) as server:
        yield server.url


def test_served_emulated_instance_answers_clips_and_says_so(emulated_server: str) -> None:
    info = httpx.get(f"{emulated_server}/model_info", timeout=60).json()
    assert info["emulated"]["accelerator"] == "h100", info
    assert "EMULATED" in info["emulated"]["note"]
    steps = 20
    body = {"prompt": "slow piano", "seed": 1, "num_inference_steps": steps, "duration_s": 5.12}
    response = httpx.post(f"{emulated_server}/text_to_audio", json=body, timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("audio/")
    assert len(response.content) > 10_000  # 5 s of MP3
    # The model's share took at least the emulated H100's time for its steps.
    step_s = get_profile("h100").unet_step.seconds(2)
    assert float(response.headers["X-Riffusion-Pipeline-Seconds"]) >= steps * step_s
