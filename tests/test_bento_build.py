"""`bentoml build` offline with the tiny model, into a throwaway BentoML home."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BuiltBento:
    path: Path  # the Bento's folder in its BentoML home
    home: Path  # what BENTOML_HOME was for the build (its model store holds the checkpoint)
    checkpoint_tag: str  # the model-store tag the Bento was built with
    saved_model: Path  # the local diffusers directory the checkpoint was made from


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltBento:
    """A Bento built offline from a locally saved (tiny) checkpoint, as deploy/README.md says:
    ``python -m serving.checkpoint DIR`` then ``RIFFUSION_MODEL=<tag> bentoml build``."""
    from riffusion.models import build_tiny_components, save_components

    tmp_path = tmp_path_factory.mktemp("bento_build")
    saved_model = tmp_path / "saved-model"
    save_components(build_tiny_components(seed=0, device="cpu"), saved_model)
    saved = subprocess.run(
        [sys.executable, "-m", "serving.checkpoint", str(saved_model)],
        cwd=ROOT,
        env=_offline_env(tmp_path, "tiny"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert saved.returncode == 0, saved.stderr
    tag = saved.stdout.strip().splitlines()[-1]
    assert tag.startswith("riffusion-checkpoint:"), saved.stdout
    result = subprocess.run(
        [str(BENTOML), "build", "-o", "tag"],
        cwd=ROOT,
        env=_offline_env(tmp_path, tag),
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
    return BuiltBento(path, tmp_path / "bentoml", tag, saved_model)


@pytest.fixture(scope="module")
def bento_dir(built: BuiltBento) -> Path:
    return built.path


def test_dockerfile_installs_the_pinned_requirements(bento_dir: Path) -> None:
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "env/python/install.sh" in dockerfile
    install = (bento_dir / "env" / "python" / "install.sh").read_text()
    assert '-r "$REQUIREMENTS_TXT"' in install
    # No lock file of BentoML's making would take precedence over the pinned file.
    assert not (bento_dir / "env" / "python" / "requirements.lock.txt").exists()
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


def test_every_pinned_package_installs_from_a_wheel() -> None:
    """The image has no compilers (deploy/Dockerfile.template): every package the Bento
    installs must have a Linux x86_64 wheel for CPython 3.11 (or a pure-Python one)."""
    from packaging.requirements import Requirement

    image_python = {"python_version": "3.11", "python_full_version": "3.11.0"}
    image_platform = {"sys_platform": "linux", "platform_machine": "x86_64", **image_python}
    pins = {}
    for line in (ROOT / "deploy" / "bento-requirements.txt").read_text().splitlines():
        if PIN_RE.match(line.strip()):
            requirement = Requirement(line.strip())
            if requirement.marker is None or requirement.marker.evaluate(image_platform):
                pins[_normalise(requirement.name)] = str(requirement.specifier).removeprefix("==")
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    wheels = {
        _normalise(p["name"]): [Path(w["url"]).name for w in p.get("wheels", [])]
        for p in lock["package"]
        if p.get("version") == pins.get(_normalise(p["name"]))
    }
    assert set(wheels) == set(pins)

    def installable(name: str) -> bool:
        tags = [w.removesuffix(".whl").split("-")[-3:] for w in wheels[name]]
        return any(
            ("py3" in python or "cp311" in python or "abi3" in abi)
            and (platform == "any" or ("linux" in platform and "x86_64" in platform))
            for python, abi, platform in tags
        )

    assert [name for name in pins if not installable(name)] == []


def test_bento_contents_and_services(built: BuiltBento) -> None:
    bento_dir = built.path
    src = bento_dir / "src"
    for path in ("service.py", "riffusion/pipeline.py", "riffusion/api_schemas.py"):
        assert (src / path).is_file(), path
    assert (src / "seed_images" / "manifest.json").is_file()
    assert (src / "seed_images" / "og_beat.png").is_file()
    assert not (src / "tests").exists()

    info: dict[str, Any] = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "service:Riffusion"
    # The model service declares the checkpoint the Bento was built with (offline).
    services_models = {s["name"]: [m["tag"] for m in s["models"]] for s in info["services"]}
    assert services_models == {"riffusion": [], "riffusion_model": [built.checkpoint_tag]}
    services = {s["name"]: s for s in info["services"]}
    assert services["riffusion"]["dependencies"] == [{"service": "riffusion_model"}]
    model_config = services["riffusion_model"]["config"]
    assert model_config["resources"] == {"gpu": 1, "gpu_type": "nvidia-a10g"}
    assert model_config["workers"] == 1
    assert "gpu" not in services["riffusion"]["config"].get("resources", {})
    assert services["riffusion"]["config"]["http"]["cors"]["enabled"] is True
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert envs["RIFFUSION_MODEL"] == built.checkpoint_tag  # the model it was built for
    routes = {r["route"] for r in info["schema"]["routes"]}
    assert {"/run_inference/", "/text_to_audio", "/audio_to_audio", "/interpolate"} <= routes


def _containerfile(image_root: Path) -> str:
    """The Dockerfile `bentoml containerize` builds the image from (see ``image_root``)."""
    return (image_root / "env" / "docker" / "Dockerfile").read_text()


def _image_defaults(dockerfile: str) -> dict[str, str]:
    """``ARG NAME=default`` of the Dockerfile; BentoML sets ``ENV NAME=$NAME`` from each."""
    return dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, flags=re.MULTILINE))


@pytest.fixture(scope="module")
def image_root(built: BuiltBento, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `bentoml containerize` copies into the image as $BENTO_PATH: its build context,
    made by BentoML's own construct_containerfile against the build's model store."""
    workdir = tmp_path_factory.mktemp("image")
    target = workdir / "bento"
    # BentoML 1.4 reads a dockerfile_template only from below the working directory,
    # and builds in a temporary folder: run with TMPDIR below it (as README says).
    (workdir / "tmp").mkdir()
    script = (
        "import shutil, sys\n"
        "from bentoml._internal.bento.bento import Bento\n"
        "from bentoml._internal.container import construct_containerfile\n"
        "with construct_containerfile(Bento.from_path(sys.argv[1])) as (context, _):\n"
        "    shutil.copytree(context, sys.argv[2], symlinks=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(built.path), str(target)],
        cwd=workdir,
        env={
            **_offline_env(built.home.parent, built.checkpoint_tag),
            "TMPDIR": str(workdir / "tmp"),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return target


def test_image_carries_the_checkpoint_files(built: BuiltBento, image_root: Path) -> None:
    """The image's Bento has its own model store holding the saved checkpoint, file for file."""
    name, version = built.checkpoint_tag.split(":")
    packed = image_root / "models" / name / version
    source_files = sorted(p.relative_to(built.saved_model) for p in built.saved_model.rglob("*"))
    assert source_files and all((packed / f).exists() for f in source_files)
    for weights in built.saved_model.rglob("*.safetensors"):
        target = packed / weights.relative_to(built.saved_model)
        assert target.read_bytes() == weights.read_bytes()


def test_image_env_of_a_checkpoint_build(built: BuiltBento, image_root: Path) -> None:
    dockerfile = _containerfile(image_root)
    defaults = _image_defaults(dockerfile)
    image_env = set(re.findall(r"^ENV (\w+)=", dockerfile, flags=re.MULTILINE))
    assert "FROM python:3.11-slim" in dockerfile
    # No compilers or system packages (deploy/Dockerfile.template): every package is a wheel.
    for absent in ("apt-get", "build-essential", "git", "gcc", "curl"):
        assert absent not in dockerfile, absent
    # The image runs the checkpoint it carries: the hub id is not baked into it.
    assert defaults["RIFFUSION_MODEL"] == built.checkpoint_tag
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
    from load_tests.server import refused_start

    env = {
        **_offline_env(tmp_path, "riffusion/riffusion-model-v1"),
        "BENTOML_HF_CACHE_DIR": str(tmp_path / "empty-hf-cache"),
    }
    output = refused_start(ROOT, env)
    assert "ModelLoadError" in output and "riffusion/riffusion-model-v1" in output
    assert "RIFFUSION_MODEL=tiny" in output and "HF_HUB_OFFLINE" in output


def test_serve_without_a_required_key_refuses_to_start(tmp_path: Path) -> None:
    """RIFFUSION_AUTH=required (the Bento's and the manifests' setting) without a key: the
    server stops before it listens, in one line naming both settings; never open access."""
    from load_tests.server import refused_start

    env = {**_offline_env(tmp_path, "tiny"), "RIFFUSION_AUTH": "required"}
    env.pop("RIFFUSION_API_KEY", None)
    output = refused_start(ROOT, env)
    assert "RIFFUSION_AUTH=required" in output and "RIFFUSION_API_KEY" in output


def test_bento_serves_its_checkpoint_with_the_hub_unreachable(
    built: BuiltBento, image_root: Path, tmp_path: Path
) -> None:
    """As the image runs it (its Dockerfile's ENV), with the hub unreachable and nothing
    writable but TMPDIR: the model service loads the checkpoint packed in the Bento,
    answers a clip, and the server logs the line that says it is ready."""
    import httpx

    from load_tests.server import free_port, log_tail, stop_process_group

    key = "bento-test-key"
    home = tmp_path / "home"  # empty: the checkpoint can only come from the Bento itself
    home.mkdir()
    # Short: BentoML puts its unix sockets there, and their paths have a length limit.
    writable = Path(tempfile.mkdtemp(prefix="riff-"))
    env = {
        **os.environ,
        **_image_defaults(_containerfile(image_root)),
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "RIFFUSION_DEVICE": "cpu",  # the image says cuda; this machine has no GPU
        "RIFFUSION_API_KEY": key,
        "TMPDIR": str(writable),
    }
    read_only = [home, *image_root.rglob("*"), image_root]
    for path in read_only:
        path.chmod(path.stat().st_mode & ~0o222)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    command = [str(BENTOML), "serve", str(image_root), "--host", "127.0.0.1", "--port", str(port)]
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 600
            while not _ready(url):
                assert process.poll() is None, log_tail(log_path)
                assert time.monotonic() < deadline, log_tail(log_path)
                time.sleep(0.5)
            headers = {"Authorization": f"Bearer {key}"}
            assert httpx.get(f"{url}/model_info", timeout=30).status_code == 401
            info = httpx.get(f"{url}/model_info", headers=headers, timeout=30).json()
            assert info["is_tiny"] is True
            assert Path(info["source_dir"]).is_relative_to(image_root / "models"), info
            body = {"prompt": "slow piano", "seed": 1, "num_inference_steps": 2, "duration_s": 0.64}
            clip = httpx.post(f"{url}/text_to_audio", json=body, headers=headers, timeout=300)
            assert clip.status_code == 200, clip.text
            assert "Riffusion ready: model" in log_path.read_text(errors="replace")
        finally:
            stop_process_group(process)
    finally:
        for path in read_only:
            path.chmod(path.stat().st_mode | 0o200)
        shutil.rmtree(writable, ignore_errors=True)


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_hub_checkpoint_must_be_pinned_to_a_commit() -> None:
    """What a hub build records: refused unless RIFFUSION_MODEL_REVISION is a commit;
    a pinned commit is recorded as is, without asking the hub (offline here)."""
    from serving.checkpoint import CheckpointUnavailable, HubCheckpoint

    with pytest.raises(CheckpointUnavailable, match="RIFFUSION_MODEL_REVISION"):
        HubCheckpoint("riffusion/riffusion-model-v1").to_info()
    with pytest.raises(CheckpointUnavailable, match="RIFFUSION_MODEL_REVISION"):
        HubCheckpoint("riffusion/riffusion-model-v1", revision="v1.0").to_info()
    commit = "0123456789abcdef0123456789abcdef01234567"
    info = HubCheckpoint("riffusion/riffusion-model-v1", revision=commit).to_info()
    assert info.metadata["revision"] == commit


def test_hub_build_without_a_pinned_revision_is_refused(tmp_path: Path) -> None:
    """`bentoml build` with a hub id and no RIFFUSION_MODEL_REVISION stops, naming it."""
    env = _offline_env(tmp_path, "riffusion/riffusion-model-v1")
    env.pop("RIFFUSION_MODEL_REVISION", None)
    result = subprocess.run(
        [str(BENTOML), "build", "-o", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "RIFFUSION_MODEL_REVISION" in output and "__tag__" not in output
