"""Loading the Riffusion checkpoint: a hub id, a local diffusers directory, or ``tiny``.

Every real source (hub id or local directory) goes through the same
``from_pretrained``-per-subfolder code path. ``tiny`` builds a small model of the
same architecture family in code, with a fixed seed and no download, for tests
and offline smoke runs; it is always reported as tiny.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The model-source names, still importable from here (``X as X``: re-exported).
from riffusion.model_source import DEFAULT_MODEL_ID as DEFAULT_MODEL_ID
from riffusion.model_source import HUB_ID_RE, missing_directory_error
from riffusion.model_source import MODEL_ENV_VAR as MODEL_ENV_VAR
from riffusion.model_source import TINY_MODEL_ID as TINY_MODEL_ID
from riffusion.model_source import ModelLoadError as ModelLoadError
from riffusion.model_source import hub_offline as hub_offline
from riffusion.spectrogram import resolve_device

logger = logging.getLogger(__name__)

DEVICE_ENV_VAR = "RIFFUSION_DEVICE"
# The oldest driver that runs the pinned torch's CUDA 12.8 build (CUDA minor-version compatibility).
MIN_NVIDIA_DRIVER = "525.60.13"
VAE_SCALING_FACTOR = 0.18215
TOKENIZER_MAX_LENGTH = 77

# The checkpoint's own scheduler: PNDM with SD1.5's beta schedule.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "trained_betas": None,
}

# Subfolders of a diffusers Stable Diffusion directory and the file that must be in each.
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}
MODEL_INDEX_FILE = "model_index.json"
# Extra key in model_index.json marking a saved tiny model (diffusers ignores "_" keys).
TINY_MARKER_KEY = "_riffusion_is_tiny"


@dataclass
class RiffusionComponents:
    """The pieces of the diffusion model the pipeline needs (no safety checker)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    model_id: str
    is_tiny: bool
    device: torch.device
    dtype: torch.dtype
    source_dir: Path | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for logs and health endpoints."""
        return {
            "model_id": self.model_id,
            "is_tiny": self.is_tiny,
            "note": (
                "TINY test model with random weights: output is noise, not music"
                if self.is_tiny
                else "full model"
            ),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "source_dir": str(self.source_dir) if self.source_dir is not None else None,
            "scheduler": self.scheduler_config.get("_class_name", "unknown"),
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
        }


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (what the checkpoint was traced and served in), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    resolved_device = resolve_device(device)
    if resolved_device.type == "cuda":
        require_cuda(resolved_device)
    return resolved_device, dtype if dtype is not None else default_dtype(resolved_device)


def require_cuda(device: torch.device) -> None:
    """Refuse a CUDA device torch cannot use, instead of serving on CPU by surprise.

    The Bento sets ``RIFFUSION_DEVICE=cuda``: on a node whose driver is too old for
    the pinned torch build, torch sees no GPU, and falling back to CPU would leave a
    GPU pod ready but ~100x slower. ``RIFFUSION_DEVICE=cpu`` opts out on purpose.
    """
    # torch explains why CUDA is unusable (e.g. "driver too old") only as a warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    if available and (device.index is None or device.index < count):
        return
    if available:
        reason = f"only {count} CUDA device(s) are visible"
    else:
        reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
        reason = "torch sees no CUDA device" + (f" ({reasons[0]})" if reasons else "")
    raise ModelLoadError(
        f"{DEVICE_ENV_VAR} asks for {device} but {reason}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}) needs NVIDIA driver >= {MIN_NVIDIA_DRIVER} and a GPU "
        f"visible to the container (nvidia.com/gpu request, NVIDIA container toolkit); "
        f"set {DEVICE_ENV_VAR}=cpu to serve on CPU on purpose"
    )


# ---------------------------------------------------------------------------
# tiny model


def _tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE tokenizer with every byte symbol (plain and word-final), no download."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    # A few merges so multi-character tokens exist; the rest stays one token per byte.
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("in", "g</w>"), ("a", "n"), ("an", "d</w>")]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tokenizers wants (left, right) pairs
        model_max_length=TOKENIZER_MAX_LENGTH,
    )


def _tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _tiny_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention on the 32x32 level only: attention over all 64x64 latent
        # pixels would dominate CPU test time.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def _tiny_vae() -> AutoencoderKL:
    # SD's layout (4 blocks = 8x downsampling, 4 latent channels) with tiny widths.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=512,
        scaling_factor=VAE_SCALING_FACTOR,
    )


def build_tiny_components(
    seed: int = 0, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> RiffusionComponents:
    """A tiny SD1.5-family model with random weights fixed by ``seed`` (no download)."""
    resolved_device, resolved_dtype = _resolve_device_dtype(device, dtype)
    tokenizer = _tiny_tokenizer()
    # Build on CPU in fp32 under a private RNG so weights match across devices and
    # the caller's global RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_text_encoder(tokenizer)
        unet = _tiny_unet(cross_attention_dim=text_encoder.config.hidden_size)
        vae = _tiny_vae()
    components = RiffusionComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG),
        model_id=TINY_MODEL_ID,
        is_tiny=True,
        device=resolved_device,
        dtype=resolved_dtype,
        source_dir=None,
    )
    _prepare_for_inference(components)
    logger.info("built tiny test model (seed %d) on %s/%s", seed, resolved_device, resolved_dtype)
    return components


def _prepare_for_inference(components: RiffusionComponents) -> None:
    modules: tuple[torch.nn.Module, ...] = (
        components.unet,
        components.vae,
        components.text_encoder,
    )
    for module in modules:
        # Cast only when needed: from_pretrained already loaded in the target dtype.
        if next(module.parameters()).dtype != components.dtype:
            module.to(dtype=components.dtype)
        module.to(device=components.device)
        module.eval()
        module.requires_grad_(False)


# ---------------------------------------------------------------------------
# saving and loading


def save_components(components: RiffusionComponents, directory: Path | str) -> None:
    """Write the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    import diffusers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(directory / "unet")
    components.vae.save_pretrained(directory / "vae")
    components.text_encoder.save_pretrained(directory / "text_encoder")
    components.tokenizer.save_pretrained(directory / "tokenizer")
    PNDMScheduler.from_config(components.scheduler_config).save_pretrained(directory / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        TINY_MARKER_KEY: components.is_tiny,
    }
    (directory / MODEL_INDEX_FILE).write_text(json.dumps(model_index, indent=2) + "\n")


def load_components(
    model: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> RiffusionComponents:
    """Load ``tiny``, a local diffusers directory, or a hub id (default: ``$RIFFUSION_MODEL``
    or ``riffusion/riffusion-model-v1``). fp16 on CUDA, fp32 on CPU unless ``dtype`` is given.
    """
    if model is None:
        model = os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL_ID
    model_str = str(model)
    if model_str == TINY_MODEL_ID:
        return build_tiny_components(device=device, dtype=dtype)
    path = Path(model_str).expanduser()
    if path.is_dir():
        _check_local_layout(path)
        return _load_pretrained(
            str(path),
            model_id=str(path),
            source_dir=path,
            device=device,
            dtype=dtype,
            is_tiny=_is_saved_tiny(path),
        )
    if isinstance(model, Path) or path.exists() or not HUB_ID_RE.match(model_str):
        raise missing_directory_error(model_str)
    return _load_pretrained(
        model_str, model_id=model_str, source_dir=None, device=device, dtype=dtype, is_tiny=False
    )


def _check_local_layout(directory: Path) -> None:
    """Fail early, naming every missing subfolder/file and any config that is not valid JSON."""
    missing: list[str] = []
    for subfolder, files in REQUIRED_FILES.items():
        if not (directory / subfolder).is_dir():
            missing.append(f"{subfolder}/")
            continue
        missing.extend(
            f"{subfolder}/{name}" for name in files if not (directory / subfolder / name).is_file()
        )
    if missing:
        raise ModelLoadError(
            f"model directory {str(directory)!r} is not a complete diffusers checkpoint: missing "
            + ", ".join(missing)
            + " (expected unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            " as written by save_pretrained)"
        )
    for subfolder, files in REQUIRED_FILES.items():
        for name in files:
            config_path = directory / subfolder / name
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ModelLoadError(f"malformed config {str(config_path)!r}: {error}") from error
            if not isinstance(config, dict):
                raise ModelLoadError(
                    f"malformed config {str(config_path)!r}: expected a JSON object"
                )


def _is_saved_tiny(directory: Path) -> bool:
    index_path = directory / MODEL_INDEX_FILE
    if not index_path.is_file():
        return False
    try:
        return bool(json.loads(index_path.read_text()).get(TINY_MARKER_KEY, False))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _load_pretrained(
    location: str,
    *,
    model_id: str,
    source_dir: Path | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    is_tiny: bool,
) -> RiffusionComponents:
    """The one code path for real checkpoints: ``from_pretrained`` on each subfolder."""
    resolved_device, resolved_dtype = _resolve_device_dtype(device, dtype)
    offline = hub_offline()
    common: dict[str, Any] = {"local_files_only": offline}
    # Skip random init before loading weights when accelerate is installed (faster for
    # the full model); without it diffusers falls back anyway, so ask for that quietly.
    diffusers_options: dict[str, Any] = {
        **common,
        "torch_dtype": resolved_dtype,
        "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
    }
    component = "scheduler"
    try:
        scheduler_config = dict(
            PNDMScheduler.load_config(location, subfolder="scheduler", **common)
        )
        component = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **common)
        component = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(
            location, subfolder="text_encoder", dtype=resolved_dtype, **common
        )
        component = "vae"
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **diffusers_options)
        component = "unet"
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **diffusers_options)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ModelLoadError(
            _describe_load_failure(location, source_dir, component, error)
        ) from error
    components = RiffusionComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        model_id=model_id,
        is_tiny=is_tiny,
        device=resolved_device,
        dtype=resolved_dtype,
        source_dir=source_dir,
    )
    _prepare_for_inference(components)
    logger.info(
        "loaded model %s on %s/%s%s",
        model_id,
        resolved_device,
        resolved_dtype,
        " (TINY test model)" if is_tiny else "",
    )
    return components


def _describe_load_failure(
    location: str, source_dir: Path | None, component: str, error: Exception
) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if source_dir is not None:
        return f"could not load {component}/ from model directory {location!r}: {first_line}"
    return describe_hub_failure(location, f"{component}/", error)


def describe_hub_failure(model_id: str, what: str, error: BaseException) -> str:
    """One line for a hub checkpoint that could not be fetched (offline, no network, wrong id)."""
    if hub_offline():
        return (
            f"model {model_id!r} ({what}) is not in the Hugging Face cache and could not be "
            "downloaded because HF_HUB_OFFLINE is set; run once with network access (unset "
            "HF_HUB_OFFLINE) to fill the cache, point HF_HOME at a cache that has it, pass a "
            f"local diffusers directory, or set {MODEL_ENV_VAR}=tiny for an offline smoke run"
        )
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return (
        f"could not download model {model_id!r} ({what}) from the Hugging Face hub: "
        f"{first_line}; check network access and the model id (it is not a local directory "
        "either), set HF_TOKEN for a private model, pass a local diffusers directory, or set "
        f"{MODEL_ENV_VAR}=tiny for an offline smoke run"
    )
