"""``riffusion trace-unet``: TorchScript-trace the UNet for this machine's device and dtype."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from riffusion.cli.errors import friendly_errors
from riffusion.cli.hub import prepare_hub_model
from riffusion.models import DEFAULT_MODEL_ID, MODEL_ENV_VAR, ModelLoadError, load_components
from riffusion.unet_backends import TRACED_UNET_DIR, TraceError, trace_unet

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@click.command("trace-unet")
@click.option(
    "--model",
    envvar=MODEL_ENV_VAR,
    default=DEFAULT_MODEL_ID,
    show_default=True,
    help="Hub id, local diffusers directory, or 'tiny' (env RIFFUSION_MODEL).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Directory for unet_traced.pt and signature.json "
    f"[default: MODEL/{TRACED_UNET_DIR} for a local model directory].",
)
@click.option("--device", default=None, help="cuda or cpu [default: cuda when available].")
@click.option(
    "--dtype",
    type=click.Choice(sorted(DTYPES)),
    default=None,
    help="[default: fp16 on CUDA, fp32 on CPU]",
)
@click.option("--height", type=int, default=512, show_default=True, help="Image height (px).")
@click.option("--width", type=int, default=512, show_default=True, help="Image width (px).")
def trace_unet_command(
    model: str,
    output: Path | None,
    device: str | None,
    dtype: str | None,
    height: int,
    width: int,
) -> None:
    """Trace the UNet (any batch size, per-sample timesteps) and verify it against eager.

    Use it with the traced backend by saving into MODEL/unet_traced/ or by pointing
    RIFFUSION_TRACED_UNET at the output directory.
    """
    if output is None:
        if not Path(model).is_dir():
            raise click.UsageError("--output is required unless --model is a local directory")
        output = Path(model) / TRACED_UNET_DIR
    if height % 8 or width % 8:
        raise click.BadParameter(
            f"height and width must be multiples of 8 pixels, got {height}x{width}",
            param_hint="--height/--width",
        )
    with friendly_errors(ModelLoadError):
        note = prepare_hub_model(model)
        if note is not None:
            click.echo(note, err=True)
        components = load_components(
            model, device=device, dtype=DTYPES[dtype] if dtype is not None else None
        )
    click.echo(
        f"tracing the UNet of {components.model_id}"
        f"{' (TINY test model)' if components.is_tiny else ''} on "
        f"{components.device}/{str(components.dtype).removeprefix('torch.')} at {width}x{height}"
    )
    with friendly_errors(TraceError):
        path = trace_unet(components, output, height=height, width=width)
    click.echo(f"saved {path}")
