"""The dev overlay and the code agree: the CPU stack starts and trains with exactly the commands,
arguments, environment and config file that the dev overlay's workloads and ConfigMap hold.

The only substitutions are what a laptop cannot have: cluster DNS names and ports become loopback
addresses and free ports, /data becomes a temporary directory holding the (fast) test world, and the
run is 2 learner steps of 2 groups, zero-signal groups kept (the test world never solves a problem)."""

import json
import sys

import pytest
import yaml
from test_k8s import objects

from eapo.core.config import load_config
from eapo.core.net import free_port

pytestmark = pytest.mark.e2e


def workload(objs, suffix):
    return next(
        o for o in objs if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"].endswith(suffix)
    )


def container(obj):
    return obj["spec"]["template"]["spec"]["containers"][0]


def port(c, name):
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def manifest_env(c, pod_name):
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        elif "apps.kubernetes.io/pod-index" in e["valueFrom"].get("fieldRef", {}).get("fieldPath", ""):
            env[e["name"]] = "0"
    return env


def test_dev_overlay_runs_the_cpu_stack(stack, redis_server):
    objs = objects("kustomize:dev")
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    config_text = cm["data"]["config.yaml"]
    cfg = load_config(None, **yaml.safe_load(config_text))  # the ConfigMap is a valid EAPO config
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    gateway, expert = workload(objs, "-gateway"), workload(objs, "-expert-expert")
    rollout, learner = workload(objs, "-rollout"), workload(objs, "-learner")

    # Names and ports agree between config, containers and Services.
    assert cfg.gateway.port == port(container(gateway), "http")
    assert cfg.expert_server.port == port(container(expert), "http")
    assert cfg.rollout.metrics_port == port(container(rollout), "metrics")
    assert cfg.learner.metrics_port == port(container(learner), "metrics")
    assert not cfg.gateway.backends and cfg.gateway.discovery  # pods are found through headless Services
    for pool in cfg.gateway.discovery:
        assert services[pool.host]["spec"]["clusterIP"] == "None"
        assert services[pool.host]["spec"]["ports"][0]["port"] == pool.port
    host, gw_port = cfg.rollout.gateway_url.removeprefix("http://").split(":")
    assert services[host]["spec"]["ports"][0]["port"] == int(gw_port)
    assert str(cfg.world.dir) == "/data/world" and str(cfg.run_dir) == "/data/run"
    for o in (rollout, learner, expert):
        mounts = {m["mountPath"] for m in container(o)["volumeMounts"]}
        assert {"/data", "/etc/eapo"} <= mounts

    stack.config.write_text(config_text)
    ports = {"gateway": free_port(), "rollout": free_port(), "learner": free_port()}
    expert_ports = [free_port() for _ in range(expert["spec"]["replicas"])]
    local = {  # the substitutions described in the module docstring (over the manifests' own)
        "REDIS_URL": redis_server.url,
        "EAPO_RUN_DIR": str(stack.run_dir),
        "EAPO_WORLD__DIR": str(stack.world.dir),
        "EAPO_LEARNER__STEPS": "2",
        "EAPO_LEARNER__BATCH_GROUPS": "2",
        # the barely trained test world never solves a problem: keep its zero-signal groups
        "EAPO_LEARNER__DYNAMIC_SAMPLING": "false",
        "EAPO_ANNEAL__PENALTY__KIND": "constant",
        "EAPO_ANNEAL__PENALTY__START": "0.1",
        "EAPO_ANNEAL__PENALTY__END": "0.1",
        "EAPO_REDIS__PREFIX": stack.prefix,
        "EAPO_METRICS_HOST": "127.0.0.1",
        "EAPO_GATEWAY__HOST": "127.0.0.1",
        "EAPO_GATEWAY__PORT": str(ports["gateway"]),
        # what the headless Service would resolve to: every expert pod
        "EAPO_GATEWAY__DISCOVERY": "[]",
        "EAPO_GATEWAY__BACKENDS": json.dumps(
            [{"model": d.model, "url": f"http://127.0.0.1:{p}"} for d in cfg.gateway.discovery for p in expert_ports]
        ),
        "EAPO_EXPERT_SERVER__HOST": "127.0.0.1",
        "EAPO_ROLLOUT__GATEWAY_URL": f"http://127.0.0.1:{ports['gateway']}",
        "EAPO_ROLLOUT__METRICS_PORT": str(ports["rollout"]),
        "EAPO_LEARNER__METRICS_PORT": str(ports["learner"]),
    }

    def start(obj, extra=None, pod="pod-0", log=None):
        c = container(obj)
        args = [a.replace("/etc/eapo/config.yaml", str(stack.config)) for a in c["args"]]
        if c.get("command"):  # the learner: torchrun, one local node
            args = [a.replace("$(POD_INDEX)", "0") for a in args]
            args = [("--master_addr=127.0.0.1" if a.startswith("--master_addr=") else a) for a in args]
            args = [(f"--master_port={free_port()}" if a.startswith("--master_port=") else a) for a in args]
            argv = [sys.executable, *c["command"][1:], *args]
        else:  # the image's entrypoint is `eapo`
            argv = [sys.executable, "-m", "eapo.cli", *args]
        return stack.start(log or pod, argv=argv, env={**manifest_env(c, pod), **local, **(extra or {})})

    def ready(obj, port, proc):
        stack.wait_http(f"http://127.0.0.1:{port}{container(obj)['readinessProbe']['httpGet']['path']}", alive=(proc,))

    # As in a cluster, the pods start together; the rollout once the experts behind the gateway are up
    # (a rollout pod that came first would find every expert unavailable until they were).
    experts = [start(expert, {"EAPO_EXPERT_SERVER__PORT": str(p)}, f"expert-{i}") for i, p in enumerate(expert_ports)]
    gateway_proc = start(gateway, log="gateway")
    learner_proc = start(learner, log="learner")
    for p, proc in zip(expert_ports, experts, strict=True):
        ready(expert, p, proc)
    ready(gateway, ports["gateway"], gateway_proc)
    rollout_proc = start(rollout, pod="eapo-eapo-rollout-7d9f-abcde")
    ready(rollout, ports["rollout"], rollout_proc)
    stack.finish(learner_proc, timeout_s=300)
    stack.finish(rollout_proc, timeout_s=120)
    metrics = stack.metrics()
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1]["groups_read"] >= 1
