"""`bentoml build` offline with the tiny model, into a throwaway BentoML home."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).parent / "bentoml"
PIN_RE = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        match = PIN_RE.match(line.strip())
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _offline_env(tmp_path: Path, model: str) -> dict[str, str]:
    return {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "RIFFUSION_MODEL": model,
    }


@pytest.fixture(scope="module")
def bento_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("bento_build")
    result = subprocess.run(
        [str(BENTOML), "build", "-o", "tag"],
        cwd=ROOT,
        env=_offline_env(tmp_path, "tiny"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"__tag__:(\S+):(\S+)", result.stdout)
    assert match, result.stdout
    name, version = match.groups()
    path = tmp_path / "bentoml" / "bentos" / name / version
    assert path.is_dir()
    return path


def test_dockerfile_installs_the_pinned_requirements(bento_dir: Path) -> None:
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile
    assert "FROM python:3.11" in dockerfile
    assert "ENV RIFFUSION_MODEL=$RIFFUSION_MODEL" in dockerfile

    installed = _pins((bento_dir / "env" / "python" / "requirements.txt").read_text())
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {_normalise(p["name"]): p["version"] for p in lock["package"] if "version" in p}
    for package in ("torch", "torchaudio", "diffusers", "transformers", "bentoml", "soundfile"):
        assert installed[package] == locked[package], package
    # Every pin agrees with uv.lock (the requirements file is regenerated from it).
    mismatched = {
        name: (version, locked.get(name))
        for name, version in installed.items()
        if locked.get(name) != version
    }
    assert not mismatched


def test_bento_contents_and_services(bento_dir: Path) -> None:
    src = bento_dir / "src"
    for path in ("service.py", "riffusion/pipeline.py", "riffusion/api_schemas.py"):
        assert (src / path).is_file(), path
    assert (src / "seed_images" / "manifest.json").is_file()
    assert (src / "seed_images" / "og_beat.png").is_file()
    assert not (src / "tests").exists()

    info: dict[str, Any] = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "service:Riffusion"
    assert info["models"] == []  # tiny: nothing to pack, so the build needs no network
    services = {s["name"]: s for s in info["services"]}
    assert services["riffusion"]["dependencies"] == [{"service": "riffusion_model"}]
    model_config = services["riffusion_model"]["config"]
    assert model_config["resources"] == {"gpu": 1, "gpu_type": "nvidia-a10g"}
    assert model_config["workers"] == 1
    assert "gpu" not in services["riffusion"]["config"].get("resources", {})
    assert services["riffusion"]["config"]["http"]["cors"]["enabled"] is True
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert envs["RIFFUSION_MODEL"] == "tiny"  # the model it was built for, not a hub id
    routes = {r["route"] for r in info["schema"]["routes"]}
    assert {"/run_inference/", "/text_to_audio", "/audio_to_audio", "/interpolate"} <= routes


def _containerfile(bento_dir: Path) -> str:
    """The Dockerfile `bentoml containerize` builds the image from (BentoML's own API)."""
    from bentoml._internal.bento.bento import Bento
    from bentoml._internal.container import construct_containerfile

    with construct_containerfile(Bento.from_path(bento_dir)) as (_context, path):
        return Path(path).read_text()


def _image_defaults(dockerfile: str) -> dict[str, str]:
    """``ARG NAME=default`` of the Dockerfile; BentoML sets ``ENV NAME=$NAME`` from each."""
    return dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, flags=re.MULTILINE))


def test_image_env_of_a_tiny_build(bento_dir: Path) -> None:
    dockerfile = _containerfile(bento_dir)
    defaults = _image_defaults(dockerfile)
    image_env = set(re.findall(r"^ENV (\w+)=", dockerfile, flags=re.MULTILINE))
    assert "FROM python:3.11-slim" in dockerfile
    # A tiny build runs tiny: the hub id is not baked into its image.
    assert defaults["RIFFUSION_MODEL"] == "tiny"
    assert "riffusion/riffusion-model-v1" not in dockerfile
    # The model service requires the GPU unless RIFFUSION_DEVICE=cpu is set at run time.
    assert defaults["RIFFUSION_DEVICE"] == "cuda"
    assert {"RIFFUSION_MODEL", "RIFFUSION_DEVICE"} <= image_env
    # Every image requires an API key unless RIFFUSION_AUTH=optional is set at run time.
    assert defaults["RIFFUSION_AUTH"] == "required"
    # GPU visibility is the runtime's job (device plugin, `docker run --gpus`).
    assert "NVIDIA_VISIBLE_DEVICES" not in dockerfile
    # Hub downloads go to BENTOML_HF_CACHE_DIR, which the image points inside the Bento:
    # the Kubernetes Deployment moves it onto its cache volume (tests/test_deploy.py).
    assert "BENTOML_HF_CACHE_DIR" in image_env


@pytest.mark.parametrize(
    ("model", "declared"),
    [("riffusion/riffusion-model-v1", ["riffusion/riffusion-model-v1"]), ("tiny", [])],
)
def test_hub_model_declared_only_for_hub_ids(tmp_path: Path, model: str, declared: list) -> None:
    """A hub id is declared on the model service (so a networked build packs it); tiny is not.

    The Bento's RIFFUSION_MODEL is the model it is built for.
    """
    script = (
        "import service\n"
        "print({e.name: e.value for e in service.Riffusion.envs}['RIFFUSION_MODEL'])\n"
        "print([m.model_id for m in service.RiffusionModel.models])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=_offline_env(tmp_path, model),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    *_, baked_model, declared_models = result.stdout.strip().splitlines()
    assert baked_model == model
    assert declared_models == repr(declared)


def test_serve_without_the_checkpoint_fails_in_one_line(tmp_path: Path) -> None:
    """`make serve` offline with the default model: one ModelLoadError line naming the fix."""
    from load_tests.server import free_port

    env = {
        **_offline_env(tmp_path, "riffusion/riffusion-model-v1"),
        "BENTOML_HF_CACHE_DIR": str(tmp_path / "empty-hf-cache"),
    }
    command = [str(BENTOML), "serve", "service:Riffusion", "--host", "127.0.0.1"]
    result = subprocess.run(
        [*command, "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "ModelLoadError" in output and "riffusion/riffusion-model-v1" in output
    assert "RIFFUSION_MODEL=tiny" in output and "HF_HUB_OFFLINE" in output


def test_serve_without_a_required_key_refuses_to_start(tmp_path: Path) -> None:
    """RIFFUSION_AUTH=required (the Bento's and the manifests' setting) without a key: the
    server stops before it listens, in one line naming both settings; never open access."""
    from load_tests.server import free_port

    env = {**_offline_env(tmp_path, "tiny"), "RIFFUSION_AUTH": "required"}
    env.pop("RIFFUSION_API_KEY", None)
    command = [str(BENTOML), "serve", "service:Riffusion", "--host", "127.0.0.1"]
    result = subprocess.run(
        [*command, "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "RIFFUSION_AUTH=required" in output and "RIFFUSION_API_KEY" in output
