"""UNet backends: eager diffusers module, TorchScript trace, or ``torch.compile``.

Every backend is a callable ``(latents (B,4,h,w), timesteps (B,), text (B,T,D)) ->
noise prediction (B,4,h,w)`` so the pipeline does not care which one runs.

How the traced backend knows about shapes: a TorchScript trace replays the ops it
recorded, so it is only trusted for the inputs it was traced (and verified) for.
Each trace has a :class:`TraceSignature` (device, dtype, latent size, and the batch
sizes / text lengths it accepts). ``trace_unet`` writes it next to the trace as
``signature.json``; the checkpoint's own ``unet_traced/unet_traced.pt`` has none, so
it gets :data:`CHECKPOINT_TRACE_SIGNATURE` (fp16 CUDA, batch 2, 64x64 latents, 77
tokens). Device and dtype are checked once when the backend is prepared (a mismatch
means eager for the whole run); the call shapes are checked on every call by
:class:`ShapeCheckedTracedUNet`, which sends calls that do not fit to the eager UNet
and logs the reason once per distinct shape.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from riffusion.contracts import UNET_BACKENDS, UNetBackend
from riffusion.models import RiffusionComponents, hub_offline

logger = logging.getLogger(__name__)

UNetFunction = Callable[[Tensor, Tensor, Tensor], Tensor]

TRACED_UNET_DIR = "unet_traced"
TRACED_UNET_FILE = "unet_traced.pt"
SIGNATURE_FILE = "signature.json"
TRACED_UNET_ENV_VAR = "RIFFUSION_TRACED_UNET"
COMPILE_MODE_ENV_VAR = "RIFFUSION_COMPILE_MODE"


class TraceError(RuntimeError):
    """Tracing failed or the trace does not reproduce the eager UNet."""


@dataclass(frozen=True)
class TraceSignature:
    """The inputs a traced UNet is known to handle; ``None`` means any size."""

    device_type: str
    dtype: str
    latent_height: int
    latent_width: int
    batch_sizes: tuple[int, ...] | None
    text_lengths: tuple[int, ...] | None
    timestep_dtype: str = "float32"

    def mismatch(self, latents: Tensor, text_embeddings: Tensor) -> str | None:
        """Why a call with these inputs does not fit (``None`` when it fits)."""
        batch, _, height, width = latents.shape
        if (height, width) != (self.latent_height, self.latent_width):
            return (
                f"latent size {height}x{width} differs from the traced "
                f"{self.latent_height}x{self.latent_width}"
            )
        if self.batch_sizes is not None and batch not in self.batch_sizes:
            return f"batch size {batch} is not one of the traced batch sizes {self.batch_sizes}"
        text_length = text_embeddings.shape[1]
        if self.text_lengths is not None and text_length not in self.text_lengths:
            return f"text length {text_length} is not one of the traced lengths {self.text_lengths}"
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> TraceSignature:
        data: dict[str, Any] = json.loads(path.read_text())
        for key in ("batch_sizes", "text_lengths"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


# How riffusion-model-v1's own unet_traced.pt was traced: fp16 on CUDA, CFG batch 2,
# 512x512 images (64x64 latents), one 77-token CLIP window, a single fp16 timestep
# that the UNet expands to the batch (so a per-sample (2,) timestep also fits).
CHECKPOINT_TRACE_SIGNATURE = TraceSignature(
    device_type="cuda",
    dtype="float16",
    latent_height=64,
    latent_width=64,
    batch_sizes=(2,),
    text_lengths=(77,),
    timestep_dtype="float16",
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class EagerUNet(torch.nn.Module):
    """The diffusers UNet with positional inputs and a plain tensor output.

    Called directly it is the eager backend; it is also the form
    ``torch.jit.trace`` records.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        output: Tensor = self.unet(
            latents, timesteps, encoder_hidden_states=text_embeddings, return_dict=False
        )[0]
        return output


class ShapeCheckedTracedUNet:
    """Runs the TorchScript UNet for calls that fit its signature, the eager one otherwise."""

    def __init__(
        self,
        traced_module: torch.jit.ScriptModule,
        signature: TraceSignature,
        eager: EagerUNet,
        source: Path,
    ) -> None:
        self.traced_module = traced_module
        self.signature = signature
        self.eager = eager
        self.source = source
        self.traced_calls = 0
        self.eager_calls = 0
        self._timestep_dtype = getattr(torch, signature.timestep_dtype)
        self._reported: set[tuple[int, ...]] = set()

    def __call__(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        chunks = self._chunk_sizes(len(latents))
        reason = self.signature.mismatch(
            _pad_batch(latents[: chunks[0]], chunks[0]), text_embeddings
        )
        if reason is None:
            self.traced_calls += len(chunks)
            outputs, start = [], 0
            for size in chunks:
                end = min(start + size, len(latents))
                inputs = (latents[start:end], timesteps[start:end], text_embeddings[start:end])
                padded = [_pad_batch(tensor, size) for tensor in inputs]
                outputs.append(self._traced(*padded)[: end - start])
                start = end
            return torch.cat(outputs)
        shape_key = (*latents.shape, text_embeddings.shape[1])
        if shape_key not in self._reported:
            self._reported.add(shape_key)
            logger.warning(
                "traced UNet %s not used for this call: %s; running eager", self.source, reason
            )
        self.eager_calls += 1
        return self.eager(latents, timesteps, text_embeddings)

    def _traced(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        output = self.traced_module(latents, timesteps.to(self._timestep_dtype), text_embeddings)
        # The checkpoint's trace returns a 1-tuple; ours returns the tensor.
        return output[0] if isinstance(output, tuple | list) else output

    def _chunk_sizes(self, batch: int) -> list[int]:
        """Traced batch sizes that cover ``batch`` samples (the last one padded if needed).

        A trace made for fixed batch sizes (the checkpoint's: 2) still serves every batch
        the engine forms: largest fitting size first, the rest padded up to a traced size.
        """
        allowed = self.signature.batch_sizes
        if allowed is None or batch in allowed:
            return [batch]
        sizes, left = [], batch
        while left > 0:
            fitting = [size for size in allowed if size <= left]
            size = max(fitting) if fitting else min(allowed)
            sizes.append(size)
            left -= size
        return sizes


class BucketedUNet:
    """Pads every call's batch up to the next of a few sizes, so a compiled UNet sees few shapes.

    ``torch.compile`` specialises on shapes: without buckets, each new batch size the
    engine forms would recompile (minutes for the full UNet) on the hot path. Padding
    repeats the last sample; the UNet treats samples independently, so the real rows of
    the output are unchanged.
    """

    def __init__(self, forward: UNetFunction, max_batch: int = 64) -> None:
        self.forward = forward
        self.buckets = tuple(1 << i for i in range(max(1, max_batch - 1).bit_length() + 1))
        self.padded_calls = 0
        self.eager_calls = 0  # never falls back; kept for the fallback metric

    def bucket(self, batch: int) -> int:
        return next((size for size in self.buckets if size >= batch), batch)

    def __call__(self, latents: Tensor, timesteps: Tensor, text_embeddings: Tensor) -> Tensor:
        batch = len(latents)
        size = self.bucket(batch)
        if size != batch:
            self.padded_calls += 1
        output = self.forward(
            _pad_batch(latents, size),
            _pad_batch(timesteps, size),
            _pad_batch(text_embeddings, size),
        )
        return output[:batch]


def _pad_batch(tensor: Tensor, size: int) -> Tensor:
    """``tensor`` with its last row repeated until it has ``size`` rows."""
    missing = size - len(tensor)
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def backend_in_use(unet_forward: UNetFunction) -> UNetBackend:
    """Which backend ``prepare_unet`` actually returned (eager after a traced fallback)."""
    if isinstance(unet_forward, ShapeCheckedTracedUNet):
        return "traced"
    if isinstance(unet_forward, BucketedUNet):
        return "compiled"
    return "eager"


def prepare_unet(
    components: RiffusionComponents,
    backend: UNetBackend | str = "eager",
    *,
    traced_path: Path | str | None = None,
    compile_mode: str | None = None,
) -> UNetFunction:
    """The UNet as a callable for ``backend`` ("eager", "traced" or "compiled").

    ``traced``: the trace at ``traced_path`` (a ``.pt`` file or a directory holding
    ``unet_traced.pt``), else ``$RIFFUSION_TRACED_UNET``, else the model directory's
    ``unet_traced/unet_traced.pt`` (downloaded for hub models). Falls back to eager,
    with a logged warning naming the reason, when there is no usable trace.
    ``compiled``: ``torch.compile`` with ``compile_mode`` (default
    ``$RIFFUSION_COMPILE_MODE``, else torch's default mode).
    """
    if backend not in UNET_BACKENDS:
        raise ValueError(f"unknown UNet backend {backend!r}; choose one of {UNET_BACKENDS}")
    eager = EagerUNet(components.unet)
    if backend == "eager":
        return eager
    if backend == "compiled":
        mode = compile_mode or os.environ.get(COMPILE_MODE_ENV_VAR) or None
        logger.info("compiling the UNet with torch.compile (mode=%s)", mode or "default")
        compiled = EagerUNet(torch.compile(components.unet, mode=mode, dynamic=False))  # type: ignore[arg-type]
        return BucketedUNet(compiled)
    traced, reason = _load_traced(components, traced_path, eager)
    if traced is None:
        logger.warning("traced UNet backend unavailable: %s; falling back to eager", reason)
        return eager
    logger.info("using traced UNet %s (%s)", traced.source, traced.signature)
    return traced


def _find_trace_file(
    components: RiffusionComponents, traced_path: Path | str | None
) -> tuple[Path | None, str]:
    explicit = traced_path if traced_path is not None else os.environ.get(TRACED_UNET_ENV_VAR)
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            path = path / TRACED_UNET_FILE
        return (path, "") if path.is_file() else (None, f"no traced UNet file at {path}")
    if components.source_dir is not None:
        path = components.source_dir / TRACED_UNET_DIR / TRACED_UNET_FILE
        if path.is_file():
            return path, ""
        return None, (
            f"model directory {components.source_dir} has no {TRACED_UNET_DIR}/{TRACED_UNET_FILE} "
            "(create one with `riffusion trace-unet`)"
        )
    if components.is_tiny:
        return None, "the tiny model has no traced UNet (create one with `riffusion trace-unet`)"
    return _download_trace_file(components.model_id)


def _download_trace_file(model_id: str) -> tuple[Path | None, str]:
    from huggingface_hub import hf_hub_download

    try:
        downloaded = hf_hub_download(
            model_id,
            f"{TRACED_UNET_DIR}/{TRACED_UNET_FILE}",
            local_files_only=hub_offline(),
        )
    except Exception as error:  # any hub failure just means "no trace": eager still works
        return None, f"could not fetch {TRACED_UNET_DIR}/{TRACED_UNET_FILE} of {model_id}: {error}"
    return Path(downloaded), ""


def _load_traced(
    components: RiffusionComponents, traced_path: Path | str | None, eager: EagerUNet
) -> tuple[ShapeCheckedTracedUNet | None, str]:
    path, reason = _find_trace_file(components, traced_path)
    if path is None:
        return None, reason
    signature_path = path.parent / SIGNATURE_FILE
    try:
        signature = (
            TraceSignature.from_file(signature_path)
            if signature_path.is_file()
            else CHECKPOINT_TRACE_SIGNATURE
        )
    except (ValueError, TypeError) as error:
        return None, f"unreadable trace signature {signature_path}: {error}"
    device, dtype = components.device, _dtype_name(components.dtype)
    if (signature.device_type, signature.dtype) != (device.type, dtype):
        return None, (
            f"{path} was traced for {signature.device_type}/{signature.dtype} but the model "
            f"runs on {device.type}/{dtype}"
        )
    try:
        module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as error:
        return None, f"could not load {path} with torch.jit.load: {error}"
    module.eval()
    return ShapeCheckedTracedUNet(module, signature, eager, path), ""


def _example_inputs(
    components: RiffusionComponents,
    batch_size: int,
    latent_height: int,
    latent_width: int,
    text_length: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    unet_config = components.unet.config
    channels, text_dim = unet_config["in_channels"], unet_config["cross_attention_dim"]
    latents = torch.randn(batch_size, channels, latent_height, latent_width, generator=generator)
    # Distinct per-sample timesteps, so the trace must keep them per sample.
    timesteps = torch.linspace(999, 1, batch_size)
    text = torch.randn(batch_size, text_length, text_dim, generator=generator)
    device, dtype = components.device, components.dtype
    return (
        latents.to(device=device, dtype=dtype),
        timesteps.to(device),
        text.to(device=device, dtype=dtype),
    )


def trace_unet(
    components: RiffusionComponents,
    output: Path | str,
    *,
    height: int = 512,
    width: int = 512,
    trace_batch_size: int = 2,
    verify_batch_sizes: tuple[int, ...] = (1, 3),
    text_lengths: tuple[int, ...] = (77, 154, 231),
    tolerance: float | None = None,
) -> Path:
    """Trace the UNet for the components' device/dtype into ``output/unet_traced.pt``.

    Traced at batch ``trace_batch_size`` with a per-sample (B,) timestep, then checked
    against eager at ``verify_batch_sizes`` and every text length (max abs difference
    within ``tolerance`` times max(1, largest output)); the signature
    written next to it accepts any batch size and those text lengths at this image
    size. Raises :class:`TraceError` when the trace does not match eager.
    """
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8 pixels, got {height}x{width}")
    latent_height, latent_width = height // 8, width // 8
    if tolerance is None:
        tolerance = 1e-2 if components.dtype in (torch.float16, torch.bfloat16) else 1e-4
    eager = EagerUNet(components.unet).eval()
    generator = torch.Generator().manual_seed(0)
    example = _example_inputs(
        components, trace_batch_size, latent_height, latent_width, text_lengths[0], generator
    )
    with torch.no_grad(), warnings.catch_warnings():
        # Shape-dependent Python branches in diffusers warn while tracing; the checks
        # below are what decide whether the trace is right.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(eager, example, check_trace=False)
        # Pair the other batch sizes and text lengths up: every value is verified
        # at least once without running the cross product.
        batches = [*verify_batch_sizes, trace_batch_size]
        lengths = list(text_lengths)
        checks = [
            (batches[i % len(batches)], lengths[i % len(lengths)])
            for i in range(max(len(batches), len(lengths)))
        ]
        for batch, text_length in checks:
            inputs = _example_inputs(
                components, batch, latent_height, latent_width, text_length, generator
            )
            expected, actual = eager(*inputs), traced(*inputs)
            error = (actual.float() - expected.float()).abs().max().item()
            # Absolute for unit-scale outputs, relative for larger ones.
            allowed = tolerance * max(1.0, expected.float().abs().max().item())
            if not error <= allowed:
                raise TraceError(
                    f"traced UNet differs from eager by {error:.3g} (> {allowed:.3g}) at batch "
                    f"{batch}, text length {text_length}"
                )
    signature = TraceSignature(
        device_type=components.device.type,
        dtype=_dtype_name(components.dtype),
        latent_height=latent_height,
        latent_width=latent_width,
        batch_sizes=None,
        text_lengths=tuple(text_lengths),
        timestep_dtype="float32",
    )
    directory = Path(output)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TRACED_UNET_FILE
    torch.jit.save(traced, str(path))
    (directory / SIGNATURE_FILE).write_text(signature.to_json())
    logger.info("saved traced UNet to %s (%s)", path, signature)
    return path
