"""The ``riffusion`` command starts fast: commands are imported only when they run.

``--help`` and ``print-exif`` import no torch; the audio commands no diffusers or
transformers. Checked on ``sys.modules`` in a fresh interpreter (start-up times
themselves are in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from riffusion.cli import COMMANDS, cli
from riffusion.seed_images import SEED_IMAGES_DIR

HEAVY = ("torch", "diffusers", "transformers")


def modules_after(args: list[str]) -> tuple[int, str, set[str]]:
    """Run ``riffusion ARGS`` in a fresh interpreter; (exit code, output, heavy modules loaded)."""
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from riffusion.cli import cli\n"
        f"result = CliRunner().invoke(cli, {args!r})\n"
        f"loaded = [name for name in {HEAVY!r} if name in sys.modules]\n"
        "print(json.dumps([result.exit_code, result.output, loaded]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    code, output, loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    return code, output, set(loaded)


def test_help_imports_no_torch_and_lists_every_command() -> None:
    code, output, loaded = modules_after(["--help"])
    assert code == 0 and loaded == set()
    for name in COMMANDS:
        assert name in output


def test_print_exif_imports_no_torch() -> None:
    code, output, loaded = modules_after(["print-exif", str(SEED_IMAGES_DIR / "og_beat.png")])
    assert code == 0, output
    assert loaded == set()
    assert "max_value" in output and "44100" in output


@pytest.mark.parametrize("command", ["audio-to-image", "seed-images"])
def test_audio_commands_import_no_diffusion_libraries(command: str) -> None:
    args = [command] if command == "seed-images" else [command, "--help"]
    code, output, loaded = modules_after(args)
    assert code == 0, output
    assert "diffusers" not in loaded and "transformers" not in loaded


def test_listed_summaries_are_the_commands_own() -> None:
    """The lazy table's summaries (shown by --help) match each command's docstring."""
    context = click.Context(cli)
    for name, lazy in COMMANDS.items():
        command = cli.get_command(context, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(limit=1000) == lazy.summary, name


def test_unknown_command_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "riffusion.cli", "no-such-command"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "No such command" in result.stderr


def test_old_units_are_explained_by_print_exif(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (8, 512))
    exif = image.getexif()
    exif[11080] = 1428.25  # an image from before the switch to riffusion's units
    image.save(tmp_path / "old.png", exif=exif)
    code, output, _ = modules_after(["print-exif", str(tmp_path / "old.png")])
    assert code == 0 and "4.68009e+07 in riffusion's units" in output
