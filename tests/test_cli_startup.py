"""The ``riffusion`` command starts fast: each command imports only what its work uses.

Checked on ``sys.modules`` in a fresh interpreter after really running each
command without a model: none imports the model's libraries (diffusers,
transformers, the hub client, pydantic, bentoml) or the seed-library
synthesiser; ``--help``, ``print-exif``, ``seed-images`` and ``sample-clips``
import no torch. A long command given a wrong input (a missing file, an output
suffix no format matches, a model that cannot be loaded) says so in one line before
it imports torch or any model library: the error is immediate. Start-up times
themselves: ``bench/bench_cli_startup.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

from riffusion.audio import Audio, write_audio
from riffusion.cli import COMMANDS, cli
from riffusion.seed_images import SEED_IMAGES_DIR

# Only the generation commands (and trace-unet) may import these.
MODEL_ONLY = (
    "diffusers",
    "transformers",
    "huggingface_hub",
    "bentoml",
    "pydantic",
    "scipy",
    "riffusion.pipeline",
    "riffusion.models",
)
TORCH = ("torch", "torchaudio")
# Listing, help and print-exif need none of the numeric stack.
NUMERIC = (*TORCH, "numpy", "soundfile", "soxr")
# What makes the seed library: only make-seed-images needs it, and only when it runs.
SYNTHESIS = ("riffusion.seed_image_synthesis", "riffusion.loop_synth")
MODEL_COMMAND_MODULES = {"riffusion.cli.model_commands", "riffusion.cli.trace_commands"}
WATCHED = (*MODEL_ONLY, *NUMERIC, *SYNTHESIS, "PIL", "rich.progress")


def modules_after(
    *invocations: list[str], expect_success: bool = True
) -> tuple[list[tuple[int, str]], set[str]]:
    """Run ``riffusion ARGS`` for each invocation in one fresh interpreter.

    Returns each (exit code, output) and which of :data:`WATCHED` were imported by then.
    """
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from riffusion.cli import cli\n"
        f"results = [CliRunner().invoke(cli, args) for args in {list(invocations)!r}]\n"
        f"loaded = [name for name in {WATCHED!r} if name in sys.modules]\n"
        "print(json.dumps([[[r.exit_code, r.output] for r in results], loaded]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    results, loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    for code, output in results:
        assert (code == 0) == expect_success, output
    return [(code, output) for code, output in results], set(loaded)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short wav (alone in audio/) and a narrow spectrogram: the work stays small."""
    folder = tmp_path_factory.mktemp("startup")
    (folder / "audio").mkdir()
    t = np.arange(round(0.6 * 44100)) / 44100
    samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None, :]
    write_audio(Audio(samples, 44100), folder / "audio" / "tone.wav")
    with Image.open(SEED_IMAGES_DIR / "og_beat.png") as image:
        image.crop((0, 0, 32, image.height)).save(folder / "narrow.png", exif=image.getexif())
    return folder


def tool_invocations(folder: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """Each non-model command as it really runs, with the modules it must not import."""
    out = folder / "out"
    wav, image = str(folder / "audio" / "tone.wav"), str(folder / "narrow.png")
    return {
        "print-exif": (["print-exif", image], (*MODEL_ONLY, *NUMERIC, *SYNTHESIS)),
        "seed-images": (["seed-images"], (*MODEL_ONLY, *NUMERIC, *SYNTHESIS, "PIL")),
        "sample-clips": (
            ["sample-clips", wav, str(out / "clips"), "--num-clips", "2", "--duration", "0.2"],
            (*MODEL_ONLY, *TORCH, *SYNTHESIS, "PIL"),
        ),
        # Its module only: running it regenerates the whole library (test_seed_images).
        "make-seed-images": (["make-seed-images", "--help"], (*MODEL_ONLY, *NUMERIC, *SYNTHESIS)),
        "audio-to-image": (
            ["audio-to-image", wav, str(out / "tone.png"), "--device", "cpu"],
            (*MODEL_ONLY, *SYNTHESIS),
        ),
        "image-to-audio": (
            ["image-to-audio", image, str(out / "narrow.wav"), "--device", "cpu"],
            (*MODEL_ONLY, *SYNTHESIS),
        ),
        "audio-to-images": (
            ["audio-to-images", str(folder / "audio"), str(out / "images"), "--device", "cpu"],
            (*MODEL_ONLY, *SYNTHESIS),
        ),
    }


def test_every_tool_command_is_checked(inputs: Path) -> None:
    """A new command without a model must be added to the import checks below."""
    tools = {name for name, lazy in COMMANDS.items() if lazy.module not in MODEL_COMMAND_MODULES}
    assert tools == set(tool_invocations(inputs))


def test_help_imports_only_click_and_lists_every_command() -> None:
    [(_, output)], loaded = modules_after(["--help"])
    assert loaded == set()
    for name in COMMANDS:
        assert name in output


@pytest.mark.parametrize(
    "command", ["print-exif", "seed-images", "sample-clips", "make-seed-images"]
)
def test_commands_without_torch_import_none_of_it(inputs: Path, command: str) -> None:
    args, forbidden = tool_invocations(inputs)[command]
    _, loaded = modules_after(args)
    assert not loaded & set(forbidden), f"{command} imported {sorted(loaded & set(forbidden))}"


def test_spectrogram_commands_import_torch_but_nothing_of_the_model(inputs: Path) -> None:
    """audio-to-image and image-to-audio run in one interpreter (one torch import): what
    both imported must hold none of the model's libraries; so must audio-to-images."""
    invocations = tool_invocations(inputs)
    names = ("audio-to-image", "image-to-audio")
    results, loaded = modules_after(*(invocations[name][0] for name in names))
    assert {"torch", "torchaudio", "PIL"} <= loaded
    for name in names:
        forbidden = set(invocations[name][1])
        assert not loaded & forbidden, f"{name}: {sorted(loaded & forbidden)}"
    assert "wrote" in results[1][1]
    _, loaded_with_progress = modules_after(invocations["audio-to-images"][0])
    assert not loaded_with_progress & set(invocations["audio-to-images"][1])


def wrong_inputs(folder: Path) -> dict[str, list[str]]:
    """A mistake in each long command's input, and the words its one-line error must have."""
    wav, image = str(folder / "audio" / "tone.wav"), str(folder / "narrow.png")
    missing, out = str(folder / "missing.wav"), folder / "wrong_out"
    no_model = ["--model", str(folder / "no-such-model"), "--steps", "1"]
    return {
        "missing audio": ["audio-to-image", missing, str(out / "a.png")],
        "image output not png": ["audio-to-image", wav, str(out / "a.jpg")],
        "missing image": ["image-to-audio", str(folder / "missing.png"), str(out / "a.wav")],
        "audio output suffix": ["image-to-audio", image, str(out / "a.xyz")],
        "missing folder": ["audio-to-images", str(folder / "missing"), str(out / "images")],
        "missing riff input": ["riff", missing, "-o", str(out / "r.wav"), "--prompt", "x"],
        "riff output suffix": ["riff", wav, "-o", str(out / "r.xyz"), "--prompt", "x"],
        "riff model": ["riff", wav, "-o", str(out / "r.wav"), "--prompt", "x", *no_model],
        "text model": ["text-to-audio", "bells", "-o", str(out / "t.wav"), *no_model],
        "text output suffix": ["text-to-audio", "bells", "-o", str(out / "t.xyz")],
        "unknown seed image": [
            "interpolate",
            *("-o", str(out / "i.wav"), "--start-prompt", "a", "--end-prompt", "b"),
            *("--seed-image-id", "no_such_seed"),
        ],
        "interpolate model": [
            "interpolate",
            *("-o", str(out / "i.wav"), "--start-prompt", "a", "--end-prompt", "b"),
            *no_model,
        ],
    }


def test_a_wrong_input_is_reported_before_torch_is_imported(inputs: Path) -> None:
    """All in one interpreter: by the end, not one mistake had imported torch or diffusers."""
    cases = wrong_inputs(inputs)
    results, loaded = modules_after(*cases.values(), expect_success=False)
    assert not loaded & {*TORCH, *MODEL_ONLY} - {"pydantic"}, sorted(loaded)
    for name, (code, output) in zip(cases, results, strict=True):
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert code in (1, 2) and "Traceback" not in output, (name, output)
        assert len(errors) == 1, (name, output)
        assert not (inputs / "wrong_out").exists(), name  # nothing written before the check
    assert "model directory" in results[list(cases).index("riff model")][1]


def test_cli_defaults_match_the_library() -> None:
    from riffusion.cli.model_commands import GRIFFIN_LIM_ITERS
    from riffusion.spectrogram import SpectrogramParams

    assert SpectrogramParams().num_griffin_lim_iters == GRIFFIN_LIM_ITERS


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
    image = Image.new("RGB", (8, 512))
    exif = image.getexif()
    exif[11080] = 1428.25  # an image from before the switch to riffusion's units
    image.save(tmp_path / "old.png", exif=exif)
    [(_, output)], _ = modules_after(["print-exif", str(tmp_path / "old.png")])
    assert "4.68009e+07 in riffusion's units" in output
