"""Deployment files: the manifests as `kubectl kustomize` renders them, validated against the
offline Kubernetes API schemas; the prometheus-adapter values; the BentoCloud config."""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import attr
import kubernetes_validate
import pytest
import yaml

from load_tests.server import LocalServer, executable
from tests.shared_servers import SHARED_API_KEY as API_KEY

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
K8S_VERSIONS = ("1.30.0", "1.33.0")
# Kinds of custom resources (kube-prometheus-stack): not in the core API schemas.
CUSTOM_KINDS = {"PodMonitor"}
AUTOSCALING_METRIC = "riffusion_clips_in_flight"


@cache
def _rendered() -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k deploy/kubernetes` would send to the cluster."""
    result = subprocess.run(
        [executable("kubectl"), "kustomize", str(K8S_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _manifests() -> dict[str, dict[str, Any]]:
    """Rendered objects by kind and name; the generated ConfigMap keyed without its hash."""
    manifests = {}
    for doc in _rendered():
        name = doc["metadata"]["name"]
        if doc["kind"] == "ConfigMap":
            name = re.sub(r"-[a-z0-9]{10}$", "", name)
        manifests[f"{doc['kind']}/{name}"] = doc
    return manifests


def _deployment() -> dict[str, Any]:
    return _manifests()["Deployment/riffusion"]


def _container() -> dict[str, Any]:
    [container] = _deployment()["spec"]["template"]["spec"]["containers"]
    return container


def _config() -> dict[str, str]:
    return _manifests()["ConfigMap/riffusion-config"]["data"]


def _service_names() -> set[str]:
    """``name=`` of every @bentoml.service in service.py (read without importing it)."""
    tree = ast.parse((ROOT / "service.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "service":
            for keyword in node.keywords:
                if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                    names.add(str(keyword.value.value))
    return names


def test_kustomization_uses_every_file() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    used = set(kustomization["resources"])
    used |= {env for generator in kustomization["configMapGenerator"] for env in generator["envs"]}
    on_disk = {p.name for p in K8S_DIR.iterdir()} - {"kustomization.yaml"}
    assert used == on_disk
    kinds = {doc["kind"] for doc in _rendered()}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PodMonitor",
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_against_kubernetes_schema(version: str) -> None:
    for doc in _rendered():
        if doc["kind"] not in CUSTOM_KINDS:
            # strict: unknown fields (typos) fail too.
            kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    """The validator is not vacuous: a misspelt field and a wrong type are rejected."""
    deployment = _deployment()
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[0], strict=True)


def test_config_map_name_has_a_content_hash() -> None:
    """An edit to config.env renames the ConfigMap, so the Deployment's pods roll."""
    [config] = [doc for doc in _rendered() if doc["kind"] == "ConfigMap"]
    assert re.fullmatch(r"riffusion-config-[a-z0-9]{10}", config["metadata"]["name"])
    [env_from] = _container()["envFrom"]
    assert env_from["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["RIFFUSION_MODEL"] == "riffusion/riffusion-model-v1"
    assert config["data"]["RIFFUSION_DEVICE"] == "cuda"


def test_image_has_a_registry_and_an_immutable_tag() -> None:
    container = _container()
    repository, _, tag = container["image"].rpartition(":")
    registry = repository.split("/")[0]
    assert "/" in repository and ("." in registry or ":" in registry), container["image"]
    assert tag and tag != "latest" and "@" not in tag
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_gpu_request_and_node_selection() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    container = _container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "A10G" in pod["nodeSelector"]["nvidia.com/gpu.product"]
    # GPU visibility comes from the device plugin, never from a baked-in variable.
    env_names = {e["name"] for e in container.get("env", [])} | set(_config())
    assert "NVIDIA_VISIBLE_DEVICES" not in env_names


def test_probes_follow_the_health_contract() -> None:
    container = _container()
    port_names = {p["name"] for p in container["ports"]}
    startup, liveness, readiness = (
        container[probe] for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    )
    # Startup waits for the model (checkpoint download + load) on /readyz, then
    # liveness watches /livez, which fails when the model service stays down.
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert liveness["httpGet"]["path"] == "/livez"
    assert readiness["httpGet"]["path"] == "/readyz"
    for probe in (startup, liveness, readiness):
        assert probe["httpGet"]["port"] in port_names
        # The probe routes answer within 100 ms in every state.
        assert 1 <= probe["timeoutSeconds"] <= 5


def test_shutdown_outlasts_the_longest_request() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    container = _container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    request_timeout_s = float(_config()["RIFFUSION_REQUEST_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + request_timeout_s + 10


def test_checkpoint_cache_is_on_the_volume_with_storage_requested() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    container = _container()
    env = {e["name"]: e.get("value") for e in container["env"]}
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "hf-cache"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "hf-cache"]
    assert "emptyDir" in volume
    # BentoML downloads hub checkpoints into BENTOML_HF_CACHE_DIR (the image sets it
    # inside the Bento): it must point at the mounted volume.
    assert Path(env["BENTOML_HF_CACHE_DIR"]).is_relative_to(mount["mountPath"])
    assert Path(env["HF_HOME"]).is_relative_to(mount["mountPath"])
    requested = container["resources"]["requests"]["ephemeral-storage"]
    assert _gibibytes(requested) >= 6  # a ~5 GB checkpoint plus logs
    assert _gibibytes(volume["emptyDir"]["sizeLimit"]) <= _gibibytes(
        container["resources"]["limits"]["ephemeral-storage"]
    )


def _gibibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Gi|Mi)", quantity)
    assert match, quantity
    return int(match.group(1)) / (1024 if match.group(2) == "Mi" else 1)


def test_disruption_budget_lets_a_single_replica_drain() -> None:
    manifests = _manifests()
    pdb = manifests["PodDisruptionBudget/riffusion"]
    hpa = manifests["HorizontalPodAutoscaler/riffusion"]
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = pdb["spec"]
    if "minAvailable" in spec:
        # Must leave one pod evictable at the smallest scale.
        assert int(spec["minAvailable"]) < hpa["spec"]["minReplicas"]
    else:
        assert int(spec["maxUnavailable"]) >= 1


def test_service_selects_the_deployment_pods() -> None:
    manifests = _manifests()
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    service = manifests["Service/riffusion"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in _container()["ports"]}


def test_pod_monitor_scrapes_the_pods_metrics() -> None:
    monitor = _manifests()["PodMonitor/riffusion"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in _container()["ports"]}
    assert endpoint["path"] == "/metrics"
    # kube-prometheus-stack's default podMonitorSelector matches the Helm release label.
    assert "release" in monitor["metadata"]["labels"]
    annotations = _deployment()["spec"]["template"]["metadata"].get("annotations", {})
    assert not any(key.startswith("prometheus.io/") for key in annotations)


def adapter_rule() -> dict[str, Any]:
    """The prometheus-adapter rule that publishes the autoscaling metric."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    [rule] = [r for r in values["rules"]["custom"] if r["name"]["as"] == AUTOSCALING_METRIC]
    return rule


def test_autoscaler_targets_the_adapter_metric_per_pod() -> None:
    hpa = _manifests()["HorizontalPodAutoscaler/riffusion"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "riffusion",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == AUTOSCALING_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    rule = adapter_rule()
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    # The adapter's config lives in its own (Helm) values, not in the app's namespace.
    assert not any(
        doc["kind"] == "ConfigMap" and "adapter" in doc["metadata"]["name"] for doc in _rendered()
    )


def test_bentocloud_deployment_file() -> None:
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentServiceConfig
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.cloud.schemas.utils import schema_from_object

    raw = yaml.safe_load((ROOT / "deploy" / "bentocloud.yaml").read_text())
    # The schema ignores unknown keys, so check them explicitly before structuring.
    known = {f.name for f in attr.fields(CreateDeploymentSchema)}
    assert set(raw) <= known | {"cluster"}
    service_keys = {f.name for f in attr.fields(DeploymentServiceConfig)}
    for config in raw["services"].values():
        assert set(config) <= service_keys
    deployment = schema_from_object(raw, CreateDeploymentSchema)

    # One pinned Bento version, never whichever was built last.
    name, _, version = deployment.bento.partition(":")
    assert name == "riffusion" and version and version != "latest"
    assert set(deployment.services) == _service_names() == {"riffusion", "riffusion_model"}
    model = deployment.services["riffusion_model"]
    api = deployment.services["riffusion"]
    assert model.instance_type is not None and "a10g" in model.instance_type
    assert api.instance_type is not None and api.instance_type.startswith("cpu")
    shared_env = {env.name: env.value for env in deployment.envs or [] if env is not None}
    for service in (model, api):
        assert service.scaling is not None
        assert service.scaling.min_replicas is not None and service.scaling.max_replicas
        assert 0 <= service.scaling.min_replicas <= service.scaling.max_replicas
        # Traffic limits are applied at deploy time; env vars would be frozen at build.
        traffic = service.config_overrides["traffic"]
        assert {"timeout", "concurrency", "max_concurrency"} <= set(traffic)
        assert traffic["timeout"] == float(shared_env["RIFFUSION_REQUEST_TIMEOUT_S"])
    # The model service's concurrency is one full batch, matching its batch size env.
    model_env = {env.name: env.value for env in model.envs or [] if env is not None}
    assert (
        int(model_env["RIFFUSION_MAX_BATCH_SIZE"])
        == model.config_overrides["traffic"]["concurrency"]
    )
    assert model_env["RIFFUSION_DEVICE"] == "cuda"


@pytest.fixture(scope="module")
def served_with_key(keyed_server: LocalServer) -> str:
    return keyed_server.url


def test_openapi_document_describes_the_service_and_its_api_key(served_with_key: str) -> None:
    import httpx

    from serving.service_info import SECURITY_SCHEME, package_version

    spec = httpx.get(
        f"{served_with_key}/docs.json", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ).json()
    info = spec["info"]
    assert info["version"] == package_version() != "None"
    assert "num_inference_steps" in info["description"]
    assert "BentoML" not in info["description"]
    scheme = spec["components"]["securitySchemes"][SECURITY_SCHEME]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert spec["security"] == [{SECURITY_SCHEME: []}]
    # Probes and metrics stay open: their operations say so.
    assert spec["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/text_to_audio"]["post"]
