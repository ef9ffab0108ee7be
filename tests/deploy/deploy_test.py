#!/usr/bin/python3
"""Checks the Kubernetes manifests of deploy/kustomize and, optionally, runs the
rendered CPU overlay as local processes.

  /usr/bin/python3 tests/deploy/deploy_test.py          # from the repo root
  bazel test //tests/deploy:deploy_test                 # same, plus the local run

Stage 1 (render): `kubectl kustomize` renders the base and every overlay; the
objects are parsed (python3-yaml) and checked: probes, resources, drain timing,
headless Services, the router's DNS flags naming those Services, NetworkPolicy,
HPA / PDB / ServiceMonitor targets, the PrometheusRule (= deploy/monitoring's rules), GPU requests, the CPU overlay's tiny model.

Stage 2 (local run): every container of the rendered CPU overlay (initContainer
included) runs as a local process with its command and args, env expanded from
the rendered ConfigMap; /usr/local/bin/X -> the built binary, /models -> a temp
folder, the Services' DNS names and ports -> 127.0.0.1 and free ports. Then the
Python client (tests/integration/python_client.py) streams a generation through
the router; /metrics is scraped where served; every process's grpc.health.v1
answers SERVING (what the kubelet's grpc probes ask); SIGTERM to the router in
the middle of a stream: health NOT_SERVING, a new request UNAVAILABLE, the
stream still finishes, exit 0; then every process exits 0 on SIGTERM within
its pod's terminationGracePeriodSeconds. Needs the binaries: under Bazel they are data deps; otherwise set
KL_DEPLOY_BIN_DIR to a folder holding kl-router, kl-prefill, kl-decode and
make_checkpoint (e.g. after `bazel build`, see docs/deploy.md).

Skips (exit 0, JUnit "skipped", reason printed) when kubectl with kustomize v4+
or python3-yaml is missing — Debian 12's kubernetes-client is 1.20 with
kustomize v2.0.3, too old for these kustomizations. KL_DEPLOY_TEST_STRICT=1
turns every skip into a failure.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import xml.etree.ElementTree as ET

OVERLAYS = ["base", "overlays/cpu", "overlays/gpu", "overlays/gpu-nccl"]
NAMESPACE = "kimi-serve"
ROUTER, PREFILL, DECODE = "kl-router", "kl-prefill", "kl-decode"
BINARIES = ["kl-router", "kl-prefill", "kl-decode", "make_checkpoint"]


class Skip(Exception):
    pass


# --------------------------------------------------------------------------- paths

def repo_root():
    srcdir = os.environ.get("TEST_SRCDIR")
    if srcdir:
        ws = os.environ.get("TEST_WORKSPACE", "kimi_serve")
        return os.path.join(srcdir, ws)
    return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def tmp_root():
    """(folder, remove_at_exit): Bazel's TEST_TMPDIR, else a fresh temp folder."""
    if os.environ.get("TEST_TMPDIR"):
        return os.environ["TEST_TMPDIR"], False
    return tempfile.mkdtemp(prefix="kl-deploy-test-"), True


# --------------------------------------------------------------------------- render

def find_kubectl():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise Skip("kubectl not found on PATH. Install a kubectl with kustomize v4+ "
                   "(https://kubernetes.io/docs/tasks/tools/; Debian 12's kubernetes-client "
                   "1.20 embeds kustomize v2.0.3, too old for these kustomizations)")
    try:
        out = subprocess.run([kubectl, "version", "--client", "-o", "json"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        ver = json.loads(out).get("kustomizeVersion", "")
    except (subprocess.SubprocessError, ValueError) as e:
        raise Skip(f"`kubectl version --client` failed: {e}")
    m = re.match(r"v?(\d+)", ver)
    if not m or int(m.group(1)) < 4:
        raise Skip(f"kubectl's kustomize is {ver or 'unknown'}; need v4+ (labels:, patches "
                   "with targets). Install a current kubectl")
    return kubectl


def load_yaml_all(text):
    try:
        import yaml  # python3-yaml (Debian)
    except ImportError:
        raise Skip("python3-yaml is missing: apt-get install python3-yaml")
    return [d for d in yaml.safe_load_all(text) if d]


def render(kubectl, kustomize_dir, rel):
    r = subprocess.run([kubectl, "kustomize", os.path.join(kustomize_dir, rel)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"kubectl kustomize {rel} failed:\n{r.stderr}")
    return load_yaml_all(r.stdout)


# --------------------------------------------------------------------------- helpers

class Objects:
    def __init__(self, docs):
        self.docs = docs

    def of(self, kind):
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind, name):
        for d in self.of(kind):
            if d["metadata"]["name"] == name:
                return d
        return None

    def configmap_by_ref(self, name):
        cm = self.get("ConfigMap", name)
        assert cm is not None, f"ConfigMap {name} referenced but not rendered"
        return cm.get("data", {})


def selects(selector, labels):
    ml = (selector or {}).get("matchLabels", selector or {})
    if "matchLabels" not in (selector or {}) and "matchExpressions" in (selector or {}):
        ml = {}
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def pod_labels(dep):
    return dep["spec"]["template"]["metadata"].get("labels", {})


def container_env(objs, container):
    """Env of a container as the kubelet builds it: envFrom ConfigMaps, then env
    (literal values; resourceFieldRef limits.cpu rounded up)."""
    env = {}
    for ef in container.get("envFrom", []):
        if "configMapRef" in ef:
            env.update(objs.configmap_by_ref(ef["configMapRef"]["name"]))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "resourceFieldRef" in e["valueFrom"]:
            ref = e["valueFrom"]["resourceFieldRef"]
            val = container.get("resources", {}).get("limits", {}).get(ref["resource"].split(".", 1)[1])
            assert val is not None, f"{container['name']}: env {e['name']} refers to unset {ref['resource']}"
            env[e["name"]] = str(cpu_cores_ceil(val)) if ref["resource"].endswith("cpu") else str(val)
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = objs.configmap_by_ref(ref["name"])[ref["key"]]
    return env


def cpu_cores_ceil(v):
    v = str(v)
    if v.endswith("m"):
        return max(1, -(-int(v[:-1]) // 1000))
    return max(1, int(-(-float(v) // 1)))


def expand(args, env, where):
    out = []
    for a in args:
        def sub(m):
            assert m.group(1) in env, f"{where}: $({m.group(1)}) in args is not defined in env"
            return env[m.group(1)]
        out.append(re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, a))
    return out


def flag(args, name):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def port_of(container, port_name):
    for p in container.get("ports", []):
        if p.get("name") == port_name:
            return p["containerPort"]
    return None


def sleep_seconds(prestop):
    if "sleep" in prestop:
        return int(prestop["sleep"]["seconds"])
    cmd = prestop.get("exec", {}).get("command", [])
    if cmd and cmd[0].endswith("sleep"):
        return int(cmd[1])
    return 0


# --------------------------------------------------------------------------- checks

def check_deployments(objs, rel):
    deps = {d["metadata"]["name"]: d for d in objs.of("Deployment")}
    assert set(deps) == {ROUTER, PREFILL, DECODE}, f"{rel}: Deployments {sorted(deps)}"
    for name, dep in deps.items():
        spec = dep["spec"]["template"]["spec"]
        assert selects(dep["spec"]["selector"], pod_labels(dep)), f"{name}: selector misses its pods"
        grace = spec.get("terminationGracePeriodSeconds")
        assert isinstance(grace, int), f"{rel} {name}: no terminationGracePeriodSeconds"
        for ic in spec.get("initContainers", []):
            r = ic.get("resources", {})
            assert r.get("requests") and r.get("limits"), f"{name}/{ic['name']}: init resources"
        assert len(spec["containers"]) == 1, f"{name}: one container expected"
        c = spec["containers"][0]
        where = f"{rel} {name}"
        env = container_env(objs, c)
        args = expand(c.get("args", []), env, where)
        assert c.get("command") == [f"/usr/local/bin/{name}"], f"{where}: command {c.get('command')}"
        assert "/" in c["image"] and c["image"] != "kimi-serve", f"{where}: image {c['image']}"
        # ports and the flags that open them
        grpc_port = port_of(c, "grpc")
        metrics_port = port_of(c, "metrics")
        assert grpc_port and metrics_port, f"{where}: needs container ports grpc and metrics"
        listen = flag(args, "listen")
        assert listen == f"0.0.0.0:{grpc_port}", f"{where}: --listen={listen} vs grpc port {grpc_port}"
        ml = flag(args, "metrics_listen")
        assert ml == f"0.0.0.0:{metrics_port}", f"{where}: --metrics_listen={ml}"
        # probes: Kubernetes-native gRPC health on the serving port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe)
            assert p and p.get("grpc", {}).get("port") == grpc_port, \
                f"{where}: {probe} must be a grpc probe on port {grpc_port}"
        live = c["livenessProbe"]
        drain = float(flag(args, "drain_grace_seconds") or 30)
        live_window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
        assert live_window >= drain, \
            f"{where}: liveness would kill a draining pod ({live_window}s < {drain}s NOT_SERVING)"
        # drain: preStop sleep, then SIGTERM -> drain_grace_seconds (+5 s shutdown)
        pre = c.get("lifecycle", {}).get("preStop")
        assert pre, f"{where}: no preStop hook"
        pre_s = sleep_seconds(pre)
        assert pre_s >= 5, f"{where}: preStop sleep {pre_s}s too short for endpoint removal"
        assert grace >= pre_s + drain + 5, \
            f"{where}: grace {grace}s < preStop {pre_s}s + drain {drain}s + 5s shutdown"
        # resources
        res = c.get("resources", {})
        for k in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert r in res.get(k, {}), f"{where}: resources.{k}.{r} missing"
        # model volume, read-only at /models
        mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/models"]
        assert mounts and mounts[0].get("readOnly") is True, f"{where}: /models must be mounted readOnly"
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        assert mounts[0]["name"] in vols, f"{where}: volume {mounts[0]['name']} missing"
        model = flag(args, "model")
        assert model and model.startswith("/models/"), f"{where}: --model={model}"
        if name in (PREFILL, DECODE):
            assert flag(args, "threads"), f"{where}: --threads missing"
        if name == DECODE:
            assert int(flag(args, "slots")) >= 1, f"{where}: --slots"
    return deps


def check_services(objs, deps, rel):
    svcs = {s["metadata"]["name"]: s for s in objs.of("Service")}
    for name in (ROUTER, PREFILL, DECODE):
        s = svcs.get(name)
        assert s, f"{rel}: Service {name} missing"
        c = deps[name]["spec"]["template"]["spec"]["containers"][0]
        assert selects({"matchLabels": s["spec"]["selector"]}, pod_labels(deps[name])), \
            f"{rel}: Service {name} does not select its Deployment's pods"
        ports = {p["name"]: p for p in s["spec"]["ports"]}
        assert "grpc" in ports and "metrics" in ports, f"{rel}: Service {name} ports {list(ports)}"
        assert ports["grpc"].get("targetPort") in ("grpc", port_of(c, "grpc"))
        assert ports["grpc"]["port"] == port_of(c, "grpc") or name == ROUTER, \
            f"{rel}: headless Service {name} port must equal the container's (DNS gives pod IPs)"
    for name in (PREFILL, DECODE):
        assert svcs[name]["spec"].get("clusterIP") == "None", f"{rel}: {name} must be headless"
    assert svcs[ROUTER]["spec"].get("clusterIP") != "None", f"{rel}: router Service is not headless"
    return svcs


def check_router_dns(objs, deps, svcs, rel):
    c = deps[ROUTER]["spec"]["template"]["spec"]["containers"][0]
    args = expand(c["args"], container_env(objs, c), f"{rel} router")
    assert not flag(args, "prefill") and not flag(args, "decode"), "router uses DNS, not static lists"
    for fl, target in (("prefill_dns", PREFILL), ("decode_dns", DECODE)):
        val = flag(args, fl)
        assert val, f"{rel}: router has no --{fl}"
        for entry in val.split(","):
            host, port = entry.rsplit(":", 1)
            m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", host)
            assert m, f"{rel}: --{fl}={entry} is not <service>.<namespace>.svc.cluster.local:PORT"
            svc_name, ns = m.groups()
            svc = svcs.get(svc_name)
            assert svc and svc["metadata"].get("namespace") == ns, \
                f"{rel}: --{fl} names {svc_name}.{ns}, no such Service in that namespace"
            assert svc["spec"].get("clusterIP") == "None", f"{rel}: --{fl} Service not headless"
            assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(deps[target])), \
                f"{rel}: --{fl} Service does not select {target} pods"
            wc = deps[target]["spec"]["template"]["spec"]["containers"][0]
            assert int(port) == port_of(wc, "grpc"), \
                f"{rel}: --{fl} port {port} != {target} grpc port {port_of(wc, 'grpc')}"


def rule_peers_allow(rule, labels):
    """Does this ingress rule admit a pod (same namespace) with these labels?"""
    peers = rule.get("from")
    if not peers:
        return True
    return any("podSelector" in p and "namespaceSelector" not in p and
               selects(p["podSelector"], labels) for p in peers)


def rule_ports(rule):
    """The ports a rule opens (a port with endPort: the whole range); None = all."""
    if not rule.get("ports"):
        return None
    ports = set()
    for p in rule["ports"]:
        ports.update(range(p["port"], p.get("endPort", p["port"]) + 1))
    return ports


def ingress_rules(objs, labels):
    """Every ingress rule of the NetworkPolicies that select pods with these labels."""
    mine = [p for p in objs.of("NetworkPolicy") if selects(p["spec"]["podSelector"], labels)
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    return mine, [r for p in mine for r in p["spec"].get("ingress", [])]


def admits(rules, peer_labels, port):
    return any(rule_peers_allow(r, peer_labels) and
               (rule_ports(r) is None or port in rule_ports(r)) for r in rules)


def check_network_policy(objs, deps, rel):
    router_l, prefill_l = pod_labels(deps[ROUTER]), pod_labels(deps[PREFILL])
    stranger = {"app.kubernetes.io/name": "some-other-app"}
    for name, allowed in ((PREFILL, [router_l]), (DECODE, [router_l, prefill_l])):
        labels = pod_labels(deps[name])
        c = deps[name]["spec"]["template"]["spec"]["containers"][0]
        grpc, metrics = port_of(c, "grpc"), port_of(c, "metrics")
        mine, rules = ingress_rules(objs, labels)
        assert mine, f"{rel}: no NetworkPolicy selects {name}"
        for peer in allowed:
            assert admits(rules, peer, grpc), f"{rel}: {name} grpc not reachable from {peer}"
        assert not admits(rules, stranger, grpc), f"{rel}: {name} grpc port open to any pod"
        if name == PREFILL:
            assert not admits(rules, pod_labels(deps[DECODE]), grpc), \
                f"{rel}: decode may reach prefill"
        assert any(any("namespaceSelector" in p for p in r.get("from", [])) and
                   metrics in (rule_ports(r) or {metrics}) for r in rules), \
            f"{rel}: Prometheus cannot reach {name} metrics port"


def check_autoscaling(objs, deps, rel):
    hpas = objs.of("HorizontalPodAutoscaler")
    assert hpas, f"{rel}: no HPA"
    targets = set()
    for h in hpas:
        assert h["apiVersion"] == "autoscaling/v2", f"{rel}: HPA {h['metadata']['name']} apiVersion"
        ref = h["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deps, f"{rel}: HPA targets {ref}"
        assert ref.get("apiVersion") == "apps/v1"
        ms = h["spec"]["metrics"]
        assert any(m["type"] == "Pods" and m["pods"]["metric"]["name"] == "kl_num_requests_waiting"
                   for m in ms), f"{rel}: HPA {h['metadata']['name']} lacks the queue-depth Pods metric"
        assert 1 <= h["spec"].get("minReplicas", 1) <= h["spec"]["maxReplicas"]
        assert "replicas" not in deps[ref["name"]]["spec"], \
            f"{rel}: {ref['name']} sets spec.replicas; every apply would undo the HPA's scale"
        targets.add(ref["name"])
    assert {PREFILL, DECODE} <= targets, f"{rel}: HPAs target {targets}; want prefill and decode"
    pdbs = objs.of("PodDisruptionBudget")
    for name in (ROUTER, PREFILL, DECODE):
        assert any(selects(p["spec"]["selector"], pod_labels(deps[name])) for p in pdbs), \
            f"{rel}: no PodDisruptionBudget for {name}"


def check_service_monitor(objs, svcs, rel):
    sms = objs.of("ServiceMonitor")
    assert sms and sms[0]["apiVersion"] == "monitoring.coreos.com/v1", f"{rel}: ServiceMonitor"
    for name in (ROUTER, PREFILL, DECODE):
        s = svcs[name]
        ok = any(selects(sm["spec"]["selector"], s["metadata"].get("labels", {})) and
                 any(e.get("port") in {p["name"] for p in s["spec"]["ports"]}
                     for e in sm["spec"]["endpoints"]) for sm in sms)
        assert ok, f"{rel}: no ServiceMonitor scrapes Service {name}"


def check_prometheus_rule(objs, rel):
    """The PrometheusRule carries exactly the groups of the plain rule file
    (deploy/monitoring/kimi-serve.rules.yaml: promtool checks and tests that
    one, tests/observability loads it into a real Prometheus)."""
    prs = objs.of("PrometheusRule")
    assert len(prs) == 1 and prs[0]["apiVersion"] == "monitoring.coreos.com/v1", \
        f"{rel}: one PrometheusRule expected"
    sms = objs.of("ServiceMonitor")
    assert prs[0]["metadata"]["labels"].get("release") == sms[0]["metadata"]["labels"].get("release"), \
        f"{rel}: PrometheusRule and ServiceMonitor must carry the same release label"
    path = os.path.join(repo_root(), "deploy", "monitoring", "kimi-serve.rules.yaml")
    with open(path) as f:
        plain = load_yaml_all(f.read())[0]
    assert prs[0]["spec"] == plain, (
        f"{rel}: deploy/kustomize/base/prometheusrule.yaml's spec differs from "
        "deploy/monitoring/kimi-serve.rules.yaml; copy the rule file's groups into it")


def check_namespace(objs, rel):
    for d in objs.docs:
        if d["kind"] == "Namespace":
            continue
        assert d["metadata"].get("namespace") == NAMESPACE, \
            f"{rel}: {d['kind']} {d['metadata']['name']} not in namespace {NAMESPACE}"


def check_cpu_overlay(objs, deps):
    for name, dep in deps.items():
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        args = expand(c["args"], container_env(objs, c), name)
        ics = spec.get("initContainers", [])
        assert ics, f"cpu {name}: no initContainer making the tiny model"
        ic = ics[0]
        assert ic["command"] == ["/usr/local/bin/make_checkpoint"], f"cpu {name}: {ic['command']}"
        assert "--preset=tiny" in ic["args"] and f"--out_dir={flag(args, 'model')}" in ic["args"], \
            f"cpu {name}: initContainer must write --model's folder: {ic['args']}"
        vol = {v["name"]: v for v in spec["volumes"]}["models"]
        assert "emptyDir" in vol and len(vol) == 2, f"cpu {name}: models volume {vol}"
        assert any(m["mountPath"] == "/models" and not m.get("readOnly") for m in ic["volumeMounts"])
        for k in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c["resources"].get(k, {}), f"cpu {name} asks for a GPU"


def check_gpu_overlay(objs, deps):
    for name in (PREFILL, DECODE):
        spec = deps[name]["spec"]["template"]["spec"]
        res = spec["containers"][0]["resources"]
        for k in ("requests", "limits"):
            assert int(res.get(k, {}).get("nvidia.com/gpu", 0)) >= 1, f"gpu {name}: {k} nvidia.com/gpu"
        assert spec.get("nodeSelector") or spec.get("affinity"), f"gpu {name}: no GPU node selection"
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), \
            f"gpu {name}: no toleration for nvidia.com/gpu taints"
        assert ":" in spec["containers"][0]["image"] and "cuda" in spec["containers"][0]["image"]
    assert "nvidia.com/gpu" not in str(deps[ROUTER]["spec"]["template"]["spec"]["containers"][0]
                                       .get("resources")), "gpu: the router needs no GPU"
    pvcs = {p["metadata"]["name"] for p in objs.of("PersistentVolumeClaim")}
    for name, dep in deps.items():
        vol = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}["models"]
        claim = vol.get("persistentVolumeClaim", {}).get("claimName")
        assert claim in pvcs, f"gpu {name}: models volume must be a rendered PVC, got {vol}"


def check_nccl_overlay(objs, deps):
    """NCCL between worker pods: each pod pins its ephemeral port range
    (sysctl), each kind reaches the other on that whole range (bootstrap and
    socket transport; the prefill gRPC port excepted, check_network_policy)
    and no other pod does; both workers allow peers on other hosts and name
    the socket interface."""
    stranger = {"app.kubernetes.io/name": "some-other-app"}
    for name, peer in ((PREFILL, DECODE), (DECODE, PREFILL)):
        sysctls = {s["name"]: s["value"] for s in
                   deps[name]["spec"]["template"]["spec"].get("securityContext", {})
                   .get("sysctls", [])}
        assert "net.ipv4.ip_local_port_range" in sysctls, \
            f"gpu-nccl: {name} does not pin its ephemeral ports"
        lo, hi = (int(x) for x in sysctls["net.ipv4.ip_local_port_range"].split())
        grpc = port_of(deps[name]["spec"]["template"]["spec"]["containers"][0], "grpc")
        _, rules = ingress_rules(objs, pod_labels(deps[name]))
        for port in sorted({lo, lo + 1, (lo + hi) // 2, hi - 1, hi} - {grpc}):
            assert admits(rules, pod_labels(deps[peer]), port), \
                f"gpu-nccl: {peer} cannot reach {name} on port {port}"
            assert not admits(rules, stranger, port), f"gpu-nccl: {name} port {port} open to any pod"
        c = deps[name]["spec"]["template"]["spec"]["containers"][0]
        assert "--nccl_cross_host" in c.get("args", []), f"gpu-nccl: {name} without --nccl_cross_host"
        assert container_env(objs, c).get("NCCL_SOCKET_IFNAME"), \
            f"gpu-nccl: {name} has no NCCL_SOCKET_IFNAME"


def check_rendered(objs, rel):
    check_namespace(objs, rel)
    deps = check_deployments(objs, rel)
    svcs = check_services(objs, deps, rel)
    check_router_dns(objs, deps, svcs, rel)
    check_network_policy(objs, deps, rel)
    check_autoscaling(objs, deps, rel)
    check_service_monitor(objs, svcs, rel)
    check_prometheus_rule(objs, rel)
    if rel == "overlays/cpu":
        check_cpu_overlay(objs, deps)
    if rel in ("overlays/gpu", "overlays/gpu-nccl"):
        check_gpu_overlay(objs, deps)
    if rel == "overlays/gpu-nccl":
        check_nccl_overlay(objs, deps)


# --------------------------------------------------------------------------- local run

def find_binaries(root):
    cands = []
    if os.environ.get("KL_DEPLOY_BIN_DIR"):
        d = os.environ["KL_DEPLOY_BIN_DIR"]
        cands.append({b: os.path.join(d, b) for b in BINARIES})
    cands.append({"kl-router": os.path.join(root, "services/router/kl-router"),
                  "kl-prefill": os.path.join(root, "services/prefill/kl-prefill"),
                  "kl-decode": os.path.join(root, "services/decode/kl-decode"),
                  "make_checkpoint": os.path.join(root, "tools/make_checkpoint/make_checkpoint")})
    for c in cands:
        if all(os.access(p, os.X_OK) for p in c.values()):
            return c
    raise Skip("binaries not found (run under Bazel, or set KL_DEPLOY_BIN_DIR)")


def find_client(root):
    """tests/integration/python_client.py: in runfiles when exported, else next to
    this script's real (source tree) location."""
    here = os.path.dirname(os.path.realpath(__file__))
    for c in (os.path.join(root, "tests/integration/python_client.py"),
              os.path.join(here, "..", "integration", "python_client.py")):
        if os.path.exists(c):
            return c
    raise Skip("tests/integration/python_client.py not found")


def python_stubs(root, work):
    """generation_pb2 / health_pb2 (+ _grpc) generated from proto/ with the system protoc."""
    out = os.path.join(work, "py")
    os.makedirs(out, exist_ok=True)
    subprocess.run(["/usr/bin/protoc", "-I", os.path.join(root, "proto"), "--python_out", out,
                    "--grpc_out", out, "--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin",
                    "generation.proto", "health.proto"], check=True)
    if out not in sys.path:
        sys.path.insert(0, out)
    import importlib
    return {m: importlib.import_module(m) for m in
            ("generation_pb2", "generation_pb2_grpc", "health_pb2", "health_pb2_grpc")}


def health(mods, port):
    """The kubelet's grpc probe: grpc.health.v1.Health/Check, service ""."""
    import grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = mods["health_pb2_grpc"].HealthStub(ch)
        r = stub.Check(mods["health_pb2"].HealthCheckRequest(service=""), timeout=5)
        return mods["health_pb2"].HealthCheckResponse.ServingStatus.Name(r.status)


def check_health_and_drain(root, work, local_port, procs, max_tokens=3000):
    """Every process answers SERVING; SIGTERM to the router mid-stream: health turns
    NOT_SERVING, a new request gets UNAVAILABLE, the running stream still finishes."""
    import threading
    import grpc
    mods = python_stubs(root, work)
    for name, port in local_port.items():
        st = health(mods, port)
        assert st == "SERVING", f"{name}: health {st}, the readiness probe would fail"
    print("  health: all SERVING", flush=True)
    pb, pbg = mods["generation_pb2"], mods["generation_pb2_grpc"]
    ch = grpc.insecure_channel(f"127.0.0.1:{local_port[ROUTER]}")
    stub = pbg.GenerationStub(ch)

    def request(rid, n):
        req = pb.GenerateRequest(text="Once upon a time", request_id=rid)
        req.sampling.temperature = 0.0
        req.sampling.max_tokens = n
        req.sampling.ignore_eos = True
        return req

    got, result, first = [], {}, threading.Event()

    def reader():
        try:
            for chunk in stub.Generate(request("drain-stream", max_tokens), timeout=120):
                got.extend(chunk.token_ids)
                if got:
                    first.set()
                if chunk.finish_reason:
                    result["finish"] = pb.FinishReason.Name(chunk.finish_reason)
            result["code"] = "OK"
        except grpc.RpcError as e:
            result["code"] = e.code().name
            result["msg"] = e.details()
        first.set()

    t = threading.Thread(target=reader)
    t.start()
    assert first.wait(60), "no first token within 60 s"
    procs[ROUTER].send_signal(signal.SIGTERM)
    at_signal = len(got)
    time.sleep(0.3)
    running = t.is_alive()
    if running:
        try:
            st = health(mods, local_port[ROUTER])
        except grpc.RpcError as e:
            # The router stops listening once the stream is done; only then
            # may the probe find nobody there.
            t.join(5)
            assert not t.is_alive(), f"router unreachable while draining: {e.code()}"
            st, running = "NOT_SERVING", False
        assert st == "NOT_SERVING", f"router health {st} while draining; want NOT_SERVING"
    if running:
        try:
            list(stub.Generate(request("during-drain", 4), timeout=10))
            raise AssertionError("router accepted a new request while draining")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, f"during drain: {e.code()} {e.details()}"
    t.join(120)
    ch.close()
    assert result.get("code") == "OK" and len(got) == max_tokens, \
        f"stream cut by the drain: {result}, {len(got)}/{max_tokens} tokens"
    assert procs[ROUTER].wait(60) == 0, "router did not exit 0 after draining"
    if running:
        print(f"  drain: SIGTERM at token {at_signal}/{max_tokens}; NOT_SERVING, new request "
              f"UNAVAILABLE, stream finished ({result.get('finish')}), router exit 0", flush=True)
    else:
        print(f"  drain: stream ended before the check ({at_signal} tokens at SIGTERM); "
              "raise max_tokens to exercise the drain", flush=True)


_ports_given = set()


def free_port():
    """A free loopback port, never one handed out before (it is bound only later)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def supports_flag(binary, name):
    r = subprocess.run([binary, "--helpfull"], capture_output=True, text=True, timeout=30)
    return f"-{name} " in r.stdout + r.stderr or f"--{name}" in r.stdout + r.stderr


def localize(args, port_map, models_dir, metrics_ok):
    """Cluster args -> loopback args. port_map: 'host:port' or ':port' -> '127.0.0.1:NEW'."""
    out = []
    for a in args:
        if a.startswith("--metrics_listen=") and not metrics_ok:
            continue  # binary predates --metrics_listen; nothing to check there
        for k, v in port_map.items():
            a = a.replace(k, v)
        a = a.replace("=/models", "=" + models_dir)
        out.append(a)
    return out


def wait_port(port, proc, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"port {port} did not open in {timeout}s")


def run_cpu_overlay(objs, root, work):
    bins = find_binaries(root)
    try:
        import grpc  # noqa: F401  python3-grpcio
    except ImportError:
        raise Skip("python3-grpcio missing (apt-get install python3-grpcio python3-protobuf)")
    for tool in ("/usr/bin/protoc", "/usr/bin/grpc_python_plugin"):
        if not os.access(tool, os.X_OK):
            raise Skip(f"{tool} missing (apt-get install protobuf-compiler protobuf-compiler-grpc)")
    deps = {d["metadata"]["name"]: d for d in objs.of("Deployment")}
    svcs = {s["metadata"]["name"]: s for s in objs.of("Service")}
    # every Service DNS name (and the pod's own listen address) -> a loopback port
    port_map, local_port = {}, {}
    for name, dep in deps.items():
        c = dep["spec"]["template"]["spec"]["containers"][0]
        p = free_port()
        local_port[name] = p
        ns = svcs[name]["metadata"]["namespace"]
        svc_port = [sp["port"] for sp in svcs[name]["spec"]["ports"] if sp["name"] == "grpc"][0]
        for host in (f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}", name):
            port_map[f"{host}:{svc_port}"] = f"127.0.0.1:{p}"
        port_map[f"0.0.0.0:{port_of(c, 'grpc')}"] = f"127.0.0.1:{p}"
    procs, logs, metrics_port = [], {}, {}
    try:
        order = [PREFILL, DECODE, ROUTER]  # workers first (the router tolerates either order)
        for name in order:
            spec = deps[name]["spec"]["template"]["spec"]
            models = os.path.join(work, "models-" + name)  # one emptyDir per pod
            os.makedirs(models, exist_ok=True)
            for ic in spec.get("initContainers", []):
                exe = bins[os.path.basename(ic["command"][0])]
                args = localize(expand(ic.get("args", []), container_env(objs, ic), ic["name"]),
                                port_map, models, True)
                r = subprocess.run([exe] + args, capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, f"{name}/{ic['name']}: {r.stderr}"
            c = spec["containers"][0]
            exe = bins[os.path.basename(c["command"][0])]
            metrics_ok = supports_flag(exe, "metrics_listen")
            if metrics_ok:
                m = free_port()
                metrics_port[name] = m
                port_map_m = dict(port_map, **{f"0.0.0.0:{port_of(c, 'metrics')}": f"127.0.0.1:{m}"})
            else:
                port_map_m = port_map
            args = localize(expand(c["args"], container_env(objs, c), name), port_map_m, models,
                            metrics_ok)
            log = open(os.path.join(work, name + ".log"), "w")
            logs[name] = log.name
            print(f"  start {name}: {os.path.basename(exe)} {' '.join(args)}", flush=True)
            p = subprocess.Popen([exe] + args, stdout=log, stderr=subprocess.STDOUT)
            procs.append((name, p))
            wait_port(local_port[name], p)
        client = find_client(root)
        proto_dir = os.path.join(root, "proto")
        r = None
        for attempt in range(30):  # the router finds ready workers within a health interval
            r = subprocess.run(["/usr/bin/python3", client, "--router", f"127.0.0.1:{local_port[ROUTER]}",
                                "--proto_dir", proto_dir, "--prompt", "Once upon a time",
                                "--max_tokens", "8", "--ignore_eos"],
                               capture_output=True, text=True, timeout=180)
            if r.returncode == 0:
                break
            time.sleep(0.5)
        assert r.returncode == 0, f"python client failed:\n{r.stderr[-3000:]}"
        out = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  generation: {out}", flush=True)
        assert len(out["tokens"]) == 8 and out["indices"] == list(range(8)), out
        assert out["finish"] == "FINISH_REASON_LENGTH" or out["finish"].endswith("LENGTH"), out
        # metrics: every process that has --metrics_listen serves Prometheus text,
        # and the HPAs' Pods metric exists on the pods they scale
        hpa_metric = {h["spec"]["scaleTargetRef"]["name"]: m["pods"]["metric"]["name"]
                      for h in objs.of("HorizontalPodAutoscaler") for m in h["spec"]["metrics"]
                      if m["type"] == "Pods"}
        for name in order:
            if name not in metrics_port:
                print(f"  {name}: binary has no --metrics_listen yet; metrics not checked", flush=True)
                continue
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port[name]}/metrics",
                                        timeout=10) as resp:
                body = resp.read().decode()
            assert "# TYPE" in body, f"{name}: /metrics is not Prometheus text"
            if name in hpa_metric:
                assert re.search(rf"^{hpa_metric[name]}\b", body, re.M), \
                    f"{name}: HPA metric {hpa_metric[name]} not exported"
            print(f"  {name}: /metrics ok ({body.count(chr(10))} lines)", flush=True)
        # what the kubelet's grpc probes see, and the drain a pod's SIGTERM starts
        check_health_and_drain(root, work, local_port, dict(procs))
        # SIGTERM drains: every process exits 0 within the pod's grace period
        for name, p in reversed(procs):
            if p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
        for name, p in procs:
            grace = deps[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            rc = p.wait(timeout=grace)  # the router already exited in the drain check
            assert rc == 0, f"{name} exited {rc} on SIGTERM"
        procs = []
    except BaseException:
        for name, path in logs.items():
            with open(path) as fh:
                sys.stderr.write(f"--- {name} log (tail) ---\n{fh.read()[-2000:]}\n")
        raise
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------- main

def main():
    strict = os.environ.get("KL_DEPLOY_TEST_STRICT") == "1"
    root = repo_root()
    work, cleanup = tmp_root()
    try:
        return run_all(root, work, strict)
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)


def run_all(root, work, strict):
    os.environ.setdefault("HOME", work)
    # Copy the tree with symlinks resolved (Bazel runfiles are symlinks, and
    # kustomize refuses files that resolve outside the kustomization root).
    kdir = os.path.join(work, "kustomize")
    shutil.rmtree(kdir, ignore_errors=True)
    shutil.copytree(os.path.join(root, "deploy", "kustomize"), kdir, symlinks=False)

    cases = []  # (name, status, message)
    rendered = {}

    def case(name, fn):
        try:
            fn()
            cases.append((name, "passed", ""))
            print(f"[PASS] {name}", flush=True)
        except Skip as e:
            status = "failed" if strict else "skipped"
            cases.append((name, status, str(e)))
            print(f"[{'FAIL' if strict else 'SKIP'}] {name}: {e}", flush=True)
        except Exception as e:  # noqa: BLE001
            cases.append((name, "failed", f"{e}\n{traceback.format_exc()}"))
            print(f"[FAIL] {name}: {e}", flush=True)

    kubectl = []

    def get_kubectl():
        kubectl.append(find_kubectl())
        load_yaml_all("a: 1")
    case("tools", get_kubectl)
    for rel in OVERLAYS:
        def one(rel=rel):
            if not kubectl:
                raise Skip("no usable kubectl / python3-yaml (see 'tools')")
            rendered[rel] = Objects(render(kubectl[0], kdir, rel))
            check_rendered(rendered[rel], rel)
        case(f"render_and_check[{rel}]", one)

    def local():
        if "overlays/cpu" not in rendered:
            raise Skip("CPU overlay not rendered")
        run_cpu_overlay(rendered["overlays/cpu"], root, work)
    case("local_run[overlays/cpu]", local)

    xml_path = os.environ.get("XML_OUTPUT_FILE")
    if xml_path:
        suite = ET.Element("testsuite", name="deploy_test", tests=str(len(cases)))
        for name, status, msg in cases:
            tc = ET.SubElement(suite, "testcase", name=name, classname="deploy")
            if status == "failed":
                ET.SubElement(tc, "failure", message=msg.splitlines()[0] if msg else "").text = msg
            elif status == "skipped":
                ET.SubElement(tc, "skipped", message=msg)
        root_el = ET.Element("testsuites")
        root_el.append(suite)
        ET.ElementTree(root_el).write(xml_path, encoding="utf-8", xml_declaration=True)
    p = sum(1 for c in cases if c[1] == "passed")
    f = sum(1 for c in cases if c[1] == "failed")
    s = sum(1 for c in cases if c[1] == "skipped")
    print(f"deploy_test: {p} passed, {f} failed, {s} skipped")
    return 1 if f else 0


if __name__ == "__main__":
    sys.exit(main())
