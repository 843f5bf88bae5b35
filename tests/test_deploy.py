"""Deployment files: Kubernetes manifests against the offline API schemas, BentoCloud config."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import attr
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    manifests = {}
    for name in kustomization["resources"]:
        for doc in _documents(K8S_DIR / name):
            manifests[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return manifests


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


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


CLUSTER_MANIFESTS = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", CLUSTER_MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path: Path) -> None:
    for doc in _documents(path):
        # strict: unknown fields (typos) fail too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    """The validator is not vacuous: a misspelt field and a wrong type are rejected."""
    deployment = _manifests()["Deployment/riffusion"]
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = typo["spec"]["template"][
        "spec"
    ]["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)


def test_gpu_deployment_probes_and_selector() -> None:
    manifests = _manifests()
    deployment = manifests["Deployment/riffusion"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "A10G" in pod["nodeSelector"]["nvidia.com/gpu.product"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port_names = {p["name"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["port"] in port_names
    # The config map it reads exists and sets the model.
    [env_from] = container["envFrom"]
    config = manifests[f"ConfigMap/{env_from['configMapRef']['name']}"]
    assert config["data"]["RIFFUSION_MODEL"] == "riffusion/riffusion-model-v1"
    assert all(isinstance(v, str) for v in config["data"].values())


def test_service_selects_the_deployment_pods() -> None:
    manifests = _manifests()
    pod_labels = manifests["Deployment/riffusion"]["spec"]["template"]["metadata"]["labels"]
    service = manifests["Service/riffusion"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container = manifests["Deployment/riffusion"]["spec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


def test_autoscaler_targets_deployment_on_the_adapter_metric() -> None:
    manifests = _manifests()
    hpa = manifests["HorizontalPodAutoscaler/riffusion"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "riffusion",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    metric_name = metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load(
        manifests["ConfigMap/riffusion-prometheus-adapter-rules"]["data"]["config.yaml"]
    )
    [rule] = adapter["rules"]
    assert rule["name"]["as"] == metric_name
    # The series is the batched model endpoint's in-flight gauge BentoML exports.
    assert "bentoml_service_request_in_progress" in rule["seriesQuery"]
    assert 'endpoint="/generate"' in rule["seriesQuery"]


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

    assert set(deployment.services) == _service_names() == {"riffusion", "riffusion_model"}
    model = deployment.services["riffusion_model"]
    api = deployment.services["riffusion"]
    assert model.instance_type is not None and "a10g" in model.instance_type
    assert api.instance_type is not None and api.instance_type.startswith("cpu")
    for service in (model, api):
        assert service.scaling is not None
        assert service.scaling.min_replicas is not None and service.scaling.max_replicas
        assert 0 <= service.scaling.min_replicas <= service.scaling.max_replicas
