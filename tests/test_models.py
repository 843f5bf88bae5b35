"""Model loading: the tiny model, save/load through the real code path, clear errors."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from riffusion.models import (
    DEFAULT_MODEL_ID,
    VAE_SCALING_FACTOR,
    ModelLoadError,
    RiffusionComponents,
    build_tiny_components,
    load_components,
    save_components,
)


@pytest.fixture(scope="module")
def tiny() -> RiffusionComponents:
    return build_tiny_components(seed=0, device="cpu")


@pytest.fixture(scope="module")
def saved_tiny_dir(tiny: RiffusionComponents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    save_components(tiny, directory)
    return directory


def _copy_model(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def _state(components: RiffusionComponents) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(components, name)
        state.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
    return state


def _unet_output(components: RiffusionComponents) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 64, 64, generator=generator)
    text = torch.randn(2, 77, components.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad():
        return components.unet(latents, torch.tensor([999, 10]), text).sample


def test_tiny_is_deterministic_and_seed_dependent(tiny: RiffusionComponents) -> None:
    rng_before = torch.random.get_rng_state()
    again = build_tiny_components(seed=0, device="cpu")
    other = build_tiny_components(seed=1, device="cpu")
    # Building does not disturb the caller's global RNG.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    state, state_again, state_other = _state(tiny), _state(again), _state(other)
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[key], state_again[key]) for key in state)
    assert not torch.equal(state["unet.conv_in.weight"], state_other["unet.conv_in.weight"])


def test_tiny_matches_sd15_layout(tiny: RiffusionComponents) -> None:
    assert tiny.is_tiny and tiny.describe()["is_tiny"] is True
    assert "TINY" in tiny.describe()["note"]
    assert tiny.dtype == torch.float32 and tiny.device.type == "cpu"
    assert tiny.vae.config["scaling_factor"] == VAE_SCALING_FACTOR
    assert tiny.tokenizer.model_max_length == 77
    assert tiny.unet.config["cross_attention_dim"] == tiny.text_encoder.config.hidden_size
    assert tiny.scheduler_config["_class_name"] == "PNDMScheduler"
    assert tiny.scheduler_config["beta_schedule"] == "scaled_linear"

    image = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        latent = tiny.vae.encode(image).latent_dist.mean
        assert latent.shape == (1, 4, 64, 64)
        assert tiny.vae.decode(latent).sample.shape == (1, 3, 512, 512)
        assert tiny.unet(latent, torch.tensor([500]), torch.zeros(1, 77, 32)).sample.shape == (
            1,
            4,
            64,
            64,
        )

    ids = tiny.tokenizer("church bells on sunday", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tiny.tokenizer.bos_token_id
    assert tiny.tokenizer.eos_token_id in ids
    # Different text gives different tokens (the vocabulary is real byte-level BPE).
    assert ids != tiny.tokenizer("jazz", padding="max_length", max_length=77).input_ids


def test_save_then_load_gives_identical_outputs(
    tiny: RiffusionComponents, saved_tiny_dir: Path
) -> None:
    for subfolder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (saved_tiny_dir / subfolder).is_dir()
    index = json.loads((saved_tiny_dir / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]

    loaded = load_components(saved_tiny_dir, device="cpu")
    assert loaded.source_dir == saved_tiny_dir
    assert loaded.is_tiny, "a saved tiny model must still be reported as tiny"
    assert loaded.scheduler_config["steps_offset"] == 1
    assert torch.equal(_unet_output(loaded), _unet_output(tiny))
    text = "church bells on sunday"
    assert loaded.tokenizer(text).input_ids == tiny.tokenizer(text).input_ids
    ids = torch.tensor([tiny.tokenizer(text).input_ids])
    with torch.no_grad():
        assert torch.equal(
            loaded.text_encoder(ids).last_hidden_state, tiny.text_encoder(ids).last_hidden_state
        )


def test_load_tiny_by_name() -> None:
    components = load_components("tiny", device="cpu")
    assert components.is_tiny and components.model_id == "tiny"


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_components(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_components(str(tmp_path / "no-such-model"))


def test_missing_subfolder_is_named(saved_tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(saved_tiny_dir, tmp_path)
    shutil.rmtree(model_dir / "vae")
    (model_dir / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError) as error:
        load_components(model_dir)
    assert "vae/" in str(error.value)
    assert "scheduler/scheduler_config.json" in str(error.value)


def test_malformed_config_is_named(saved_tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(saved_tiny_dir, tmp_path)
    (model_dir / "unet" / "config.json").write_text('{"in_channels": 4,')
    with pytest.raises(ModelLoadError, match=r"malformed config .*unet/config\.json"):
        load_components(model_dir)


def test_missing_weights_name_the_component(saved_tiny_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(saved_tiny_dir, tmp_path)
    for weights in (model_dir / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="could not load unet/"):
        load_components(model_dir)


def test_unreachable_hub_id_while_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An empty cache, whatever this machine has cached (the hub client reads the
    # cache location once at import, so patch the resolved constant).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelLoadError) as error:
        load_components(DEFAULT_MODEL_ID, device="cpu")
    message = str(error.value)
    assert DEFAULT_MODEL_ID in message
    assert "not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "RIFFUSION_MODEL=tiny" in message
    assert "\n" not in message


def test_cuda_asked_for_without_a_usable_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """RIFFUSION_DEVICE=cuda (the Bento's default) never falls back to CPU."""

    def driver_too_old() -> bool:
        # What torch says on a node whose driver predates its CUDA build.
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old "
            "(found version 12020).\nPlease update your GPU driver.",
            UserWarning,
            stacklevel=1,
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", driver_too_old)
    with pytest.raises(ModelLoadError) as error:
        load_components("tiny", device="cuda")
    message = str(error.value)
    assert "\n" not in message
    assert "driver on your system is too old" in message
    assert "525.60.13" in message and "RIFFUSION_DEVICE=cpu" in message


def test_cpu_on_purpose_needs_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_components("tiny", device="cpu").device == torch.device("cpu")


def test_model_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIFFUSION_MODEL", "tiny")
    assert load_components(device="cpu").is_tiny
