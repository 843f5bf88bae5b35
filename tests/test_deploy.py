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
MODEL_VOLUME_DIR = ROOT / "deploy" / "overlays" / "model-volume"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
K8S_VERSIONS = ("1.30.0", "1.33.0")
# Kinds of custom resources (kube-prometheus-stack): not in the core API schemas.
CUSTOM_KINDS = {"PodMonitor"}
AUTOSCALING_METRIC = "riffusion_clips_in_flight"
# The same quantity from BentoML's own gauge: the HPA's fallback when the first is missing.
FALLBACK_METRIC = "riffusion_model_requests_in_progress"
LOAD_METRIC = "riffusion_device_load"  # sees listener sessions between their clips


@cache
def _rendered(directory: Path = K8S_DIR) -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k deploy/kubernetes` (or an overlay) would send to the cluster."""
    result = subprocess.run(
        [executable("kubectl"), "kustomize", str(directory)],
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
        "ServiceAccount",
        "NetworkPolicy",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PodMonitor",
    }


@pytest.mark.parametrize("directory", [K8S_DIR, MODEL_VOLUME_DIR], ids=["base", "model-volume"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_against_kubernetes_schema(
    version: str, directory: Path
) -> None:
    for doc in _rendered(directory):
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
    assert config["data"]["RIFFUSION_DEVICE"] == "cuda"
    # The image runs the checkpoint it carries: the ConfigMap neither names another
    # one nor lets the hub be called.
    assert "RIFFUSION_MODEL" not in config["data"]
    assert config["data"]["HF_HUB_OFFLINE"] == "1"


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


EXIT_MARGIN_S = 10  # for the processes to exit after the drain


def test_shutdown_budget_adds_up() -> None:
    """terminationGracePeriodSeconds = preStop + RIFFUSION_SHUTDOWN_GRACE_S + exit margin.

    The service answers what cannot finish within its grace with 503 + Retry-After
    (tests/test_shutdown.py), so the request timeout need not fit in the budget.
    """
    pod = _deployment()["spec"]["template"]["spec"]
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    shutdown_grace_s = float(_config()["RIFFUSION_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] == pre_stop_s + shutdown_grace_s + EXIT_MARGIN_S
    # A clip's share of the budget: at least one 50-step clip on an A10G (about 5 s).
    assert shutdown_grace_s >= 30


def test_writable_folders_are_volumes_with_storage_requested() -> None:
    """The root filesystem is read-only: every folder the service writes is an emptyDir."""
    pod = _deployment()["spec"]["template"]["spec"]
    container = _container()
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) == set(volumes)
    assert all("emptyDir" in volume for volume in volumes.values())

    def on_a_volume(path: str) -> bool:
        return any(Path(path).is_relative_to(mount) for mount in mounts)

    # Temp files (uploads, worker folders, sockets), caches, BentoML's metrics folder.
    for path in (env["TMPDIR"], env["XDG_CACHE_HOME"], env["TRITON_CACHE_DIR"]):
        assert on_a_volume(path), path
    assert on_a_volume("/home/bentoml/prometheus_multiproc_dir")
    # No checkpoint download: the image carries it (BENTOML_HF_CACHE_DIR stays in the Bento).
    assert "BENTOML_HF_CACHE_DIR" not in env
    requested = _gibibytes(container["resources"]["requests"]["ephemeral-storage"])
    limit = _gibibytes(container["resources"]["limits"]["ephemeral-storage"])
    sizes = sum(_gibibytes(v["emptyDir"]["sizeLimit"]) for v in volumes.values())
    assert requested <= limit and sizes <= limit


def _gibibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Gi|Mi)", quantity)
    assert match, quantity
    return int(match.group(1)) / (1024 if match.group(2) == "Mi" else 1)


# ------------------------------------------------------------------ security
# The "restricted" Pod Security Standard, rule by rule as the Kubernetes documentation
# states it (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
# baseline rules included (restricted is baseline plus its own).
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec the "restricted" profile forbids (empty when it passes)."""
    problems = []
    pod_context = pod.get("securityContext", {})
    containers = [
        *pod.get("initContainers", []),
        *pod.get("containers", []),
        *pod.get("ephemeralContainers", []),
    ]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field} is set")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} is {sorted(kinds)}")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl['name']}")

    def pod_or_container(context: dict[str, Any], key: str) -> Any:
        return context.get(key, pod_context.get(key))

    for container in containers:
        name = container["name"]
        context = container.get("securityContext", {})
        windows = pod_or_container(context, "windowsOptions") or {}
        if windows.get("hostProcess"):
            problems.append(f"{name}: hostProcess")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        selinux = pod_or_container(context, "seLinuxOptions") or {}
        if (
            selinux.get("type", "") not in SELINUX_TYPES
            or selinux.get("user")
            or selinux.get("role")
        ):
            problems.append(f"{name}: seLinuxOptions")
        apparmor = pod_or_container(context, "appArmorProfile") or {}
        if apparmor.get("type", "RuntimeDefault") not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{name}: appArmorProfile")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if pod_or_container(context, "runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if pod_or_container(context, "runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = pod_or_container(context, "seccompProfile") or {}
        if seccomp.get("type") not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        added = set(capabilities.get("add", []))
        if not added <= {"NET_BIND_SERVICE"} or not added <= BASELINE_CAPABILITIES:
            problems.append(f"{name}: adds capabilities {sorted(added)}")
    return problems


def test_pod_passes_the_restricted_pod_security_standard() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    # Beyond the standard: nothing writes to the image (writable folders are volumes).
    assert _container()["securityContext"]["readOnlyRootFilesystem"] is True
    # The image's Dockerfile names its user (`USER bentoml`): runAsNonRoot needs the number.
    assert pod["securityContext"]["runAsUser"] == 1034


def test_restricted_check_catches_each_kind_of_violation() -> None:
    """The checker is not vacuous: each change below breaks the profile."""
    pod = _deployment()["spec"]["template"]["spec"]

    def broken(change: Any) -> list[str]:
        copy = yaml.safe_load(yaml.safe_dump(pod))
        change(copy, copy["containers"][0].setdefault("securityContext", {}))
        return restricted_violations(copy)

    changes = [
        lambda p, c: p.update(hostNetwork=True),
        lambda p, c: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        lambda p, c: c.update(privileged=True),
        lambda p, c: c.pop("allowPrivilegeEscalation"),
        lambda p, c: p["securityContext"].pop("runAsNonRoot"),
        lambda p, c: c.update(runAsUser=0),
        lambda p, c: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda p, c: c.update(capabilities={"drop": ["NET_RAW"]}),
        lambda p, c: c["capabilities"].update(add=["SYS_ADMIN"]),
        lambda p, c: p["containers"][0]["ports"][0].update(hostPort=3000),
    ]
    for change in changes:
        assert broken(change), change


def test_auth_is_required_and_its_key_is_not_optional() -> None:
    """A missing Secret stops the pod (CreateContainerConfigError), never opens the API;
    the service refuses to start without a key too (RIFFUSION_AUTH=required)."""
    assert _config()["RIFFUSION_AUTH"] == "required"
    env = {e["name"]: e for e in _container()["env"]}
    key_ref = env["RIFFUSION_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == "riffusion-api-key" and not key_ref.get("optional", False)
    # The hub token is optional: only hub mirrors and private checkpoints need it.
    token_ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_ref["optional"] is True


def test_cors_origins_are_listed_not_any() -> None:
    origins = _config()["RIFFUSION_CORS_ORIGINS"].split(",")
    assert origins and all(re.fullmatch(r"https://[a-z0-9.-]+(:\d+)?", o) for o in origins)


def test_pods_have_their_own_service_account_without_a_token() -> None:
    manifests = _manifests()
    account = manifests["ServiceAccount/riffusion"]
    pod = _deployment()["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False
    assert not any(doc["kind"] in {"RoleBinding", "ClusterRoleBinding"} for doc in _rendered())


def test_network_policy_admits_only_the_ingress_and_prometheus() -> None:
    policy = _manifests()["NetworkPolicy/riffusion"]["spec"]
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    port_names = {p["name"] for p in _container()["ports"]}
    sources = []
    for rule in policy["ingress"]:
        # Each rule names its peers and ports: an empty list would admit everyone.
        assert rule["from"] and rule["ports"]
        assert {port["port"] for port in rule["ports"]} <= port_names
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            # Both selectors: one namespace's pods of one kind, not a whole namespace.
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            sources.append(
                (namespace, peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"])
            )
    assert sorted(sources) == [("ingress-nginx", "ingress-nginx"), ("monitoring", "prometheus")]
    # The PodMonitor scrapes through the port the policy opens.
    [endpoint] = _manifests()["PodMonitor/riffusion"]["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    # Egress: DNS only (the image carries its checkpoint; the hub is not called).
    [egress] = policy["egress"]
    assert {port["port"] for port in egress["ports"]} == {53}


# ------------------------------------------------------------ model delivery
def test_model_volume_overlay_mounts_a_read_only_checkpoint() -> None:
    """The pre-filled volume path: the pods read the checkpoint from a read-only PVC."""
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in _rendered(MODEL_VOLUME_DIR)}
    [deployment] = [d for d in docs.values() if d["kind"] == "Deployment"]
    [config] = [d for d in docs.values() if d["kind"] == "ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert restricted_violations(pod) == []
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    model_path = Path(config["data"]["RIFFUSION_MODEL"])
    [mount] = [m for m in container["volumeMounts"] if model_path.is_relative_to(m["mountPath"])]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = docs[f"PersistentVolumeClaim/{claim['claimName']}"]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    # Everything else is the base's: same config apart from the model.
    base = dict(_config())
    assert {k: v for k, v in config["data"].items() if k != "RIFFUSION_MODEL"} == base


def test_tiny_model_on_a_gpu_is_refused_unless_asked_for() -> None:
    """A tiny Bento's image says RIFFUSION_MODEL=tiny: on a GPU the model service refuses."""
    from riffusion.models import ModelLoadError, build_tiny_components
    from serving.startup_checks import refuse_tiny_on_gpu

    # The description the model service checks, as the tiny model gives it (here on CPU).
    tiny_on_cpu = build_tiny_components(seed=0, device="cpu").describe()
    refuse_tiny_on_gpu(tiny_on_cpu, allowed=False)
    tiny_on_gpu = {**tiny_on_cpu, "device": "cuda:0"}
    with pytest.raises(ModelLoadError, match="RIFFUSION_ALLOW_TINY_ON_GPU=1"):
        refuse_tiny_on_gpu(tiny_on_gpu, allowed=False)
    refuse_tiny_on_gpu(tiny_on_gpu, allowed=True)
    refuse_tiny_on_gpu({**tiny_on_gpu, "is_tiny": False}, allowed=False)


def test_a_drain_is_not_an_outage() -> None:
    """Evictions delete before the replacement exists: two replicas at least, one evicted
    at a time, and the budget never blocks a drain."""
    manifests = _manifests()
    pdb = manifests["PodDisruptionBudget/riffusion"]
    hpa = manifests["HorizontalPodAutoscaler/riffusion"]
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert hpa["spec"]["minReplicas"] >= 2
    assert _deployment()["spec"]["replicas"] >= hpa["spec"]["minReplicas"]
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # Rolling updates surge first and keep every ready pod until its replacement is ready.
    strategy = _deployment()["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}
    # What pdb.yaml says is what Kubernetes does: no claim that a drain surges first.
    comment = (K8S_DIR / "pdb.yaml").read_text()
    assert "deleted first" in comment and "surges a replacement first" not in comment


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


def adapter_rule(metric: str = AUTOSCALING_METRIC) -> dict[str, Any]:
    """The prometheus-adapter rule that publishes an autoscaling metric."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    [rule] = [r for r in values["rules"]["custom"] if r["name"]["as"] == metric]
    return rule


def test_autoscaler_targets_the_adapter_metric_per_pod() -> None:
    hpa = _manifests()["HorizontalPodAutoscaler/riffusion"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "riffusion",
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    primary, fallback, cpu, load = hpa["spec"]["metrics"]
    # The custom metric and its fallback: the same quantity, the same target, two series.
    for metric, name in ((primary, AUTOSCALING_METRIC), (fallback, FALLBACK_METRIC)):
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == name
        assert metric["pods"]["target"] == primary["pods"]["target"]
        assert metric["pods"]["target"]["type"] == "AverageValue"
        rule = adapter_rule(name)
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert (
        adapter_rule(AUTOSCALING_METRIC)["seriesQuery"].split("{")[0]
        != (adapter_rule(FALLBACK_METRIC)["seriesQuery"].split("{")[0])
    )
    # The device load, sessions included: a fraction, scaled out before admission refuses.
    assert load["type"] == "Pods" and load["pods"]["metric"]["name"] == LOAD_METRIC
    assert 0 < float(load["pods"]["target"]["averageValue"].rstrip("m")) / 1000 < 0.8
    assert adapter_rule(LOAD_METRIC)["seriesQuery"].startswith(LOAD_METRIC + "{")
    # Outside Prometheus altogether (metrics-server), and the pod requests the CPU it measures.
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert 50 <= cpu["resource"]["target"]["averageUtilization"] <= 95
    assert "cpu" in _container()["resources"]["requests"]
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
    # The Bento carries its checkpoint and requires its API key (from a BentoCloud secret).
    assert "RIFFUSION_MODEL" not in shared_env
    assert deployment.secrets == ["riffusion-api-key"]
    assert shared_env["RIFFUSION_CORS_ORIGINS"] != "*"
    assert "adaptive batching" not in (ROOT / "deploy" / "bentocloud.yaml").read_text()


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
