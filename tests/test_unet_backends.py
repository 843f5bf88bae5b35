"""UNet backends on the tiny model: eager, our own trace, the checkpoint-trace fallback."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from riffusion import unet_backends
from riffusion.cli import cli
from riffusion.models import (
    RiffusionComponents,
    build_tiny_components,
    load_components,
    save_components,
)
from riffusion.unet_backends import (
    BucketedUNet,
    EagerUNet,
    ShapeCheckedTracedUNet,
    TraceError,
    backend_in_use,
    prepare_unet,
    trace_unet,
)

# fp32 on CPU: a trace replays the same kernels, so outputs agree to rounding noise.
FP32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny() -> RiffusionComponents:
    return build_tiny_components(seed=0, device="cpu")


@pytest.fixture(scope="module")
def cli_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    """`riffusion trace-unet --model tiny` run once; the other tests use its output."""
    output = tmp_path_factory.mktemp("trace") / "unet_traced"
    result = CliRunner().invoke(
        cli, ["trace-unet", "--model", "tiny", "--output", str(output), "--device", "cpu"]
    )
    return result, output


@pytest.fixture(scope="module")
def traced_dir(cli_trace: tuple[Result, Path]) -> Path:
    result, output = cli_trace
    assert result.exit_code == 0, result.output
    return output


def _inputs(
    batch: int, timesteps: list[float], text_length: int = 77, size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    latents = torch.randn(batch, 4, size, size, generator=generator)
    text = torch.randn(batch, text_length, 32, generator=generator)
    return latents, torch.tensor(timesteps), text


def test_eager_is_the_diffusers_unet(tiny: RiffusionComponents) -> None:
    eager = prepare_unet(tiny, "eager")
    latents, timesteps, text = _inputs(2, [999.0, 1.0])
    with torch.no_grad():
        expected = tiny.unet(latents, timesteps, encoder_hidden_states=text).sample
        assert torch.equal(eager(latents, timesteps, text), expected)


def test_unknown_backend_is_rejected(tiny: RiffusionComponents) -> None:
    with pytest.raises(ValueError, match="unknown UNet backend 'fast'"):
        prepare_unet(tiny, "fast")


@pytest.mark.parametrize(
    ("batch", "timesteps"), [(1, [500.0]), (3, [999.0, 500.0, 1.0])], ids=["batch1", "batch3"]
)
def test_traced_matches_eager(
    tiny: RiffusionComponents, traced_dir: Path, batch: int, timesteps: list[float]
) -> None:
    traced = prepare_unet(tiny, "traced", traced_path=traced_dir)
    assert isinstance(traced, ShapeCheckedTracedUNet)
    eager = prepare_unet(tiny, "eager")
    latents, timestep_tensor, text = _inputs(batch, timesteps)
    with torch.no_grad():
        expected = eager(latents, timestep_tensor, text)
        actual = traced(latents, timestep_tensor, text)
    assert traced.traced_calls == 1 and traced.eager_calls == 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=FP32_TOLERANCE)
    # Per-sample timesteps really are per sample: one shared timestep gives another result.
    if batch > 1:
        with torch.no_grad():
            shared = traced(latents, torch.full((batch,), timesteps[0]), text)
        assert not torch.allclose(shared[1:], actual[1:], atol=1e-3)


def test_own_trace_accepts_multi_window_text(tiny: RiffusionComponents, traced_dir: Path) -> None:
    traced = prepare_unet(tiny, "traced", traced_path=traced_dir)
    assert isinstance(traced, ShapeCheckedTracedUNet)
    latents, timesteps, text = _inputs(2, [800.0, 200.0], text_length=154)
    with torch.no_grad():
        actual = traced(latents, timesteps, text)
        expected = prepare_unet(tiny, "eager")(latents, timesteps, text)
    assert traced.traced_calls == 1
    torch.testing.assert_close(actual, expected, rtol=0, atol=FP32_TOLERANCE)


def test_own_trace_routes_other_latent_sizes_to_eager(
    tiny: RiffusionComponents, traced_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    traced = prepare_unet(tiny, "traced", traced_path=traced_dir)
    assert isinstance(traced, ShapeCheckedTracedUNet)
    latents, timesteps, text = _inputs(1, [10.0], size=32)
    with caplog.at_level(logging.WARNING, logger=unet_backends.__name__), torch.no_grad():
        actual = traced(latents, timesteps, text)
        traced(latents, timesteps, text)
    assert traced.eager_calls == 2 and traced.traced_calls == 0
    reasons = [r.getMessage() for r in caplog.records if "latent size 32x32" in r.getMessage()]
    assert len(reasons) == 1, "the reason is logged once per shape, not on every step"
    with torch.no_grad():
        assert torch.equal(actual, prepare_unet(tiny, "eager")(latents, timesteps, text))


@pytest.fixture(scope="module")
def model_dir_with_checkpoint_trace(
    tiny: RiffusionComponents, tmp_path_factory: pytest.TempPathFactory, saved_tiny_dir: Path
) -> Path:
    """A saved tiny model with a ``unet_traced/unet_traced.pt`` traced the way the
    real checkpoint's was: batch 2, 64x64 latents, 77 tokens, a single (1,) timestep,
    and no signature file."""
    model_dir = tmp_path_factory.mktemp("checkpointlike") / "model"
    shutil.copytree(saved_tiny_dir, model_dir)
    example = (
        torch.randn(2, 4, 64, 64),
        torch.tensor([999.0]),
        torch.randn(2, 77, 32),
    )

    class Checkpointlike(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(
            self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor
        ) -> tuple[torch.Tensor]:
            return (self.unet(latents, t, encoder_hidden_states=text).sample,)

    (model_dir / "unet_traced").mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches
        traced = torch.jit.trace(Checkpointlike(tiny.unet), example, check_trace=False)
    torch.jit.save(traced, str(model_dir / "unet_traced" / "unet_traced.pt"))
    return model_dir


@pytest.fixture(scope="module")
def saved_tiny_dir(tiny: RiffusionComponents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    save_components(tiny, directory)
    return directory


def test_checkpoint_trace_used_where_shapes_fit(
    model_dir_with_checkpoint_trace: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The checkpoint's signature, but for the CPU/fp32 device this test runs on.
    cpu_signature = dataclasses.replace(
        unet_backends.CHECKPOINT_TRACE_SIGNATURE,
        device_type="cpu",
        dtype="float32",
        timestep_dtype="float32",
    )
    monkeypatch.setattr(unet_backends, "CHECKPOINT_TRACE_SIGNATURE", cpu_signature)
    components = load_components(model_dir_with_checkpoint_trace, device="cpu")
    unet = prepare_unet(components, "traced")
    assert isinstance(unet, ShapeCheckedTracedUNet)
    assert isinstance(unet.traced_module, torch.jit.ScriptModule)
    assert unet.source == model_dir_with_checkpoint_trace / "unet_traced" / "unet_traced.pt"
    eager = EagerUNet(components.unet)

    # (a) CFG batch 2 at 64x64 and 77 tokens fits, even with per-sample timesteps.
    latents, timesteps, text = _inputs(2, [999.0, 21.0])
    with torch.no_grad():
        fitted = unet(latents, timesteps, text)
        torch.testing.assert_close(
            fitted, eager(latents, timesteps, text), rtol=0, atol=FP32_TOLERANCE
        )
    assert (unet.traced_calls, unet.eager_calls) == (1, 0)

    # (b) batches the checkpoint's fixed size does not fit (the engine forms any even
    # size, 2 per job) run as traced chunks of 2, the odd rest padded: never eager.
    for batch, calls in ((4, 2), (3, 2), (6, 3), (1, 1)):
        latents, timesteps, text = _inputs(batch, torch.linspace(999.0, 1.0, batch).tolist())
        before = unet.traced_calls
        with torch.no_grad():
            chunked = unet(latents, timesteps, text)
            torch.testing.assert_close(
                chunked, eager(latents, timesteps, text), rtol=0, atol=FP32_TOLERANCE
            )
        assert unet.traced_calls - before == calls
    assert unet.eager_calls == 0

    # (c) another latent size still cannot use it: eager, with the reason logged.
    latents, timesteps, text = _inputs(2, [999.0, 1.0], size=32)
    with caplog.at_level(logging.WARNING, logger=unet_backends.__name__), torch.no_grad():
        routed = unet(latents, timesteps, text)
    assert unet.eager_calls == 1
    assert any("latent size 32x32" in record.getMessage() for record in caplog.records)
    with torch.no_grad():
        assert torch.equal(routed, eager(latents, timesteps, text))


def test_bucketed_unet_pads_to_few_batch_sizes_without_changing_rows(
    tiny: RiffusionComponents,
) -> None:
    eager = EagerUNet(tiny.unet)
    seen: list[int] = []

    def recording(latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> Any:
        seen.append(len(latents))
        return eager(latents, timesteps, text)

    bucketed = BucketedUNet(recording, max_batch=16)
    assert bucketed.buckets == (1, 2, 4, 8, 16)
    for batch in (1, 2, 3, 6, 10):
        latents, timesteps, text = _inputs(batch, torch.linspace(900.0, 10.0, batch).tolist())
        with torch.no_grad():
            output = bucketed(latents, timesteps, text)
            torch.testing.assert_close(
                output, eager(latents, timesteps, text), rtol=0, atol=FP32_TOLERANCE
            )
    assert seen == [1, 2, 4, 8, 16]
    assert bucketed.padded_calls == 3


def test_checkpoint_trace_for_another_device_falls_back(
    model_dir_with_checkpoint_trace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    components = load_components(model_dir_with_checkpoint_trace, device="cpu")
    with caplog.at_level(logging.WARNING, logger=unet_backends.__name__):
        unet = prepare_unet(components, "traced")
    assert isinstance(unet, EagerUNet)
    assert any(
        "traced for cuda/float16 but the model runs on cpu/float32" in record.getMessage()
        for record in caplog.records
    )


def test_model_without_trace_falls_back(
    tiny: RiffusionComponents, saved_tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=unet_backends.__name__):
        assert isinstance(prepare_unet(tiny, "traced"), EagerUNet)
        components = load_components(saved_tiny_dir, device="cpu")
        assert isinstance(prepare_unet(components, "traced"), EagerUNet)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "the tiny model has no traced UNet" in messages
    assert "has no unet_traced/unet_traced.pt" in messages


def test_trace_unet_cli_end_to_end(
    tiny: RiffusionComponents, cli_trace: tuple[Result, Path]
) -> None:
    result, output = cli_trace
    assert result.exit_code == 0, result.output
    assert (output / "unet_traced.pt").is_file() and (output / "signature.json").is_file()
    assert "TINY test model" in result.output
    assert str(output / "unet_traced.pt") in result.output
    traced = prepare_unet(tiny, "traced", traced_path=output)
    assert isinstance(traced, ShapeCheckedTracedUNet)
    assert traced.signature.batch_sizes is None  # any batch size
    assert (traced.signature.latent_height, traced.signature.latent_width) == (64, 64)


def test_trace_unet_verifies_against_eager(tiny: RiffusionComponents, tmp_path: Path) -> None:
    # A negative tolerance no output can meet: the verification must reject the trace
    # rather than save it.
    with pytest.raises(TraceError, match="differs from eager"):
        trace_unet(tiny, tmp_path / "rejected", tolerance=-1.0)
    assert not (tmp_path / "rejected" / "unet_traced.pt").exists()


def test_trace_unet_function_checks_size(tiny: RiffusionComponents, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        trace_unet(tiny, tmp_path, width=500)


def test_trace_unet_cli_rejects_bad_size(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["trace-unet", "--model", "tiny", "--output", str(tmp_path), "--width", "500"]
    )
    assert result.exit_code != 0
    assert "multiples of 8" in result.output


@pytest.mark.skipif(
    os.environ.get("RIFFUSION_SLOW_TESTS") != "1",
    reason="torch.compile on CPU builds C++ kernels (over a minute on 2 cores); "
    "set RIFFUSION_SLOW_TESTS=1",
)
def test_compiled_matches_eager(tiny: RiffusionComponents) -> None:
    compiled = prepare_unet(tiny, "compiled")
    latents, timesteps, text = _inputs(2, [999.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(latents, timesteps, text),
            EagerUNet(tiny.unet)(latents, timesteps, text),
            rtol=1e-4,
            atol=1e-4,
        )


def test_pipeline_reports_the_backend_that_runs_not_the_one_asked_for(
    tiny: RiffusionComponents, traced_dir: Path
) -> None:
    from riffusion.pipeline import RiffusionPipeline

    fell_back = RiffusionPipeline(tiny, "traced").describe()  # the tiny model has no trace
    assert (fell_back["unet_backend"], fell_back["unet_backend_requested"]) == ("eager", "traced")
    assert backend_in_use(prepare_unet(tiny, "traced", traced_path=traced_dir)) == "traced"
    assert backend_in_use(BucketedUNet(EagerUNet(tiny.unet))) == "compiled"
