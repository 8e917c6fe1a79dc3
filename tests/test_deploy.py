"""The deployment files in ``engine/deploy/`` are valid and agree with each other and with the code.

Offline: the Kubernetes manifests are checked against the Kubernetes JSON schemas that the
``kubernetes-validate`` package ships (two Kubernetes versions), the compose file against the compose-spec
schema vendored in ``engine/deploy/schemas/``. Then what matters for running several replicas: the probes
ask gRPC health on the gRPC port, the Services, PodDisruptionBudget and HorizontalPodAutoscaler find the
pods, every ConfigMap and Secret the pods use is in the set, the rule files are all mounted, and the
``nba serve`` arguments of the Deployment, the image and compose parse with the real ``nba`` parser. Each
check returns the problems it finds, so the tests also show that a broken manifest is caught. Last, the
probe script and gRPC client-side round_robin over ``ipv4:`` addresses run against real servers on
127.0.0.1. Not covered: applying the manifests to a live cluster, building the image, starting compose.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .certs import CA

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "engine" / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest we claim (lifecycle.preStop.sleep) and the newest schema shipped
GRPC_PORT = 50051


# --- loading -------------------------------------------------------------------------------------------

def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def generated_configmaps(kust: dict) -> list[dict]:
    """The ConfigMaps of ``configMapGenerator`` (``key=path`` file entries), as kustomize makes them,
    without the name hash."""
    maps = []
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for entry in gen.get("files", []):
            key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (K8S / path).resolve().read_text()
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return maps


def manifests() -> list[dict]:
    """Every object ``kubectl kustomize`` would emit (resources + generated ConfigMaps)."""
    kust = kustomization()
    docs = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs + generated_configmaps(kust)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- checks: each returns a list of problems ------------------------------------------------------------

def schema_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} (k8s {e.version}): {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(e.message)
    return problems


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _serve_args(argv: list[str]):
    """``nba serve`` parsed by the real parser of engine/cli.py (SystemExit for an unknown flag)."""
    import engine.cli as cli

    seen = []
    original = cli.cmd_serve
    cli.cmd_serve = lambda args: seen.append(args) or 0
    try:
        cli.main(["serve", *argv])
    finally:
        cli.cmd_serve = original
    return seen[0]


def serve_problems(command: list[str]) -> list[str]:
    if command[:2] != ["nba", "serve"]:
        return [f"the command is {command[:2]}, not nba serve"]
    try:
        _serve_args(command[2:])
    except SystemExit as e:
        return [f"nba serve rejects {command[2:]} (exit {e.code})"]
    return []


def k8s_problems(docs: list[dict]) -> list[str]:
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deploy = one(docs, "Deployment")
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    if not _matches(spec["selector"]["matchLabels"], labels):
        problems.append("the Deployment's selector does not match its pod labels")
    annotations = spec["template"]["metadata"].get("annotations", {})
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if ports.get("grpc") != GRPC_PORT:
        problems.append(f"no container port named grpc = {GRPC_PORT}")
    if annotations.get("prometheus.io/scrape") != "true" or int(annotations.get("prometheus.io/port", 0)) != ports.get("metrics"):
        problems.append("the pod's prometheus.io annotations do not point at the metrics port")

    # the image's entrypoint and these args: a real nba serve command line, listening where the ports say
    command = container.get("command", []) + container.get("args", [])
    bad_command = serve_problems(command)
    problems += bad_command
    args = None if bad_command else _serve_args(command[2:])
    if args is not None:
        if not args.address.endswith(f":{ports.get('grpc')}"):
            problems.append(f"--address {args.address} is not the grpc port")
        if args.metrics_port != ports.get("metrics") or args.metrics_host != "0.0.0.0":
            problems.append("--metrics-host/--metrics-port do not expose the metrics port")

    # probes: grpc.health.v1 on the gRPC port (built-in grpc: probe, or the image's TLS health check)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            problems.append(f"no {kind}")
        elif "grpc" in probe:
            if probe["grpc"].get("port") != ports.get("grpc"):
                problems.append(f"{kind} is not on the grpc port")
        elif "exec" in probe:
            cmd = probe["exec"]["command"]
            address = next((a.split("=", 1)[1] for a in cmd if a.startswith("--address=")), "")
            if cmd[0] != "grpc-health-check" or address != f"127.0.0.1:{ports.get('grpc')}":
                problems.append(f"{kind} does not run grpc-health-check on the grpc port: {cmd}")
        else:
            problems.append(f"{kind} is not a gRPC health probe")

    # securityContext: non-root, read-only root, and every path nba writes is a volume
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    if not (pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
        problems.append("not runAsNonRoot")
    if not sc.get("readOnlyRootFilesystem"):
        problems.append("no readOnlyRootFilesystem")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if args is not None:
        for path in ("/tmp", str(args.models_dir)):
            if path not in mounts:
                problems.append(f"nba writes {path} but it is not a volume")
        for flag in ("rules_dir", "tls_cert", "tls_key", "auth"):
            value = str(getattr(args, flag))
            if not any(value == m or value.startswith(m + "/") for m in mounts):
                problems.append(f"--{flag.replace('_', '-')} {value} is not on a mounted volume")
    if "requests" not in container.get("resources", {}) or "limits" not in container.get("resources", {}):
        problems.append("no resource requests and limits")

    # every ConfigMap / Secret used exists in the set
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for name in mounts.values():
        if name not in volumes:
            problems.append(f"volumeMount {name} has no volume")
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
            problems.append(f"ConfigMap {v['configMap']['name']} is not in the set")
        if "secret" in v and v["secret"]["secretName"] not in by_kind.get("Secret", {}):
            problems.append(f"Secret {v['secret']['secretName']} is not in the set")
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            secret = by_kind.get("Secret", {}).get(ref["name"])
            if secret is None or ref["key"] not in {**secret.get("data", {}), **secret.get("stringData", {})}:
                problems.append(f"env {env['name']}: Secret {ref['name']} key {ref['key']} is not in the set")
    if "REDIS_URL" not in {e["name"] for e in container.get("env", [])}:
        problems.append("no REDIS_URL")

    # the rules ConfigMap: every key is mounted where the rules dir expects its file, nothing missing
    rules_volume = volumes.get(mounts.get(str(args.rules_dir), "")) if args is not None else None
    if rules_volume is None or "configMap" not in rules_volume:
        problems.append("--rules-dir is not a mounted ConfigMap")
    else:
        cm = by_kind["ConfigMap"].get(rules_volume["configMap"]["name"], {})
        items = {i["key"]: i["path"] for i in rules_volume["configMap"].get("items", [])}
        want = {str(p.relative_to(REPO / "rules")) for p in (REPO / "rules").rglob("*.yaml")
                if not p.relative_to(REPO / "rules").parts[0] == "examples"}  # other businesses' rule dirs
        if set(items.values()) != want:
            problems.append(f"rule files not mounted: {sorted(want - set(items.values()))}, "
                            f"mounted but not in rules/: {sorted(set(items.values()) - want)}")
        for key, path in items.items():
            if cm.get("data", {}).get(key) != (REPO / "rules" / path).read_text():
                problems.append(f"ConfigMap key {key} does not hold rules/{path}")

    # Services, PDB and HPA find the Deployment's pods
    for name, svc in by_kind.get("Service", {}).items():
        if not _matches(svc["spec"].get("selector", {}), labels):
            problems.append(f"Service {name} does not select the pods")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
                problems.append(f"Service {name} port {p['name']} targets no container port")
    if not any(s["spec"].get("clusterIP") == "None" for s in by_kind.get("Service", {}).values()):
        problems.append("no headless Service")
    if not any(s["spec"].get("clusterIP") != "None" for s in by_kind.get("Service", {}).values()):
        problems.append("no ClusterIP Service")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        if not _matches(pdb["spec"]["selector"].get("matchLabels", {}), labels):
            problems.append(f"PodDisruptionBudget {name} does not select the pods")
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    if not hpas:
        problems.append("no HorizontalPodAutoscaler")
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"], target["apiVersion"]) != ("Deployment", deploy["metadata"]["name"], "apps/v1"):
            problems.append(f"HorizontalPodAutoscaler {name} does not scale the Deployment")
        if not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", [])):
            problems.append(f"HorizontalPodAutoscaler {name} does not scale on CPU")
    return problems


def compose_doc() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_problems(doc: dict) -> list[str]:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    services = doc.get("services", {})
    nodes = {name: s for name, s in services.items() if "--cluster-enabled yes" in " ".join(s.get("command", []))}
    if len(nodes) != 6:
        problems.append(f"{len(nodes)} Redis Cluster nodes, not 6")
    addresses = {n["networks"]["redis"]["ipv4_address"] for n in nodes.values()
                 if isinstance(n.get("networks"), dict)}
    init = next((s for s in services.values() if "--cluster create" in " ".join(s.get("command", []))), None)
    if init is None:
        problems.append("no redis-cli --cluster create service")
    else:
        text = " ".join(init["command"])
        created = set(re.findall(r"(\d+\.\d+\.\d+\.\d+):6379", text.split("--cluster create", 1)[1].split("--cluster-replicas")[0]))
        if "--cluster-replicas 1" not in text or "--cluster-yes" not in text or created != addresses or len(created) != 6:
            problems.append("the init service does not create a cluster of the 6 nodes with one replica each")
    nba = {name: s for name, s in services.items() if s.get("build", {}).get("dockerfile") == "engine/deploy/Dockerfile"}
    if len(nba) < 2:
        problems.append(f"{len(nba)} nba replicas, not 2 or more")
    for name, s in nba.items():
        url = s.get("environment", {}).get("REDIS_URL", "")
        seeds = set(re.findall(r"(\d+\.\d+\.\d+\.\d+):6379", url))
        if not url.startswith("redis+cluster://") or not seeds or not seeds <= addresses:
            problems.append(f"{name}: REDIS_URL is not a redis+cluster:// URL of the cluster's nodes")
        init_name = next((n for n, v in services.items() if v is init), None)
        if (s.get("depends_on", {}).get(init_name) or {}).get("condition") != "service_completed_successfully":
            problems.append(f"{name} does not wait for the cluster to be made")
        entrypoint = dockerfile_entrypoint()[0]
        problems += [f"{name}: {p}" for p in serve_problems(entrypoint + s.get("command", []))]
    return problems


def dockerfile_entrypoint() -> tuple[list[str], list[str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    found = {}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)
    return found["ENTRYPOINT"], found.get("CMD", [])


# --- the tests -----------------------------------------------------------------------------------------

def test_kubernetes_manifests_are_valid_for_the_kubernetes_schemas() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                                         "ConfigMap", "Secret"}
    assert schema_problems(docs) == []


def test_kubernetes_manifests_agree_with_each_other_and_the_code() -> None:
    assert k8s_problems(manifests()) == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to run kustomize")
def test_kustomize_builds_the_set_that_the_checks_saw() -> None:
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(K8S)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    built = [d for d in yaml.safe_load_all(out) if d]
    assert schema_problems(built) == []
    rules = one(built, "ConfigMap")
    assert re.fullmatch(r"nba-rules-[a-z0-9]{10}", rules["metadata"]["name"])  # hashed, and the pods use that name
    pod = one(built, "Deployment")["spec"]["template"]["spec"]
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {rules["metadata"]["name"]}
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built if d["kind"] != "ConfigMap") == \
        sorted((d["kind"], d["metadata"]["name"]) for d in manifests() if d["kind"] != "ConfigMap")


def _mutated(change) -> list[dict]:
    docs = copy.deepcopy(manifests())
    change(docs)
    return docs


BROKEN = {
    "readiness probe on another port": lambda d: one(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ["readinessProbe"]["exec"]["command"].__setitem__(1, "--address=127.0.0.1:50052"),
    "HPA scales something else": lambda d: one(d, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].__setitem__("name", "nbx"),
    "PDB selects other pods": lambda d: one(d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].__setitem__(
        "app.kubernetes.io/name", "other"),
    "Service selects other pods": lambda d: one(d, "Service", "nba-headless")["spec"]["selector"].__setitem__(
        "app.kubernetes.io/component", "other"),
    "a Secret missing": lambda d: d.remove(one(d, "Secret", "nba-auth")),
    "an unknown nba serve flag": lambda d: one(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].append(
        "--no-such-flag"),
    "a rule file not mounted": lambda d: one(d, "Deployment")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"].pop(),
    "root filesystem writable": lambda d: one(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ["securityContext"].__setitem__("readOnlyRootFilesystem", False),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_manifest_is_caught(what: str) -> None:
    assert k8s_problems(_mutated(BROKEN[what])), f"{what}: not caught"


def test_a_manifest_the_schema_refuses_is_caught() -> None:
    def bad(docs: list[dict]) -> None:
        one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "often"
        one(docs, "Service", "nba")["spec"]["portz"] = []

    problems = schema_problems(_mutated(bad))
    assert any("periodSeconds" in p for p in problems) and any("portz" in p for p in problems), problems


def test_the_image_runs_nba_serve_with_flags_it_has() -> None:
    entrypoint, cmd = dockerfile_entrypoint()
    assert entrypoint == ["nba", "serve"]
    assert serve_problems(entrypoint + cmd) == []
    assert serve_problems(entrypoint + ["--tls-certificate", "x"]) != []


def test_compose_file_is_valid_and_runs_replicas_on_a_six_node_cluster() -> None:
    assert compose_problems(compose_doc()) == []


def test_a_broken_compose_file_is_caught() -> None:
    doc = compose_doc()
    doc["services"]["nba-2"]["ports"] = "50052"  # the schema wants a list
    del doc["services"]["redis-6"]
    doc["services"]["nba-1"]["environment"]["REDIS_URL"] = "redis://172.30.0.11:6379"
    problems = compose_problems(doc)
    assert any("ports" in p for p in problems) and any("not 6" in p for p in problems) \
        and any("redis+cluster" in p for p in problems), problems


# --- real gRPC on loopback: the probe script, and round_robin over several addresses ------------------

def _health_server(tls: tuple[bytes, bytes] | None = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([tls]) if tls else None
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, servicer


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEPLOY / "grpc-health-check"), *args],
                          capture_output=True, text=True, timeout=30)


def test_the_probe_script_checks_grpc_health_over_tls_and_plaintext(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    pair = ca.issue("server", "nba.default.svc", server=True)
    server, port, servicer = _health_server((pair.key.read_bytes(), pair.cert.read_bytes()))
    plain, plain_port, _ = _health_server()
    try:
        ok = _probe(f"--address=127.0.0.1:{port}", f"--ca={ca.pem}", "--server-name=localhost")
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
        assert _probe(f"--address=127.0.0.1:{port}", f"--ca={ca.pem}").returncode == 0  # the cert names 127.0.0.1
        assert _probe(f"--address=127.0.0.1:{port}", "--timeout=2").returncode == 1  # plaintext to a TLS port
        other = CA(tmp_path / "other", name="someone else")
        assert _probe(f"--address=127.0.0.1:{port}", f"--ca={other.pem}", "--timeout=2").returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        down = _probe(f"--address=127.0.0.1:{port}", f"--ca={ca.pem}")
        assert down.returncode == 1 and "NOT_SERVING" in down.stdout
        assert _probe(f"--address=127.0.0.1:{plain_port}").returncode == 0
    finally:
        server.stop(None)
        plain.stop(None)


def _named_server(name: bytes) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name)  # bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Who", {"Name": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_round_robin_over_ipv4_addresses_reaches_every_replica() -> None:
    """The README's client-side load balancing: ``ipv4:HOST:PORT,HOST:PORT`` with round_robin spreads the
    calls of one channel over both servers; without it (pick_first) one server gets them all."""
    (a, port_a), (b, port_b) = _named_server(b"a"), _named_server(b"b")
    target = f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
    try:
        with grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as channel:
            call = channel.unary_unary("/test.Who/Name")
            seen = [call(b"", timeout=5, wait_for_ready=True) for _ in range(20)]
        assert set(seen) == {b"a", b"b"} and seen.count(b"a") >= 5, seen
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary("/test.Who/Name")
            assert len({call(b"", timeout=5, wait_for_ready=True) for _ in range(20)}) == 1
    finally:
        a.stop(None)
        b.stop(None)
