"""The deployment files in ``engine/deploy/`` are valid and agree with each other and with the code.

Offline: the Kubernetes manifests are checked against the Kubernetes JSON schemas that the
``kubernetes-validate`` package ships (two Kubernetes versions), the compose file against the compose-spec
schema vendored in ``engine/deploy/schemas/``. Then what matters for running several replicas: the probes
ask gRPC health on the gRPC port (liveness and startup the ``nba.liveness`` service, readiness ``""``),
with a client certificate when the server requires one, the Services, PodDisruptionBudget and
HorizontalPodAutoscaler find the pods, every ConfigMap and Secret the pods use is in the set, the rule
files are all mounted, and the ``nba serve`` arguments of the Deployment, the image and compose parse with
the real ``nba`` parser. Then what a security review asks (issue 27): a NetworkPolicy selects the pods and
admits gRPC from callers, metrics from the monitoring namespace only, egress to Redis and DNS only; the
metrics port is in no Service that callers use; Redis is reached over TLS (``rediss``) with its CA
mounted; no namespace is written into the set (the pods learn theirs from the downward API); every
replica reads one model registry (a ReadWriteMany claim, read-only for the servers) that a Job fills.
Each check returns the problems it finds, so the tests also show that a broken manifest is caught. Last,
the probe script (TLS, mTLS, ``--service``) and gRPC client-side round_robin over ``ipv4:`` addresses run
against real servers on 127.0.0.1. Not covered: applying the manifests to a live cluster (so neither
whether the network plugin enforces the NetworkPolicy nor whether the storage class offers ReadWriteMany),
building the image, starting compose.
"""

from __future__ import annotations

import copy
import json
import os
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
LIVENESS = "nba.liveness"  # engine/serving/health.py
REDIS_PORT = 6379
DNS_PORT = 53
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


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


def _on_volume(path: str, mounts: dict[str, str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _mount_of(path: str, mounts: dict[str, str]) -> str | None:
    """The volume name ``path`` lies on (the longest mount path that holds it)."""
    found = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
    return mounts[max(found, key=len)] if found else None


def rules_mount_problems(rules_volume: dict | None, by_kind: dict[str, dict[str, dict]], who: str) -> list[str]:
    if rules_volume is None or "configMap" not in rules_volume:
        return [f"{who} is not a mounted ConfigMap"]
    problems = []
    cm = by_kind.get("ConfigMap", {}).get(rules_volume["configMap"]["name"], {})
    items = {i["key"]: i["path"] for i in rules_volume["configMap"].get("items", [])}
    want = {str(p.relative_to(REPO / "rules")) for p in (REPO / "rules").rglob("*.yaml")
            if not p.relative_to(REPO / "rules").parts[0] == "examples"}  # other businesses' rule dirs
    if set(items.values()) != want:
        problems.append(f"{who}: rule files not mounted: {sorted(want - set(items.values()))}, "
                        f"mounted but not in rules/: {sorted(set(items.values()) - want)}")
    for key, path in items.items():
        if cm.get("data", {}).get(key) != (REPO / "rules" / path).read_text():
            problems.append(f"{who}: ConfigMap key {key} does not hold rules/{path}")
    return problems


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

    # probes: grpc.health.v1 on the gRPC port (built-in grpc: probe, or the image's TLS health check);
    # liveness and startup ask the liveness service (a Redis outage must not restart pods), readiness ""
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    for kind, service in (("readinessProbe", ""), ("livenessProbe", LIVENESS), ("startupProbe", LIVENESS)):
        probe = container.get(kind)
        if probe is None:
            problems.append(f"no {kind}")
        elif "grpc" in probe:
            if probe["grpc"].get("port") != ports.get("grpc"):
                problems.append(f"{kind} is not on the grpc port")
            if probe["grpc"].get("service", "") != service:
                problems.append(f"{kind} asks service {probe['grpc'].get('service', '')!r}, not {service!r}")
            if args is not None and args.tls_cert:
                problems.append(f"{kind}: the built-in grpc probe speaks plaintext to a TLS-only port")
        elif "exec" in probe:
            cmd = probe["exec"]["command"]
            flags = dict(a.split("=", 1) for a in cmd[1:] if a.startswith("--") and "=" in a)
            if cmd[0] != "grpc-health-check" or flags.get("--address") != f"127.0.0.1:{ports.get('grpc')}":
                problems.append(f"{kind} does not run grpc-health-check on the grpc port: {cmd}")
            if flags.get("--service", "") != service:
                problems.append(f"{kind} asks service {flags.get('--service', '')!r}, not {service!r}")
            if any(a.startswith("--") and "=" not in a for a in cmd[1:]):
                problems.append(f"{kind}: write options as --flag=value: {cmd}")
            needed = (["--ca"] if args is not None and args.tls_cert else []) + \
                (["--cert", "--key"] if args is not None and args.tls_client_ca else [])
            for flag in needed:
                if flag not in flags:
                    problems.append(f"{kind}: the server requires it, but the probe has no {flag}")
                elif not _on_volume(flags[flag], mounts):
                    problems.append(f"{kind}: {flag} {flags[flag]} is not on a mounted volume")
        else:
            problems.append(f"{kind} is not a gRPC health probe")

    # securityContext: non-root, read-only root, and every path nba writes is a volume
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    if not (pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
        problems.append("not runAsNonRoot")
    if not sc.get("readOnlyRootFilesystem"):
        problems.append("no readOnlyRootFilesystem")
    if args is not None:
        for path in ("/tmp", str(args.models_dir)):
            if path not in mounts:
                problems.append(f"nba writes {path} but it is not a volume")
        for flag in ("rules_dir", "tls_cert", "tls_key", "tls_client_ca", "auth"):
            value = str(getattr(args, flag))
            if not _on_volume(value, mounts):
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
    problems += rules_mount_problems(volumes.get(mounts.get(str(args.rules_dir), "")) if args is not None else None,
                                     by_kind, "--rules-dir")

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

    problems += metrics_service_problems(by_kind.get("Service", {}), ports)
    problems += namespace_problems(docs, container)
    problems += redis_tls_problems(by_kind, container, volumes, mounts)
    problems += network_policy_problems(docs, pod, labels, ports)
    if args is not None:
        problems += model_registry_problems(docs, by_kind, volumes, container, str(args.models_dir), labels)
    return problems


def metrics_service_problems(services: dict[str, dict], ports: dict[str, int]) -> list[str]:
    """/metrics is in no Service that carries the gRPC port (the callers' Services)."""
    problems = []
    for name, svc in services.items():
        targets = {p.get("targetPort") for p in svc["spec"]["ports"]}
        carries = {n for n, number in ports.items() if n in targets or number in targets}
        if "grpc" in carries and "metrics" in carries:
            problems.append(f"Service {name} exposes the metrics port to the gRPC callers")
    if not any({p.get("targetPort") for p in s["spec"]["ports"]} & {"metrics", ports.get("metrics")}
               for s in services.values()):
        problems.append("no Service for the scrapers carries the metrics port")
    return problems


def namespace_problems(docs: list[dict], container: dict) -> list[str]:
    """No object names a namespace (kustomize or kubectl -n places the set); the certificate name the probe
    checks comes from the pod's own namespace (downward API)."""
    problems = [f"{d['kind']}/{d['metadata']['name']} sets namespace {d['metadata']['namespace']}"
                for d in docs if "namespace" in d["metadata"]]
    for path in sorted(K8S.glob("*.yaml")):
        if re.search(r"namespace:\s*default\b|\.default\.svc\b", path.read_text()):
            problems.append(f"{path.name} names the default namespace")
    env = container.get("env", [])
    names = [e["name"] for e in env]
    server_name = next((e for e in env if e["name"] == "NBA_TLS_SERVER_NAME"), None)
    ns = next((e for e in env if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace"),
              None)
    if server_name is None:
        problems.append("no NBA_TLS_SERVER_NAME for the probes")
    elif ns is None or f"$({ns['name']})" not in server_name.get("value", "") \
            or names.index(ns["name"]) > names.index("NBA_TLS_SERVER_NAME"):
        problems.append("NBA_TLS_SERVER_NAME is not derived from the pod's namespace (downward API, defined before it)")
    return problems


def redis_tls_problems(by_kind: dict[str, dict[str, dict]], container: dict, volumes: dict[str, dict],
                       mounts: dict[str, str]) -> list[str]:
    """REDIS_URL is rediss:// (or rediss+cluster://), REDIS_CA names a file of a mounted Secret key."""
    problems = []
    env = {e["name"]: e for e in container.get("env", [])}
    ref = env.get("REDIS_URL", {}).get("valueFrom", {}).get("secretKeyRef")
    secret = by_kind.get("Secret", {}).get(ref["name"], {}) if ref else {}
    url = {**secret.get("data", {}), **secret.get("stringData", {})}.get(ref["key"], "") if ref else \
        env.get("REDIS_URL", {}).get("value", "")
    if not url.startswith(("rediss://", "rediss+cluster://")):
        problems.append(f"REDIS_URL is not TLS (rediss:// or rediss+cluster://): {url.split(':', 1)[0]}://...")
    ca = env.get("REDIS_CA", {}).get("value", "")
    volume = volumes.get(_mount_of(ca, mounts) or "", {}) if ca else {}
    if not ca:
        problems.append("no REDIS_CA: the Redis servers' certificates are checked against the system CAs")
    elif "secret" not in volume:
        problems.append(f"REDIS_CA {ca} is not on a mounted Secret")
    else:
        source = by_kind.get("Secret", {}).get(volume["secret"]["secretName"], {})
        keys = {**source.get("data", {}), **source.get("stringData", {})}
        items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])} or {k: k for k in keys}
        mount = next(m for m, n in mounts.items() if n == _mount_of(ca, mounts))
        key = items.get(ca[len(mount.rstrip("/")) + 1:])
        if key not in keys:
            problems.append(f"REDIS_CA {ca}: no such key in Secret {volume['secret']['secretName']}")
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    """A NetworkPolicy podSelector (matchLabels only here) selects pods with ``labels``."""
    return not selector.get("matchExpressions") and all(labels.get(k) == v
                                                         for k, v in selector.get("matchLabels", {}).items())


def _rule_ports(rule: dict, ports: dict[str, int]) -> set[int] | None:
    """The container ports a rule's ``ports`` name (None: every port)."""
    if not rule.get("ports"):
        return None
    return {ports.get(p["port"], p["port"]) if isinstance(p.get("port"), str) else p.get("port")
            for p in rule["ports"]}


def network_policy_problems(docs: list[dict], pod: dict, labels: dict, ports: dict[str, int]) -> list[str]:
    """A NetworkPolicy of both types selects the pods: gRPC from chosen callers, metrics only from the
    monitoring namespace, egress only to Redis and DNS, each on its port. Every other pod of the set (the
    model trainer) is selected by one too."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    mine = [p for p in policies if _selects(p["spec"].get("podSelector", {}), labels)]
    if not mine:
        return ["no NetworkPolicy selects the pods"]
    problems = []
    for policy in mine:
        name, spec = policy["metadata"]["name"], policy["spec"]
        if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
            problems.append(f"NetworkPolicy {name}: policyTypes must be Ingress and Egress (default deny)")
        for rule in spec.get("ingress", []):
            reached = _rule_ports(rule, ports)
            peers = rule.get("from")
            if reached is None or not peers:
                problems.append(f"NetworkPolicy {name}: an ingress rule admits {'every port' if reached is None else 'anyone'}")
                continue
            for peer in peers:
                if "ipBlock" in peer or not any(peer.get(k, {}).get("matchLabels") for k in ("podSelector", "namespaceSelector")):
                    problems.append(f"NetworkPolicy {name}: an ingress peer is not a labelled pod or namespace: {peer}")
            if ports.get("metrics") in reached and any(peer.get("namespaceSelector", {}).get("matchLabels") != MONITORING
                                                       or "podSelector" in peer for peer in peers):
                problems.append(f"NetworkPolicy {name}: the metrics port is open beyond the monitoring namespace")
            if reached - {ports.get("grpc"), ports.get("metrics")}:
                problems.append(f"NetworkPolicy {name}: ingress to ports the pods do not serve: {sorted(reached)}")
        for rule in spec.get("egress", []):
            reached = _rule_ports(rule, ports)
            if reached is None or not rule.get("to"):
                problems.append(f"NetworkPolicy {name}: an egress rule allows {'every port' if reached is None else 'any destination'}")
            elif reached - {REDIS_PORT, DNS_PORT}:
                problems.append(f"NetworkPolicy {name}: egress beyond Redis and DNS: ports {sorted(reached)}")
    ingress = [r for p in mine for r in p["spec"].get("ingress", [])]
    egress = [r for p in mine for r in p["spec"].get("egress", [])]
    if not any(ports.get("grpc") in (_rule_ports(r, ports) or set()) for r in ingress):
        problems.append("no NetworkPolicy admits the callers to the gRPC port")
    if not any(ports.get("metrics") in (_rule_ports(r, ports) or set()) for r in ingress):
        problems.append("no NetworkPolicy admits the scraper to the metrics port")
    for port, what in ((REDIS_PORT, "Redis"), (DNS_PORT, "DNS")):
        if not any(port in (_rule_ports(r, ports) or set()) for r in egress):
            problems.append(f"no NetworkPolicy lets the pods reach {what} (port {port})")
    for d in docs:
        template = d.get("spec", {}).get("template", {}) if d["kind"] in ("Job", "Deployment") else {}
        other = template.get("metadata", {}).get("labels", {})
        if template and other != labels and not any(_selects(p["spec"].get("podSelector", {}), other) for p in policies):
            problems.append(f"no NetworkPolicy selects the pods of {d['kind']} {d['metadata']['name']}")
    return problems


def model_registry_problems(docs: list[dict], by_kind: dict[str, dict[str, dict]], volumes: dict[str, dict],
                            container: dict, models_dir: str, labels: dict) -> list[str]:
    """--models-dir is one ReadWriteMany claim, read-only for the servers; a Job mounts the same claim
    writable where its nba command writes models, with the same rule files, and no Service sends it calls."""
    mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == models_dir), None)
    claim = volumes.get(mount["name"] if mount else "", {}).get("persistentVolumeClaim")
    if claim is None:
        return [f"--models-dir {models_dir} is not a PersistentVolumeClaim: replicas would serve different models"]
    problems = []
    if not (mount.get("readOnly") or claim.get("readOnly")):
        problems.append("the serving pods may write the model registry (mount it readOnly)")
    pvc = by_kind.get("PersistentVolumeClaim", {}).get(claim["claimName"])
    if pvc is None:
        problems.append(f"PersistentVolumeClaim {claim['claimName']} is not in the set")
    elif "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
        problems.append(f"PersistentVolumeClaim {claim['claimName']} is not ReadWriteMany: pods on other nodes cannot mount it")
    writers = []
    for job in by_kind.get("Job", {}).values():
        jpod = job["spec"]["template"]["spec"]
        jvolumes = {v["name"]: v for v in jpod.get("volumes", [])}
        for c in jpod["containers"]:
            text = " ".join(c.get("command", []) + c.get("args", []))
            jmounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for m in c.get("volumeMounts", []):
                if jvolumes.get(m["name"], {}).get("persistentVolumeClaim", {}).get("claimName") == claim["claimName"] \
                        and not m.get("readOnly") and f"--models-dir={m['mountPath']}" in text:
                    writers.append(job["metadata"]["name"])
                    rules = re.search(r"--rules-dir=(\S+)", text)
                    if rules is None:
                        problems.append(f"Job {job['metadata']['name']} trains without --rules-dir")
                    else:
                        problems += rules_mount_problems(jvolumes.get(jmounts.get(rules.group(1), "")), by_kind,
                                                         f"Job {job['metadata']['name']} --rules-dir")
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or not (jpod.get("securityContext", {}).get("runAsNonRoot")
                                                            or sc.get("runAsNonRoot")):
                problems.append(f"Job {job['metadata']['name']}: not non-root with a read-only root filesystem")
        jlabels = job["spec"]["template"]["metadata"].get("labels", {})
        for name, svc in by_kind.get("Service", {}).items():
            if _matches(svc["spec"].get("selector", {}), jlabels):
                problems.append(f"Service {name} would send calls to Job {job['metadata']['name']}")
    if not writers:
        problems.append(f"no Job writes models into the claim {claim['claimName']} (--models-dir on its writable mount)")
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
    image = {name: s for name, s in services.items() if s.get("build", {}).get("dockerfile") == "engine/deploy/Dockerfile"}
    nba = {name: s for name, s in image.items() if "entrypoint" not in s}  # the image's nba serve
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
        # the healthcheck asks liveness: readiness is NOT_SERVING through a Redis outage
        test = s.get("healthcheck", {}).get("test", [])
        if test[:2] != ["CMD", "grpc-health-check"] or f"--service={LIVENESS}" not in test:
            problems.append(f"{name}: the healthcheck does not ask grpc-health-check --service={LIVENESS}: {test}")
        for published in s.get("ports", []):
            if not str(published).startswith("127.0.0.1:"):
                problems.append(f"{name}: port {published} is published beyond loopback")
    # one model registry: a named volume every replica mounts read-only where --models-dir points, which a
    # one-shot service fills before they start
    registries = set()
    for name, s in nba.items():
        args = _serve_args(dockerfile_entrypoint()[0][2:] + s.get("command", []))
        mount = next((v for v in s.get("volumes", []) if str(v).split(":")[1:2] == [str(args.models_dir)]), None)
        if mount is None or str(mount).split(":")[0] not in doc.get("volumes", {}) or not str(mount).endswith(":ro"):
            problems.append(f"{name}: --models-dir {args.models_dir} is not a shared named volume mounted read-only")
        else:
            registries.add(str(mount).split(":")[0])
    if len(registries) != 1:
        problems.append(f"the replicas read {len(registries)} model registries, not one")
    else:
        volume = registries.pop()
        writers = [n for n, s in image.items() if n not in nba and any(
            str(v).split(":")[0] == volume and not str(v).endswith(":ro") for v in s.get("volumes", []))
            and "nba train" in " ".join(s.get("command", []))]
        if len(writers) != 1:
            problems.append(f"{len(writers)} services train into {volume}, not one")
        for name, s in nba.items():
            if writers and (s.get("depends_on", {}).get(writers[0]) or {}).get("condition") != "service_completed_successfully":
                problems.append(f"{name} does not wait for {writers[0]}")
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
    # issue 27
    "liveness asks readiness": lambda d: _probe_command(d, "livenessProbe").remove(f"--service={LIVENESS}"),
    "startup waits for readiness": lambda d: _probe_command(d, "startupProbe").remove(f"--service={LIVENESS}"),
    "readiness asks liveness": lambda d: _probe_command(d, "readinessProbe").append(f"--service={LIVENESS}"),
    "probe without a client certificate under mTLS": lambda d: [
        c.remove(a) for c in [_probe_command(d, "livenessProbe")] for a in list(c) if a.startswith("--cert=")],
    "metrics in the callers' Service": lambda d: one(d, "Service", "nba")["spec"]["ports"].append(
        {"name": "metrics", "port": 9464, "targetPort": "metrics"}),
    "a namespace written in": lambda d: one(d, "Service", "nba")["metadata"].__setitem__("namespace", "default"),
    "server name of a fixed namespace": lambda d: next(
        e for e in _container(d)["env"] if e["name"] == "NBA_TLS_SERVER_NAME").__setitem__("value", "nba.prod.svc"),
    "no NetworkPolicy": lambda d: d.remove(one(d, "NetworkPolicy", "nba")),
    "NetworkPolicy selects other pods": lambda d: one(d, "NetworkPolicy", "nba")["spec"]["podSelector"][
        "matchLabels"].__setitem__("app.kubernetes.io/component", "other"),
    "NetworkPolicy without egress": lambda d: one(d, "NetworkPolicy", "nba")["spec"].__setitem__(
        "policyTypes", ["Ingress"]),
    "metrics open to every namespace": lambda d: one(d, "NetworkPolicy", "nba")["spec"]["ingress"][1]["from"][0].__setitem__(
        "namespaceSelector", {}),
    "gRPC open to anyone": lambda d: one(d, "NetworkPolicy", "nba")["spec"]["ingress"][0].pop("from"),
    "egress anywhere": lambda d: one(d, "NetworkPolicy", "nba")["spec"]["egress"].append({}),
    "egress to the web": lambda d: one(d, "NetworkPolicy", "nba")["spec"]["egress"].append(
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}),
    "trainer not in a NetworkPolicy": lambda d: d.remove(one(d, "NetworkPolicy", "nba-model-trainer")),
    "plaintext Redis": lambda d: one(d, "Secret", "nba-redis")["stringData"].__setitem__(
        "REDIS_URL", "redis+cluster://nba:pw@redis-cluster-0.redis-cluster:6379"),
    "no Redis CA": lambda d: _container(d)["env"].remove(next(e for e in _container(d)["env"] if e["name"] == "REDIS_CA")),
    "models on an emptyDir": lambda d: _pod(d)["volumes"].__setitem__(
        [v["name"] for v in _pod(d)["volumes"]].index("models"), {"name": "models", "emptyDir": {}}),
    "serving pods may write models": lambda d: [
        (m.pop("readOnly", None), v["persistentVolumeClaim"].pop("readOnly", None))
        for m in _container(d)["volumeMounts"] if m["name"] == "models"
        for v in _pod(d)["volumes"] if v["name"] == "models"],
    "registry on one node only": lambda d: one(d, "PersistentVolumeClaim")["spec"].__setitem__(
        "accessModes", ["ReadWriteOnce"]),
    "no Job trains the first model": lambda d: d.remove(one(d, "Job")),
}


def _pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def _container(docs: list[dict]) -> dict:
    return _pod(docs)["containers"][0]


def _probe_command(docs: list[dict], kind: str) -> list[str]:
    return _container(docs)[kind]["exec"]["command"]


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
    # issue 27: a healthcheck on readiness, a writable or private model registry, metrics published widely
    doc = compose_doc()
    doc["services"]["nba-1"]["healthcheck"]["test"] = ["CMD", "grpc-health-check", "--address=127.0.0.1:50051"]
    doc["services"]["nba-2"]["volumes"] = ["nba-models:/var/lib/nba/models"]
    doc["services"]["nba-2"]["ports"] = ["127.0.0.1:50052:50051", "9465:9464"]
    problems = compose_problems(doc)
    assert any("nba-1: the healthcheck" in p for p in problems) and any("nba-2: --models-dir" in p for p in problems) \
        and any("9465:9464" in p for p in problems), problems
    doc = compose_doc()
    del doc["services"]["nba-models-init"]
    doc["services"]["nba-1"]["depends_on"].pop("nba-models-init")
    assert any("0 services train" in p for p in compose_problems(doc))


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


def test_the_probe_script_asks_a_named_service_and_shows_a_client_certificate(tmp_path: Path) -> None:
    """--service asks liveness or readiness (they differ while Redis is down); --cert/--key present the
    probe's client certificate to a server that requires one (mTLS), without which the probe fails."""
    ca = CA(tmp_path)
    pair = ca.issue("server", "nba", server=True)
    probe = ca.issue("probe", "nba-probe")
    stranger = CA(tmp_path / "other", name="someone else").issue("probe", "nba-probe")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(pair.key.read_bytes(), pair.cert.read_bytes())],
                                        root_certificates=ca.pem.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # as while Redis is unreachable
    tls = [f"--address=127.0.0.1:{port}", f"--ca={ca.pem}", "--server-name=localhost", "--timeout=5"]
    try:
        live = _probe(*tls, f"--cert={probe.cert}", f"--key={probe.key}", f"--service={LIVENESS}")
        assert live.returncode == 0 and "SERVING" in live.stdout, live.stderr
        ready = _probe(*tls, f"--cert={probe.cert}", f"--key={probe.key}", "--service=")
        assert ready.returncode == 1 and "NOT_SERVING" in ready.stdout, ready.stderr
        unknown = _probe(*tls, f"--cert={probe.cert}", f"--key={probe.key}", "--service=nba.nothing")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr, unknown.stderr
        assert _probe(*tls, f"--service={LIVENESS}").returncode == 1  # no client certificate: refused
        assert _probe(*tls, f"--cert={stranger.cert}", f"--key={stranger.key}", f"--service={LIVENESS}").returncode == 1
        # options that cannot work are refused up front (exit 2), naming the option
        half = _probe(*tls, f"--cert={probe.cert}")
        assert half.returncode == 2 and "--cert and --key" in half.stderr, half.stderr
        missing = _probe(*tls, f"--cert={tmp_path / 'nope.crt'}", f"--key={probe.key}")
        assert missing.returncode == 2 and "--cert" in missing.stderr and "nope.crt" in missing.stderr, missing.stderr
        plain = _probe(f"--address=127.0.0.1:{port}", f"--cert={probe.cert}", f"--key={probe.key}")
        assert plain.returncode == 2 and "--ca" in plain.stderr, plain.stderr
    finally:
        server.stop(None)


def test_the_template_auth_file_loads_and_opens_health_only(tmp_path: Path) -> None:
    """The auth file of secrets.yaml is one the service accepts: callers known by certificate (the template
    requires client certificates), health open for the probes, reflection closed."""
    from engine.serving.security import load_auth

    secret = one(manifests(), "Secret", "nba-auth")
    path = tmp_path / "auth.yaml"
    path.write_text(secret["stringData"]["auth.yaml"])
    policy = load_auth(path)
    assert policy.is_open("/grpc.health.v1.Health/Check")
    assert not policy.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not policy.is_open("/nba.v1.DecisionService/Decide")


def test_the_probes_of_the_deployment_pass_against_nba_under_mtls(tmp_path: Path, redis_url: str,
                                                                   models_dir: Path) -> None:
    """The Deployment's three probe commands, run against a real nba server with the template's settings:
    mTLS (--tls-client-ca) and the template's auth file. The probe's certificate (in no auth file entry)
    gets health and nothing else."""
    from engine.api.nba.v1 import nba_pb2 as pb
    from engine.api.nba.v1 import nba_pb2_grpc as pb_grpc
    from engine.config import Config
    from engine.serving.app import App
    from engine.serving.health import RedisHealth, live
    from engine.serving.security import ServerCertificates, load_auth
    from engine.serving.server import build_server

    from .conftest import RULES_DIR

    ca = CA(tmp_path)
    pair, probe = ca.issue("server", "nba", server=True), ca.issue("probe", "nba-probe")
    auth = tmp_path / "auth.yaml"
    auth.write_text(one(manifests(), "Secret", "nba-auth")["stringData"]["auth.yaml"])
    app = App(Config(redis_url=redis_url, rules_dir=RULES_DIR, models_dir=models_dir, demo=False, metrics_port=0,
                     rules_watch_seconds=0, events_poll_seconds=0)).start()
    server, port, servicer = build_server(app, "127.0.0.1:0", tls=ServerCertificates(pair.cert, pair.key, ca.pem),
                                          auth=load_auth(auth))
    server.start()
    live(servicer)
    RedisHealth(app.store.client, servicer).poll_once()
    files = {"/etc/nba/tls/ca.crt": ca.pem, "/etc/nba/probe/tls.crt": probe.cert, "/etc/nba/probe/tls.key": probe.key}
    container = one(manifests(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    try:
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            cmd = [a.replace("127.0.0.1:50051", f"127.0.0.1:{port}") for a in container[kind]["exec"]["command"][1:]]
            for path, here in files.items():
                cmd = [a.replace(path, str(here)) for a in cmd]
            done = _probe(*cmd, "--server-name=localhost")
            assert done.returncode == 0 and "SERVING" in done.stdout, (kind, done.stdout, done.stderr)
        without = [a for a in cmd if not a.startswith(("--cert=", "--key="))]
        assert _probe(*without, "--server-name=localhost", "--timeout=5").returncode == 1  # mTLS: refused
        creds = grpc.ssl_channel_credentials(ca.pem.read_bytes(), probe.key.read_bytes(), probe.cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.DecisionServiceStub(channel).Decide(
                    pb.DecideRequest(customer_id="C0000010", channel=pb.CHANNEL_WEB), timeout=5)
        assert refused.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    finally:
        server.stop(None)
        app.close()


def _named_server(name: bytes) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name)  # bytes in, bytes out
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Who", {"Name": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_round_robin_over_ipv4_addresses_reaches_every_replica() -> None:
    """The operator guide's client-side load balancing: ``ipv4:HOST:PORT,HOST:PORT`` with round_robin spreads the
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


# --- the Prometheus Operator component (issue 28) ---------------------------------------------------------

MONITORING_COMPONENT = K8S / "monitoring"
ALERTS = REPO / "loadtest" / "monitoring" / "nba-alerts.yml"


def monitoring_manifests() -> list[dict]:
    """The objects of the optional ``monitoring`` component (ServiceMonitor, PrometheusRule)."""
    component = yaml.safe_load((MONITORING_COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    return [d for name in component["resources"] for d in yaml.safe_load_all((MONITORING_COMPONENT / name).read_text()) if d]


def monitoring_problems(objects: list[dict], docs: list[dict]) -> list[str]:
    """The ServiceMonitor scrapes /metrics through the metrics Service of ``docs`` (its selector finds that
    Service alone, its port is the Service's metrics port); the PrometheusRule holds nba-alerts.yml's groups.
    Neither names a namespace (kustomize places them with the rest)."""
    problems = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    monitors = [d for d in objects if d["kind"] == "ServiceMonitor"]
    rules = [d for d in objects if d["kind"] == "PrometheusRule"]
    if len(monitors) != 1 or len(rules) != 1:
        return [f"expected one ServiceMonitor and one PrometheusRule, found {len(monitors)} and {len(rules)}"]
    for d in objects:
        if d.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"{d['kind']}/{d['metadata']['name']}: apiVersion {d.get('apiVersion')}")
        if "namespace" in d["metadata"]:
            problems.append(f"{d['kind']}/{d['metadata']['name']} names a namespace")
    spec = monitors[0]["spec"]
    if "namespaceSelector" in spec:
        problems.append("the ServiceMonitor looks for Services outside its own namespace")
    selected = [n for n, s in services.items() if _matches(spec["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))]
    if len(selected) != 1:
        problems.append(f"the ServiceMonitor selects the Services {selected}, not the metrics Service alone")
    else:
        port_names = {p["name"] for p in services[selected[0]]["spec"]["ports"]}
        targets = {p.get("targetPort") for p in services[selected[0]]["spec"]["ports"]}
        if "metrics" not in targets or "grpc" in targets:
            problems.append(f"the ServiceMonitor scrapes Service {selected[0]}, which is not the metrics Service")
        for endpoint in spec.get("endpoints", []):
            if endpoint.get("port") not in port_names:
                problems.append(f"ServiceMonitor endpoint port {endpoint.get('port')!r} is no port of {selected[0]}")
            if endpoint.get("path", "/metrics") != "/metrics" or endpoint.get("scheme", "http") != "http":
                problems.append("the ServiceMonitor scrapes something other than http /metrics")
    if not spec.get("endpoints"):
        problems.append("the ServiceMonitor has no endpoints")
    if rules[0]["spec"].get("groups") != yaml.safe_load(ALERTS.read_text())["groups"]:
        problems.append("the PrometheusRule's groups differ from loadtest/monitoring/nba-alerts.yml")
    return problems


def test_the_monitoring_component_scrapes_the_metrics_service_and_alerts_as_nba_alerts_yml() -> None:
    assert monitoring_problems(monitoring_manifests(), manifests()) == []
    assert "monitoring" not in kustomization().get("resources", []) + kustomization().get("components", [])  # optional


BROKEN_MONITORING = {
    "scrapes the callers' Service": lambda o, d: next(x for x in o if x["kind"] == "ServiceMonitor")["spec"]["selector"][
        "matchLabels"].__setitem__("app.kubernetes.io/component", "decision-service"),
    "a port the Service lacks": lambda o, d: next(x for x in o if x["kind"] == "ServiceMonitor")["spec"]["endpoints"][0]
    .__setitem__("port", "http"),
    "the metrics Service renamed its port": lambda o, d: one(d, "Service", "nba-metrics")["spec"]["ports"][0].__setitem__(
        "name", "prometheus"),
    "an alert drifted": lambda o, d: next(x for x in o if x["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"][0]
    .__setitem__("for", "1m"),
    "an alert missing": lambda o, d: next(x for x in o if x["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"].pop(),
}


@pytest.mark.parametrize("what", sorted(BROKEN_MONITORING))
def test_a_broken_monitoring_component_is_caught(what: str) -> None:
    objects, docs = copy.deepcopy(monitoring_manifests()), copy.deepcopy(manifests())
    BROKEN_MONITORING[what](objects, docs)
    assert monitoring_problems(objects, docs), f"{what}: not caught"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (.ci/run installs it where it can)")
def test_promtool_accepts_the_alert_rules_of_both_files(tmp_path: Path) -> None:
    rule = next(d for d in monitoring_manifests() if d["kind"] == "PrometheusRule")
    (tmp_path / "operator.yml").write_text(yaml.safe_dump(rule["spec"]))
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS), str(tmp_path / "operator.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to run kustomize")
def test_kustomize_adds_the_monitoring_component(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "nba",
        "resources": [os.path.relpath(K8S, tmp_path)], "components": [os.path.relpath(MONITORING_COMPONENT, tmp_path)]}))
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    added = [d for d in built if d["apiVersion"] == "monitoring.coreos.com/v1"]
    assert sorted(d["kind"] for d in added) == ["PrometheusRule", "ServiceMonitor"]
    assert all(d["metadata"]["namespace"] == "nba" for d in added)
    assert monitoring_problems([{**d, "metadata": {k: v for k, v in d["metadata"].items() if k != "namespace"}}
                                for d in added],
                               [{**d, "metadata": {k: v for k, v in d["metadata"].items() if k != "namespace"}}
                                for d in built if d["kind"] == "Service"]) == []
