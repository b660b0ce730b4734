"""Kubernetes manifests, validated offline: the Helm chart with each CI values file and every kustomize
overlay render, pass `kubernetes-validate --strict` for the lowest and highest supported versions, and
keep the qualities a platform team asks for."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from eapo.core.config import load_config

ROOT = Path(__file__).parent.parent
K8S = ROOT / "k8s"
CHART_CI = sorted((K8S / "helm" / "eapo" / "ci").glob("*-values.yaml"))
OVERLAYS = sorted(p for p in (K8S / "kustomize" / "overlays").iterdir() if p.is_dir())
KUBE_VERSIONS = ["1.28.0", "1.37.0"]  # the chart's kubeVersion floor, and the newest schemas shipped
WORKLOADS = {"Deployment", "StatefulSet"}
CRDS = {"ScaledObject", "PodMonitor"}

spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
render_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_mod)


@cache
def rendered(source: str) -> str:
    kind, name = source.split(":", 1)
    if kind == "helm":
        return render_mod.render([] if name == "defaults" else [K8S / "helm" / "eapo" / "ci" / name])
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with kustomize) is not on PATH")
    return subprocess.run(
        ["kubectl", "kustomize", str(K8S / "kustomize" / "overlays" / name)], check=True, capture_output=True, text=True
    ).stdout


def objects(source: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered(source)) if d]


SOURCES = ["helm:defaults", *(f"helm:{p.name}" for p in CHART_CI), *(f"kustomize:{p.name}" for p in OVERLAYS)]


def pod_specs(objs: list[dict]):
    for o in objs:
        if o["kind"] in WORKLOADS:
            yield o, o["spec"]["template"]["spec"]


def validate(path: Path, version: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run([str(exe), "--strict", "-k", version, "--quiet", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("source", SOURCES)
def test_manifests_pass_strict_schema_validation(source, version, tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(rendered(source))
    proc = validate(path, version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unvalidated = {k for k in re.findall(r"schema for kind (\w+)", proc.stdout + proc.stderr)}
    assert unvalidated <= CRDS  # only the optional KEDA / Prometheus Operator objects lack schemas


def test_validation_can_fail(tmp_path):
    """The schema check is real: a misspelt field in a Deployment is rejected."""
    bad = objects("helm:defaults")
    deployment = next(o for o in bad if o["kind"] == "Deployment")
    deployment["spec"]["replicaz"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    assert validate(path, KUBE_VERSIONS[-1]).returncode != 0


def test_kustomize_base_is_the_chart_rendered_with_defaults():
    committed = (K8S / "kustomize" / "base" / "eapo.yaml").read_text()
    assert committed == render_mod.HEADER + render_mod.render(), "run `python k8s/render.py` to regenerate"


@pytest.mark.parametrize("source", SOURCES)
def test_labels_and_stable_selectors(source):
    for o in objects(source):
        labels = o["metadata"].get("labels", {})
        for key in ("name", "instance", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (o["kind"], o["metadata"]["name"], key)
        if o["kind"] in WORKLOADS:
            selector = o["spec"]["selector"]["matchLabels"]
            assert set(selector) == {
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
            }  # nothing that changes on upgrade
            template = o["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= template.items()


@pytest.mark.parametrize("source", SOURCES)
def test_every_container_is_bounded_pinned_and_unprivileged(source):
    for o, pod in pod_specs(objects(source)):
        where = o["metadata"]["name"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        for c in pod.get("initContainers", []) + pod["containers"]:
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), (where, c["name"], kind)
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (where, image)
            assert c.get("env", []) is not None, (where, c["name"])  # no `env: null`
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert not csc.get("privileged", False), where


@pytest.mark.parametrize("source", SOURCES)
def test_long_running_containers_have_probes(source):
    for o, pod in pod_specs(objects(source)):
        component = o["metadata"]["labels"]["app.kubernetes.io/component"]
        for c in pod["containers"]:
            if component == "learner":  # by design, see learner.yaml: no kill loop inside a collective
                assert "livenessProbe" not in c
                continue
            assert "readinessProbe" in c and "livenessProbe" in c, (o["metadata"]["name"], c["name"])
            if component.startswith("expert") or component == "policy":
                assert c["startupProbe"]["httpGet"]["path"] == "/health"  # vLLM's health route


@pytest.mark.parametrize("source", SOURCES)
def test_disruption_budgets_and_autoscaling(source):
    objs = objects(source)
    pdbs = {
        o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: o["spec"]
        for o in objs
        if o["kind"] == "PodDisruptionBudget"
    }
    assert pdbs["learner"] == {"maxUnavailable": 0, "selector": pdbs["learner"]["selector"]}
    assert pdbs["gateway"]["minAvailable"] >= 1
    hpa_targets = [o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    keda_targets = [o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] == "ScaledObject"]
    assert not set(hpa_targets) & set(keda_targets)  # never two autoscalers on one workload
    assert len(hpa_targets) == len(set(hpa_targets))
    learner = next(o for o in objs if o["kind"] == "StatefulSet" and "learner" in o["metadata"]["name"])
    assert learner["metadata"]["name"] not in hpa_targets + keda_targets  # the learner is never autoscaled
    assert learner["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 300
    headless = next(
        o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == learner["spec"]["serviceName"]
    )
    assert headless["spec"]["clusterIP"] == "None"
    for so in (o for o in objs if o["kind"] == "ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis-streams" and trigger["metadata"]["stream"].endswith(":stream:prompts")
        assert trigger["metadata"]["consumerGroup"] == "rollout"  # the prompts backlog, not trajectories


@pytest.mark.parametrize("source", SOURCES)
def test_secrets_by_reference_and_default_deny(source):
    objs = objects(source)
    assert not [o for o in objs if o["kind"] == "Secret"]  # no secret values shipped
    text = rendered(source)
    assert not re.search(r"(?i)\b(password|token|api_?key)\b\s*[:=]", text)
    deny = [o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("default-deny")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_rollout_reaches_every_policy_server_and_they_load_weights_through_the_extension():
    objs = objects("helm:prod-values.yaml")
    policy = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-policy"))
    service = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == policy["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    cfg = load_config(None, **yaml.safe_load(cm["data"]["config.yaml"]))
    name, svc = policy["metadata"]["name"], service["metadata"]["name"]
    assert cfg.rollout.engine == "remote"
    assert cfg.rollout.policy_urls == [f"http://{name}-{i}.{svc}:8000" for i in range(policy["spec"]["replicas"])]
    args = policy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--worker-extension-cls") + 1] == "eapo.inference.vllm_worker.EAPOWorkerExtension"
    env = {e["name"]: e.get("value") for e in policy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_SERVER_DEV_MODE"] == "1"


def pod_labels(objs: list[dict], component: str) -> dict:
    templates = [o["spec"]["template"]["metadata"]["labels"] for o in objs if o["kind"] in WORKLOADS]
    return next(labels for labels in templates if labels.get("app.kubernetes.io/component") == component)


def admitted(objs: list[dict], src: str, dst: str, port: int) -> bool:
    """Whether the NetworkPolicies let ``src`` pods reach ``dst`` pods on ``port``: an egress rule on the
    source's side and an ingress rule on the destination's (under the default deny, both are needed)."""
    policies = [o["spec"] for o in objs if o["kind"] == "NetworkPolicy"]
    source, dest = pod_labels(objs, src), pod_labels(objs, dst)

    def matches(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    def allows(rules: list[dict], key: str, peer: dict) -> bool:
        return any(
            any(
                "podSelector" in p and "namespaceSelector" not in p and matches(p["podSelector"], peer)
                for p in r.get(key, [])
            )
            and ("ports" not in r or any(p["port"] == port for p in r["ports"]))
            for r in rules
        )

    egress = any(matches(np["podSelector"], source) and allows(np.get("egress", []), "to", dest) for np in policies)
    ingress = any(matches(np["podSelector"], dest) and allows(np.get("ingress", []), "from", source) for np in policies)
    return egress and ingress


def test_policy_servers_admit_the_rollout_and_with_broadcast_the_learner(tmp_path):
    objs = objects("helm:prod-values.yaml")
    assert admitted(objs, "rollout", "policy", 8000)
    assert not admitted(objs, "learner", "policy", 8000)  # no broadcast: the learner has no business there
    values = tmp_path / "broadcast.yaml"
    values.write_text(
        yaml.safe_dump({"policy": {"enabled": True, "replicas": 2}, "learner": {"broadcast": {"enabled": True}}})
    )
    objs = [
        d
        for d in yaml.safe_load_all(render_mod.render([K8S / "helm" / "eapo" / "ci" / "prod-values.yaml", values]))
        if d
    ]
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    cfg = load_config(None, **yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.learner.broadcast.servers == cfg.rollout.policy_urls and len(cfg.rollout.policy_urls) == 2
    learner = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-learner"))
    assert cfg.learner.broadcast.address == f"{learner['metadata']['name']}-0.{learner['spec']['serviceName']}:29650"
    for port in (8000, 29650, 41234):  # /collective_rpc, the rendezvous, one of NCCL's own ports
        assert admitted(objs, "learner", "policy", port) and admitted(objs, "policy", "learner", port)
    assert admitted(objs, "rollout", "policy", 8000)


def test_external_redis_comes_from_a_secret_reference():
    objs = objects("helm:prod-values.yaml")
    assert not [o for o in objs if o["metadata"]["name"].endswith("-redis")]
    users = set()
    for o, pod in pod_specs(objs):
        for c in pod["containers"]:
            for env in c.get("env", []):
                if env["name"] == "REDIS_URL":
                    assert env["valueFrom"]["secretKeyRef"] == {"name": "eapo-redis-url", "key": "url"}
                    users.add(o["metadata"]["labels"]["app.kubernetes.io/component"])
    assert users == {"rollout", "learner"}


def test_dockerfile_stages_are_pinned_and_non_root():
    text = (K8S / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)
    assert {name for _, name in stages} == {"source", "gateway", "cpu", "learner-gpu", "vllm"}
    for base, _ in stages:
        image = args.get(base.strip("${}"), base)
        if base != "source":
            assert re.search(r":[\w.-]*\d", image) and not image.endswith(":latest"), image
    for block in re.split(r"^FROM ", text, flags=re.M)[1:]:
        if "ENTRYPOINT" not in block:  # `source`: the code the images copy, not an image
            continue
        users = re.findall(r"^USER (\S+)$", block, re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), block.splitlines()[0]
    assert "vllm/vllm-openai" in args["VLLM_IMAGE"]  # expert and policy images build on the official one


def test_each_image_installs_only_its_roles_extras():
    """The gateway's image is ``pip install .`` (no torch: tests/test_gateway_install.py) and the chart
    runs it; the CPU and GPU images add the learner's extra (it holds the rollout's) and the tracking sinks."""
    text = (K8S / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    project = {name: re.findall(r'pip install (?:--\S+ )*"?(\.[^\s"]*)', block) for name, block in stages}
    assert project["gateway"] == ["."]
    assert project["cpu"] == project["learner-gpu"] == [".[learner,tracking]"]  # tracking: the optional sinks
    images = {o["metadata"]["labels"]["app.kubernetes.io/component"]: pod["containers"][0]["image"]
              for o, pod in pod_specs(objects("helm:defaults"))}  # fmt: skip
    assert "/eapo-gateway:" in images["gateway"] and "/eapo:" in images["rollout"]


@pytest.mark.parametrize("source", [s for s in SOURCES if s.startswith("helm:")])
def test_every_config_map_validates_and_routes_each_expert_pool(source):
    """The chart's config (model, data, pools) is a valid EAPO config whose expert names all have a pool."""
    cm = next(o for o in objects(source) if o["kind"] == "ConfigMap")
    cfg = load_config(None, **yaml.safe_load(cm["data"]["config.yaml"]))
    routed = {p.model for p in cfg.gateway.discovery} | {b.model for b in cfg.gateway.backends}
    assert set(cfg.model.experts) <= routed


def test_the_prod_overlay_names_a_real_model_and_data_set():
    cfg = load_config(K8S / "kustomize" / "overlays" / "prod" / "config.yaml")
    assert cfg.policy_path == Path("/data/models/policy") and cfg.data.train.layout == "dapo"
    assert set(cfg.model.experts) <= {p.model for p in cfg.gateway.discovery}
