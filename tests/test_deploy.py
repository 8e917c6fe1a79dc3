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
replica reads one model registry (a ReadWriteMany claim, read-only for the servers) that a Job fills; every
workload (Deployments, Jobs, CronJobs) is non-root with a read-only root filesystem, a seccomp profile,
resources and no service account token. The archive: one ``nba archive run`` (its arguments parsed by the
real parser), a Deployment of one replica with ``Recreate``, live on its metrics port, covered by a
NetworkPolicy (metrics from the monitoring namespace, egress to Redis and DNS) and scraped by the monitoring
component; every pod that serves, writes, compacts or trains from the archive names the same one
(``NBA_ARCHIVE``) and mounts one ReadWriteMany claim at that path, writable where erasure or the writer
change files; a CronJob compacts it, never twice at once; in compose, one ``archive`` service and one named
volume that the image makes for its user. Each check returns the problems it finds, so the tests also show
that a broken manifest is caught. Last,
the probe script (TLS, mTLS, ``--service``) and gRPC client-side round_robin over ``ipv4:`` addresses run
against real servers on 127.0.0.1. Not covered: applying the manifests to a live cluster (so neither
whether the network plugin enforces the NetworkPolicy nor whether the storage class offers ReadWriteMany),
building the image, starting compose, whether the storage's locks (flock over NFS) work across nodes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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
SERVING = "nba"  # the serving Deployment (nba serve)
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


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


def pod_template(doc: dict) -> dict | None:
    """A workload's pod template (a CronJob's through its jobTemplate); None for other kinds."""
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"] if doc["kind"] in WORKLOADS else None


def workloads(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """``(Kind/name, the workload, its pod template)`` for every workload of the set."""
    return [(f"{d['kind']}/{d['metadata']['name']}", d, t) for d in docs if (t := pod_template(d)) is not None]


def argv(container: dict) -> list[str]:
    return container.get("command", []) + container.get("args", [])


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


def _parsed(command: list[str], group: str, handler: str):
    """``nba COMMAND`` parsed by the real parser of engine/cli.py, its handler (the function ``handler``
    of the command group engine/commands/``group``.py) not run (SystemExit for an unknown flag)."""
    import importlib

    import engine.cli as cli

    home = importlib.import_module(f"engine.commands.{group}")
    seen = []
    original = getattr(home, handler)
    setattr(home, handler, lambda args: seen.append(args) or 0)
    try:
        cli.main(command)
    finally:
        setattr(home, handler, original)
    return seen[0]


def _serve_args(argv: list[str]):
    """``nba serve`` parsed by the real parser of engine/cli.py (SystemExit for an unknown flag)."""
    return _parsed(["serve", *argv], "serve", "cmd_serve")


def _archive_args(sub: str, argv: list[str]):
    """``nba archive SUB`` (run, compact) parsed by the real parser (SystemExit for an unknown flag)."""
    return _parsed(["archive", sub, *argv], "report", "cmd_archive")


def archive_command_problems(command: list[str], sub: str) -> list[str]:
    if command[:3] != ["nba", "archive", sub]:
        return [f"the command is {command[:3]}, not nba archive {sub}"]
    try:
        _archive_args(sub, command[3:])
    except SystemExit as e:
        return [f"nba archive {sub} rejects {command[3:]} (exit {e.code})"]
    return []


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
    deploy = one(docs, "Deployment", SERVING)
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

    # Services find one workload's pods (the callers' ones the serving pods), on ports they have; PDB and
    # HPA find the serving pods
    for name, svc in by_kind.get("Service", {}).items():
        selected = [(who, t) for who, _, t in workloads(docs)
                    if _matches(svc["spec"].get("selector", {}), t["metadata"].get("labels", {}))]
        carries_grpc = any(p.get("targetPort") in ("grpc", ports.get("grpc")) for p in svc["spec"]["ports"])
        if len(selected) != 1 or (carries_grpc and not _matches(svc["spec"].get("selector", {}), labels)):
            problems.append(f"Service {name} does not select the pods (it selects {[w for w, _ in selected]})")
            continue
        theirs = {p["name"]: p["containerPort"] for c in selected[0][1]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in theirs and p.get("targetPort") not in theirs.values():
                problems.append(f"Service {name} port {p['name']} targets no container port of {selected[0][0]}")
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
        if args.archive == "on":
            problems.append("the serving pods run an archive writer each (--archive=on): the archive has one writer")
    problems += hardening_problems(docs, by_kind)
    problems += archive_volume_problems(docs, by_kind)
    problems += archive_writer_problems(docs, by_kind)
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


def _rule_problems(mine: list[dict], ports: dict[str, int]) -> list[str]:
    """The rules of the NetworkPolicies ``mine`` (those that select one kind of pod, whose container ports
    are ``ports``): both policy types, ingress only to the pods' gRPC and metrics ports from labelled pods or
    namespaces (metrics from the monitoring namespace alone), egress only to Redis and DNS."""
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
            if reached - {ports.get("grpc"), ports.get("metrics")} - {None}:
                problems.append(f"NetworkPolicy {name}: ingress to ports the pods do not serve: {sorted(map(str, reached))}")
        for rule in spec.get("egress", []):
            reached = _rule_ports(rule, ports)
            if reached is None or not rule.get("to"):
                problems.append(f"NetworkPolicy {name}: an egress rule allows {'every port' if reached is None else 'any destination'}")
            elif reached - {REDIS_PORT, DNS_PORT}:
                problems.append(f"NetworkPolicy {name}: egress beyond Redis and DNS: ports {sorted(map(str, reached))}")
    return problems


def _reaches(rules: list[dict], port: int | None, ports: dict[str, int]) -> bool:
    return port is not None and any(port in (_rule_ports(r, ports) or set()) for r in rules)


def network_policy_problems(docs: list[dict], pod: dict, labels: dict, ports: dict[str, int]) -> list[str]:
    """A NetworkPolicy of both types selects the pods: gRPC from chosen callers, metrics only from the
    monitoring namespace, egress only to Redis and DNS, each on its port. Every other pod of the set (the
    model trainer, the archive's writer and compaction) is selected by one too."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    mine = [p for p in policies if _selects(p["spec"].get("podSelector", {}), labels)]
    if not mine:
        return ["no NetworkPolicy selects the pods"]
    problems = _rule_problems(mine, ports)
    ingress = [r for p in mine for r in p["spec"].get("ingress", [])]
    egress = [r for p in mine for r in p["spec"].get("egress", [])]
    if not _reaches(ingress, ports.get("grpc"), ports):
        problems.append("no NetworkPolicy admits the callers to the gRPC port")
    if not _reaches(ingress, ports.get("metrics"), ports):
        problems.append("no NetworkPolicy admits the scraper to the metrics port")
    for port, what in ((REDIS_PORT, "Redis"), (DNS_PORT, "DNS")):
        if not _reaches(egress, port, ports):
            problems.append(f"no NetworkPolicy lets the pods reach {what} (port {port})")
    for who, _, template in workloads(docs):
        other = template.get("metadata", {}).get("labels", {})
        if other != labels and not any(_selects(p["spec"].get("podSelector", {}), other) for p in policies):
            problems.append(f"no NetworkPolicy selects the pods of {who}")
    return problems


def writer_network_problems(docs: list[dict], who: str, labels: dict, ports: dict[str, int]) -> list[str]:
    """The archive writer's pods: a NetworkPolicy of both types admits only the scraper (monitoring
    namespace) to their metrics port and lets them reach Redis and DNS only; nothing else."""
    mine = [p for p in docs if p["kind"] == "NetworkPolicy" and _selects(p["spec"].get("podSelector", {}), labels)]
    if not mine:
        return [f"no NetworkPolicy selects the archive writer ({who})"]
    problems = _rule_problems(mine, {"metrics": ports["metrics"]} if "metrics" in ports else {})
    if not _reaches([r for p in mine for r in p["spec"].get("ingress", [])], ports.get("metrics"), ports):
        problems.append(f"no NetworkPolicy admits the scraper to the archive writer's metrics port ({who})")
    egress = [r for p in mine for r in p["spec"].get("egress", [])]
    for port, what in ((REDIS_PORT, "Redis"), (DNS_PORT, "DNS")):
        if not _reaches(egress, port, ports):
            problems.append(f"no NetworkPolicy lets the archive writer reach {what} (port {port})")
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


def hardening_problems(docs: list[dict], by_kind: dict[str, dict[str, dict]]) -> list[str]:
    """Every workload of the set (Deployments, Jobs, CronJobs): no service account token, every container
    non-root, read-only root filesystem, no privilege escalation, no capabilities, a seccomp profile,
    resource requests and limits; every volume it mounts is declared and every ConfigMap, Secret and claim
    it names is in the set."""
    problems = []
    for who, _, template in workloads(docs):
        pod = template["spec"]
        pod_sc = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{who}: the pods get a service account token (automountServiceAccountToken: false)")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            if not (pod_sc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
                problems.append(f"{who}: container {c['name']} is not runAsNonRoot")
            if not sc.get("readOnlyRootFilesystem"):
                problems.append(f"{who}: container {c['name']} has no readOnlyRootFilesystem")
            if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{who}: container {c['name']} may escalate privileges or keeps capabilities")
            if (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{who}: container {c['name']} has no seccomp profile")
            if not (c.get("resources", {}).get("requests") and c.get("resources", {}).get("limits")):
                problems.append(f"{who}: container {c['name']} has no resource requests and limits")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{who}: volumeMount {m['name']} has no volume")
        for v in volumes.values():
            for key, kind, name_key in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "secretName"),
                                        ("persistentVolumeClaim", "PersistentVolumeClaim", "claimName")):
                if key in v and v[key][name_key] not in by_kind.get(kind, {}):
                    problems.append(f"{who}: {kind} {v[key][name_key]} is not in the set")
    return problems


# --- the archive (engine/store/archive.py; engine/deploy/README.md, "The archive") -----------------------

ARCHIVE_WRITES = {"serve": "erases customers from it", "writer": "writes it", "compact": "merges its files"}
ARCHIVE_COMMANDS = {"serve": "nba serve", "writer": "nba archive run", "compact": "nba archive compact",
                    "train": "nba train --from-stream", "reader": "nba"}


def _env(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def archive_role(container: dict) -> str | None:
    """What a container does with the archive: serve (erasure and export rewrite and read it), writer,
    compact, train (``nba train --from-stream`` reads it), reader (names it with NBA_ARCHIVE); None: nothing."""
    command = argv(container)
    text = " ".join(command)
    if command[:2] == ["nba", "serve"]:
        return "serve"
    if command[:3] == ["nba", "archive", "run"]:
        return "writer"
    if command[:3] == ["nba", "archive", "compact"]:
        return "compact"
    if re.search(r"\bnba train\b", text) and "--from-stream" in text:
        return "train"
    return "reader" if _env(container, "NBA_ARCHIVE") else None


def archive_root(container: dict, role: str) -> str | None:
    """The archive a container uses: its command's flag (serve --archive-dir, archive --dir, train
    --archive), else NBA_ARCHIVE's literal value; None when it names none (then nba uses its own data
    directory's archive). A command line the parser refuses is reported elsewhere; then NBA_ARCHIVE alone."""
    command = argv(container)
    flag = None
    try:
        if role == "serve":
            flag = _serve_args(command[2:]).archive_dir
        elif role in ("writer", "compact"):
            flag = _archive_args(command[2], command[3:]).dir
    except SystemExit:
        pass
    if role == "train":
        found = re.search(r"--archive[= ](\S+)", " ".join(command))
        flag = found.group(1) if found else None
    env = _env(container, "NBA_ARCHIVE") or {}
    return flag or env.get("value")


def archive_volume_problems(docs: list[dict], by_kind: dict[str, dict[str, dict]]) -> list[str]:
    """Every pod that serves, writes, compacts or trains from the archive names the same one (NBA_ARCHIVE
    or its flag); on a path (not an object-storage URL) that path is where one ReadWriteMany claim of the set
    is mounted, writable for those that write it (serving pods: erasure rewrites files)."""
    problems = []
    roots: dict[str, list[str]] = {}
    claims: dict[str, list[str]] = {}
    for who, _, template in workloads(docs):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for c in template["spec"]["containers"]:
            role = archive_role(c)
            if role is None:
                continue
            root = archive_root(c, role)
            if root is None:
                problems.append(f"{who}: no NBA_ARCHIVE (nor a flag naming the archive): {ARCHIVE_COMMANDS[role]} would "
                                "use its own data directory's archive, not the deployment's")
                continue
            roots.setdefault(root.rstrip("/"), []).append(who)
            if "://" in root:  # object storage (s3://...): no volume
                continue
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == root.rstrip("/")), None)
            claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim") if mount else None
            if mount is None or claim is None:
                problems.append(f"{who}: the archive {root} is not a PersistentVolumeClaim mounted at that path")
                continue
            claims.setdefault(claim["claimName"], []).append(who)
            if role in ARCHIVE_WRITES and (mount.get("readOnly") or claim.get("readOnly")):
                problems.append(f"{who}: the archive is mounted read-only, but {ARCHIVE_COMMANDS[role]} {ARCHIVE_WRITES[role]}")
    if not roots:
        problems.append("no pod names an archive")
    if len(roots) > 1:
        problems.append(f"the pods name different archives: {roots}")
    if len(claims) > 1:
        problems.append(f"the pods mount different archive claims: {claims}")
    for name in claims:
        pvc = by_kind.get("PersistentVolumeClaim", {}).get(name)
        if pvc is None:
            problems.append(f"PersistentVolumeClaim {name} is not in the set")
        elif "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
            problems.append(f"PersistentVolumeClaim {name} is not ReadWriteMany: serving pods on other nodes cannot "
                            "mount the archive")
    return problems


def _probe_port(probe: dict | None) -> object:
    return next((probe[k].get("port") for k in ("httpGet", "tcpSocket", "grpc") if probe and k in probe), None)


def archive_writer_problems(docs: list[dict], by_kind: dict[str, dict[str, dict]]) -> list[str]:
    """One ``nba archive run`` in the set: a Deployment of 1 replica that is recreated (never two writers at
    once), no autoscaler; its arguments parse and serve /metrics on its metrics port to the pod's address;
    liveness asks that port; it reaches Redis over TLS with the CA mounted; a NetworkPolicy covers it. A
    CronJob compacts the archive with ``nba archive compact``, never two at once."""
    problems = []
    writers = [(who, d, t, c) for who, d, t in workloads(docs) for c in t["spec"]["containers"]
               if argv(c)[:3] == ["nba", "archive", "run"]]
    if len(writers) != 1:
        return [f"{len(writers)} workloads run nba archive run ({[w[0] for w in writers]}), not one: one writer per archive"]
    who, doc, template, c = writers[0]
    if doc["kind"] != "Deployment":
        problems.append(f"{who}: the archive writer is not a Deployment")
    else:
        if doc["spec"].get("replicas", 1) != 1:
            problems.append(f"{who}: {doc['spec']['replicas']} replicas of the archive writer, not 1")
        if doc["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"{who}: not strategy Recreate: a rolling update starts a second writer beside the first")
        for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
            if hpa["spec"]["scaleTargetRef"]["name"] == doc["metadata"]["name"]:
                problems.append(f"HorizontalPodAutoscaler {name} scales the archive writer")
    pod = template["spec"]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    bad = archive_command_problems(argv(c), "run")
    problems += [f"{who}: {p}" for p in bad]
    if not bad:
        args = _archive_args("run", argv(c)[3:])
        if not args.metrics_port or args.metrics_port != ports.get("metrics") or args.metrics_host != "0.0.0.0":
            problems.append(f"{who}: --metrics-host/--metrics-port ({args.metrics_host}:{args.metrics_port}) do not "
                            f"expose the container port named metrics ({ports.get('metrics')})")
    for kind in ("livenessProbe", "startupProbe"):
        probe = c.get(kind)
        if probe is None and kind == "livenessProbe":
            problems.append(f"{who}: no livenessProbe")
        elif probe is not None and _probe_port(probe) not in ("metrics", ports.get("metrics")):
            problems.append(f"{who}: the {kind} does not ask the metrics port: {probe}")
    if pod.get("terminationGracePeriodSeconds", 30) < 15:
        problems.append(f"{who}: terminationGracePeriodSeconds under 15: the last flush (up to 10 s) is cut short")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if not _env(c, "REDIS_URL"):
        problems.append(f"{who}: no REDIS_URL")
    else:
        problems += [f"{who}: {p}" for p in redis_tls_problems(by_kind, c, volumes, mounts)]
    problems += writer_network_problems(docs, who, template["metadata"].get("labels", {}), ports)

    compactors = [(w, d, c) for w, d, t in workloads(docs) for c in t["spec"]["containers"]
                  if argv(c)[:3] == ["nba", "archive", "compact"]]
    if not compactors:
        problems.append("nothing runs nba archive compact: a day flushed every minute stays 1,440 files per shard")
    for w, d, c in compactors:
        if d["kind"] != "CronJob":
            problems.append(f"{w}: nba archive compact is not a CronJob")
        elif d["spec"].get("concurrencyPolicy") != "Forbid":
            problems.append(f"{w}: concurrencyPolicy is not Forbid: a slow night would start a second compaction")
        problems += [f"{w}: {p}" for p in archive_command_problems(argv(c), "compact")]
        if not _env(c, "REDIS_URL"):
            problems.append(f"{w}: no REDIS_URL (nba would start an embedded Redis of its own)")
        else:
            cpod = pod_template(d)["spec"]
            problems += [f"{w}: {p}" for p in redis_tls_problems(
                by_kind, c, {v["name"]: v for v in cpod.get("volumes", [])},
                {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])})]
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
    problems += compose_archive_problems(doc, image, nba)
    problems += compose_mount_point_problems(image)
    return problems


def _compose_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """A compose service's volume mounts (short syntax): container path -> (volume or host path, read-only)."""
    mounts = {}
    for v in service.get("volumes", []):
        parts = str(v).split(":")
        mounts[parts[1].rstrip("/")] = (parts[0], parts[2:3] == ["ro"])
    return mounts


def compose_archive_problems(doc: dict, image: dict[str, dict], nba: dict[str, dict]) -> list[str]:
    """One service runs ``nba archive run`` (arguments the parser takes, not scaled, on the cluster the
    replicas use); it, every replica and a compaction service name the same archive (NBA_ARCHIVE or the
    flag), which is one named volume mounted at that path, writable (the replicas' erasure rewrites files);
    the replicas run no writer of their own."""
    problems = []
    services = doc.get("services", {})
    writers = {n: s for n, s in image.items() if s.get("entrypoint", [])[:3] == ["nba", "archive", "run"]}
    compactors = {n: s for n, s in image.items() if s.get("entrypoint", [])[:3] == ["nba", "archive", "compact"]}
    if len(writers) != 1:
        problems.append(f"{len(writers)} services run nba archive run ({sorted(writers)}), not one")
    roots: dict[str, list[str]] = {}
    volumes: dict[str, list[str]] = {}
    users = [(n, s, "writer") for n, s in writers.items()] + [(n, s, "compact") for n, s in compactors.items()] + \
        [(n, s, "serve") for n, s in nba.items()]
    for name, s, role in users:
        command = s.get("entrypoint", dockerfile_entrypoint()[0]) + s.get("command", [])
        try:
            args = _serve_args(command[2:]) if role == "serve" else _archive_args(command[2], command[3:])
        except SystemExit as e:
            problems.append(f"{name}: {' '.join(command[:3])} rejects {command[3:]} (exit {e.code})")
            continue
        if role == "serve" and args.archive == "on":
            problems.append(f"{name}: runs an archive writer of its own (--archive=on): the archive has one writer")
        if role == "writer":
            if s.get("scale", 1) != 1 or s.get("deploy", {}).get("replicas", 1) != 1:
                problems.append(f"{name}: the archive writer is scaled beyond one")
            url = s.get("environment", {}).get("REDIS_URL", "")
            if set(re.findall(r"(\d+\.\d+\.\d+\.\d+):6379", url)) != set(re.findall(
                    r"(\d+\.\d+\.\d+\.\d+):6379", next(iter(nba.values()), {}).get("environment", {}).get("REDIS_URL", ""))):
                problems.append(f"{name}: REDIS_URL is not the replicas' Redis Cluster")
            if not args.metrics_port or args.metrics_host != "0.0.0.0":
                problems.append(f"{name}: no --metrics-host=0.0.0.0 --metrics-port (the archive lag)")
        root = (args.archive_dir if role == "serve" else args.dir) or s.get("environment", {}).get("NBA_ARCHIVE")
        if not root:
            problems.append(f"{name}: no NBA_ARCHIVE: it would use its own data directory's archive")
            continue
        roots.setdefault(root.rstrip("/"), []).append(name)
        if "://" in root:
            continue
        volume, read_only = _compose_mounts(s).get(root.rstrip("/"), ("", False))
        if volume not in doc.get("volumes", {}):
            problems.append(f"{name}: the archive {root} is not a named volume mounted there")
            continue
        volumes.setdefault(volume, []).append(name)
        if read_only:
            problems.append(f"{name}: the archive is mounted read-only, but {ARCHIVE_COMMANDS[role]} {ARCHIVE_WRITES[role]}")
    if len(roots) > 1:
        problems.append(f"the services name different archives: {roots}")
    if len(volumes) > 1:
        problems.append(f"the services mount different archive volumes: {volumes}")
    for name in writers:
        if services[name].get("profiles"):
            problems.append(f"{name}: the archive writer is in a profile: `up` would not start it")
    return problems


def _image_dirs() -> set[str]:
    """The directories the Dockerfile makes (``mkdir -p``) and gives to the image's user (uid 10001)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    made = {p.rstrip("/") for m in re.finditer(r"mkdir -p ([^&\n]+)", text) for p in m.group(1).split()}
    owned = {p.rstrip("/") for m in re.finditer(r"chown -R 10001:10001 ([^&\n]+)", text) for p in m.group(1).split()}
    return {d for d in made if any(d == o or d.startswith(o + "/") for o in owned)}


def compose_mount_point_problems(image: dict[str, dict]) -> list[str]:
    """A named volume an image service writes is mounted on a directory the image has, owned by its user:
    Docker gives a new named volume the owner of that directory, root when it is missing, and the non-root
    nba could not write it."""
    dirs = _image_dirs()
    return [f"{name}: the volume {volume} is mounted writable at {path}, which the image does not make for uid 10001"
            for name, s in image.items() for path, (volume, read_only) in _compose_mounts(s).items()
            if not read_only and not volume.startswith((".", "/")) and path not in dirs]


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
    pod = one(built, "Deployment", SERVING)["spec"]["template"]["spec"]
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {rules["metadata"]["name"]}
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built if d["kind"] != "ConfigMap") == \
        sorted((d["kind"], d["metadata"]["name"]) for d in manifests() if d["kind"] != "ConfigMap")


def _mutated(change) -> list[dict]:
    docs = copy.deepcopy(manifests())
    change(docs)
    return docs


BROKEN = {
    "readiness probe on another port": lambda d: one(d, "Deployment", SERVING)["spec"]["template"]["spec"]["containers"][0]
    ["readinessProbe"]["exec"]["command"].__setitem__(1, "--address=127.0.0.1:50052"),
    "HPA scales something else": lambda d: one(d, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].__setitem__("name", "nbx"),
    "PDB selects other pods": lambda d: one(d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].__setitem__(
        "app.kubernetes.io/name", "other"),
    "Service selects other pods": lambda d: one(d, "Service", "nba-headless")["spec"]["selector"].__setitem__(
        "app.kubernetes.io/component", "other"),
    "a Secret missing": lambda d: d.remove(one(d, "Secret", "nba-auth")),
    "an unknown nba serve flag": lambda d: one(d, "Deployment", SERVING)["spec"]["template"]["spec"]["containers"][0]["args"].append(
        "--no-such-flag"),
    "a rule file not mounted": lambda d: one(d, "Deployment", SERVING)["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"].pop(),
    "root filesystem writable": lambda d: one(d, "Deployment", SERVING)["spec"]["template"]["spec"]["containers"][0]
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
    "registry on one node only": lambda d: one(d, "PersistentVolumeClaim", "nba-models")["spec"].__setitem__(
        "accessModes", ["ReadWriteOnce"]),
    "no Job trains the first model": lambda d: d.remove(one(d, "Job")),
    # the archive
    "serving pods without NBA_ARCHIVE": lambda d: _container(d)["env"].remove(_env(_container(d), "NBA_ARCHIVE")),
    "serving pods mount the archive read-only": lambda d: _mount(_container(d), "archive").__setitem__("readOnly", True),
    "serving pods' archive on an emptyDir": lambda d: _pod(d)["volumes"].__setitem__(
        [v["name"] for v in _pod(d)["volumes"]].index("archive"), {"name": "archive", "emptyDir": {}}),
    "serving pods run a writer each": lambda d: _container(d)["args"].append("--archive=on"),
    "NBA_ARCHIVE not where the claim is mounted": lambda d: _env(_writer(d), "NBA_ARCHIVE").__setitem__(
        "value", "/var/lib/nba/archive2"),
    "serving pods name another archive": lambda d: (_container(d)["args"].append("--archive-dir=/var/lib/nba/data/a"),
                                                    _mount(_container(d), "archive").__setitem__("mountPath", "/var/lib/nba/data/a")),
    "the writer on another claim": lambda d: (d.append({**copy.deepcopy(one(d, "PersistentVolumeClaim", "nba-archive")),
                                                        "metadata": {"name": "nba-archive-b"}}),
                                              _writer_pod(d)["volumes"][0]["persistentVolumeClaim"].__setitem__(
                                                  "claimName", "nba-archive-b")),
    "archive on one node only": lambda d: one(d, "PersistentVolumeClaim", "nba-archive")["spec"].__setitem__(
        "accessModes", ["ReadWriteOnce"]),
    "an unknown nba archive run flag": lambda d: _writer(d)["args"].append("--no-such-flag"),
    "two writer replicas": lambda d: one(d, "Deployment", "nba-archive")["spec"].__setitem__("replicas", 2),
    "the writer rolls": lambda d: one(d, "Deployment", "nba-archive")["spec"].__setitem__(
        "strategy", {"type": "RollingUpdate"}),
    "a second writer Deployment": lambda d: d.append({**copy.deepcopy(one(d, "Deployment", "nba-archive")),
                                                      "metadata": {"name": "nba-archive-2"}}),
    "no archive writer": lambda d: d.remove(one(d, "Deployment", "nba-archive")),
    "writer metrics not on its port": lambda d: _writer(d)["args"].__setitem__(1, "--metrics-port=9466"),
    "writer metrics on loopback": lambda d: _writer(d)["args"].remove("--metrics-host=0.0.0.0"),
    "writer without liveness": lambda d: _writer(d).pop("livenessProbe"),
    "writer liveness on another port": lambda d: _writer(d)["livenessProbe"]["httpGet"].__setitem__("port", 9999),
    "writer without REDIS_URL": lambda d: _writer(d)["env"].remove(_env(_writer(d), "REDIS_URL")),
    "writer without the Redis CA": lambda d: _writer(d)["env"].remove(_env(_writer(d), "REDIS_CA")),
    "writer with a writable root": lambda d: _writer(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False),
    "writer gets a token": lambda d: _writer_pod(d).__setitem__("automountServiceAccountToken", True),
    "writer without seccomp": lambda d: _writer_pod(d)["securityContext"].pop("seccompProfile"),
    "writer without resources": lambda d: _writer(d).pop("resources"),
    "writer in no NetworkPolicy": lambda d: d.remove(one(d, "NetworkPolicy", "nba-archive")),
    "writer metrics open to every namespace": lambda d: one(d, "NetworkPolicy", "nba-archive")["spec"]["ingress"][0][
        "from"][0].__setitem__("namespaceSelector", {}),
    "writer reachable by callers": lambda d: one(d, "NetworkPolicy", "nba-archive")["spec"]["ingress"].append(
        {"from": [{"podSelector": {"matchLabels": {"nba-client": "true"}}}], "ports": [{"port": 50051}]}),
    "writer egress to the web": lambda d: one(d, "NetworkPolicy", "nba-archive")["spec"]["egress"].append(
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}),
    "writer cannot reach Redis": lambda d: one(d, "NetworkPolicy", "nba-archive")["spec"]["egress"].pop(0),
    "no compaction": lambda d: d.remove(one(d, "CronJob")),
    "two compactions at once": lambda d: one(d, "CronJob")["spec"].__setitem__("concurrencyPolicy", "Allow"),
    "an unknown nba archive compact flag": lambda d: _compact(d)["command"].append("--no-such-flag"),
    "compaction on another volume": lambda d: _compact_pod(d)["volumes"].__setitem__(0, {"name": "archive", "emptyDir": {}}),
    "compaction in no NetworkPolicy": lambda d: d.remove(one(d, "NetworkPolicy", "nba-archive-compact")),
    "training from the stream without the archive": lambda d: (
        one(d, "Job")["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(
            0, "exec nba train --from-stream --rules-dir=/etc/nba/rules --models-dir=/var/lib/nba/models"),
        one(d, "Job")["spec"]["template"]["spec"]["containers"][0]["env"].remove(
            _env(one(d, "Job")["spec"]["template"]["spec"]["containers"][0], "NBA_ARCHIVE"))),
}


def _mount(container: dict, name: str) -> dict:
    return next(m for m in container["volumeMounts"] if m["name"] == name)


def _writer_pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "nba-archive")["spec"]["template"]["spec"]


def _writer(docs: list[dict]) -> dict:
    return _writer_pod(docs)["containers"][0]


def _compact_pod(docs: list[dict]) -> dict:
    return one(docs, "CronJob", "nba-archive-compact")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _compact(docs: list[dict]) -> dict:
    return _compact_pod(docs)["containers"][0]


def _pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment", SERVING)["spec"]["template"]["spec"]


def _container(docs: list[dict]) -> dict:
    return _pod(docs)["containers"][0]


def _probe_command(docs: list[dict], kind: str) -> list[str]:
    return _container(docs)[kind]["exec"]["command"]


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_manifest_is_caught(what: str) -> None:
    assert k8s_problems(_mutated(BROKEN[what])), f"{what}: not caught"


def test_a_manifest_the_schema_refuses_is_caught() -> None:
    def bad(docs: list[dict]) -> None:
        one(docs, "Deployment", SERVING)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "often"
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


BROKEN_COMPOSE = {
    "no archive writer": lambda d: d["services"].pop("archive"),
    "two archive writers": lambda d: d["services"].__setitem__("archive-2", copy.deepcopy(d["services"]["archive"])),
    "the writer scaled": lambda d: d["services"]["archive"].__setitem__("scale", 2),
    "the writer only in a profile": lambda d: d["services"]["archive"].__setitem__("profiles", ["maintenance"]),
    "an unknown nba archive run flag": lambda d: d["services"]["archive"]["command"].append("--no-such-flag"),
    "writer metrics on loopback": lambda d: d["services"]["archive"]["command"].remove("--metrics-host=0.0.0.0"),
    "the writer on another Redis": lambda d: d["services"]["archive"]["environment"].__setitem__(
        "REDIS_URL", "redis+cluster://:pw@172.30.0.99:6379"),
    "a replica without NBA_ARCHIVE": lambda d: d["services"]["nba-2"].__setitem__(
        "environment", {k: v for k, v in d["services"]["nba-2"]["environment"].items() if k != "NBA_ARCHIVE"}),
    "a replica on a volume of its own": lambda d: (
        d["services"]["nba-2"].__setitem__("volumes", [v.replace("nba-archive:", "nba-2-archive:")
                                                       for v in d["services"]["nba-2"]["volumes"]]),
        d["volumes"].__setitem__("nba-2-archive", {})),
    "a replica mounts the archive read-only": lambda d: d["services"]["nba-1"].__setitem__(
        "volumes", [v + ":ro" if v.startswith("nba-archive:") else v for v in d["services"]["nba-1"]["volumes"]]),
    "a replica runs a writer too": lambda d: d["services"]["nba-1"].__setitem__(
        "command", d["services"]["nba-1"]["command"] + ["--archive=on"]),
    "compaction on another archive": lambda d: d["services"]["archive-compact"]["environment"].__setitem__(
        "NBA_ARCHIVE", "/var/lib/nba/other"),
    "an unknown nba archive compact flag": lambda d: d["services"]["archive-compact"].__setitem__(
        "command", ["--no-such-flag"]),
    "the archive on a directory the image lacks": lambda d: [
        (s["environment"].__setitem__("NBA_ARCHIVE", "/srv/archive"),
         s.__setitem__("volumes", [v.replace(":/var/lib/nba/archive", ":/srv/archive") for v in s["volumes"]]))
        for s in d["services"].values() if "NBA_ARCHIVE" in s.get("environment", {})],
}


@pytest.mark.parametrize("what", sorted(BROKEN_COMPOSE))
def test_a_broken_compose_archive_is_caught(what: str) -> None:
    doc = compose_doc()
    BROKEN_COMPOSE[what](doc)
    assert compose_problems(doc), f"{what}: not caught"


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
    container = one(manifests(), "Deployment", SERVING)["spec"]["template"]["spec"]["containers"][0]
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


def _run_as_manifest(container: dict, redis_url: str, archive: Path, metrics_port: int | None = None) -> subprocess.Popen:
    """A container's nba command (its env's literal values) run here: the test Redis for REDIS_URL (no
    TLS, so no REDIS_CA), ``archive`` for NBA_ARCHIVE, ``metrics_port`` for its metrics port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "NBA_"))}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e and e["name"] != "REDIS_CA"})
    env.update(REDIS_URL=redis_url, NBA_ARCHIVE=str(archive), NBA_DATA_DIR=str(archive.parent / "data"))
    command = argv(container)
    if metrics_port is not None:
        command = [re.sub(r"^--metrics-port=\d+$", f"--metrics-port={metrics_port}", a) for a in command]
    assert command[0] == "nba"
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *command[1:]], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_archive_writer_and_compaction_of_the_manifests_run(redis_url: str, tmp_path: Path) -> None:
    """The nba-archive Deployment's command and env, run against a real Redis: its probes' path answers on
    the metrics port with the archive lag; a second writer on the same archive (what Recreate avoids)
    exits, naming the lock; SIGTERM stops it within the grace period with exit 0; then the CronJob's
    compaction runs on the same archive and succeeds."""
    import urllib.request

    from engine.store.redis_embedded import free_port

    docs = manifests()
    writer = one(docs, "Deployment", "nba-archive")
    pod = writer["spec"]["template"]["spec"]
    container = pod["containers"][0]
    path = container["livenessProbe"]["httpGet"]["path"]
    assert container["startupProbe"]["httpGet"]["path"] == path
    archive, port = tmp_path / "archive", free_port()
    proc = _run_as_manifest(container, redis_url, archive, port)
    try:
        deadline = time.monotonic() + 60
        scraped = ""
        while time.monotonic() < deadline and 'nba_archive_lag_entries{stream="decisions"}' not in scraped:
            assert proc.poll() is None, proc.communicate()[1]
            try:  # served before the writer's first pass sets the lag (its help text only): ask again
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                    scraped = reply.read().decode()
            except OSError:
                pass
            time.sleep(0.2)
        assert 'nba_archive_lag_entries{stream="decisions"}' in scraped, scraped[-2000:]
        second = _run_as_manifest(container, redis_url, archive, free_port())
        _, err = second.communicate(timeout=60)
        assert second.returncode != 0 and "another archive writer holds" in err, err
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=pod.get("terminationGracePeriodSeconds", 30))
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    compact = one(docs, "CronJob", "nba-archive-compact")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    done = _run_as_manifest(compact, redis_url, archive)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["archive"] == str(archive)


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
    """Each ServiceMonitor scrapes /metrics through one metrics Service of ``docs`` (its selector finds that
    Service alone, which carries no gRPC port; its port is the Service's), and together they scrape every
    Deployment that has a metrics port (the serving pods and the archive writer, whose lag the archive
    alerts watch); the PrometheusRule holds nba-alerts.yml's groups. None names a namespace (kustomize
    places them with the rest)."""
    problems = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    monitors = [d for d in objects if d["kind"] == "ServiceMonitor"]
    rules = [d for d in objects if d["kind"] == "PrometheusRule"]
    if not monitors or len(rules) != 1:
        return [f"expected ServiceMonitors and one PrometheusRule, found {len(monitors)} and {len(rules)}"]
    for d in objects:
        if d.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"{d['kind']}/{d['metadata']['name']}: apiVersion {d.get('apiVersion')}")
        if "namespace" in d["metadata"]:
            problems.append(f"{d['kind']}/{d['metadata']['name']} names a namespace")
    scraped: list[dict] = []
    for monitor in monitors:
        name, spec = monitor["metadata"]["name"], monitor["spec"]
        if "namespaceSelector" in spec:
            problems.append(f"ServiceMonitor {name} looks for Services outside its own namespace")
        selected = [n for n, s in services.items() if _matches(spec["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))]
        if len(selected) != 1:
            problems.append(f"ServiceMonitor {name} selects the Services {selected}, not one metrics Service")
        else:
            service = services[selected[0]]
            port_names = {p["name"] for p in service["spec"]["ports"]}
            targets = {p.get("targetPort") for p in service["spec"]["ports"]}
            if "metrics" not in targets or "grpc" in targets:
                problems.append(f"ServiceMonitor {name} scrapes Service {selected[0]}, which is not a metrics Service")
            else:
                scraped.append(service)
            for endpoint in spec.get("endpoints", []):
                if endpoint.get("port") not in port_names:
                    problems.append(f"ServiceMonitor {name}: endpoint port {endpoint.get('port')!r} is no port of {selected[0]}")
                if endpoint.get("path", "/metrics") != "/metrics" or endpoint.get("scheme", "http") != "http":
                    problems.append(f"ServiceMonitor {name} scrapes something other than http /metrics")
        if not spec.get("endpoints"):
            problems.append(f"ServiceMonitor {name} has no endpoints")
    for d in docs:
        template = pod_template(d) if d["kind"] == "Deployment" else None
        if template is None or not any(p.get("name") == "metrics" for c in template["spec"]["containers"]
                                       for p in c.get("ports", [])):
            continue
        if not any(_matches(s["spec"].get("selector", {}), template["metadata"].get("labels", {})) for s in scraped):
            problems.append(f"no ServiceMonitor scrapes the metrics of Deployment {d['metadata']['name']}")
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
    "the archive writer not scraped": lambda o, d: o.remove(next(
        x for x in o if x["kind"] == "ServiceMonitor" and x["metadata"]["name"] == "nba-archive")),
    "the writer's metrics Service selects the serving pods": lambda o, d: one(d, "Service", "nba-archive-metrics")[
        "spec"]["selector"].__setitem__("app.kubernetes.io/component", "decision-service"),
    "the writer's metrics Service lost its port": lambda o, d: one(d, "Service", "nba-archive-metrics")["spec"][
        "ports"][0].__setitem__("targetPort", 9999),
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
    assert sorted(d["kind"] for d in added) == ["PrometheusRule", "ServiceMonitor", "ServiceMonitor"]
    assert all(d["metadata"]["namespace"] == "nba" for d in added)
    assert monitoring_problems([{**d, "metadata": {k: v for k, v in d["metadata"].items() if k != "namespace"}}
                                for d in added],
                               [{**d, "metadata": {k: v for k, v in d["metadata"].items() if k != "namespace"}}
                                for d in built if d not in added]) == []
