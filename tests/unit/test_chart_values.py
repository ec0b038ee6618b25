"""values.yaml and values.schema.json: a mistyped value fails naming it, every key is
documented, and the two files describe the same keys."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelendpoint-operator"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)

# Values holding Kubernetes objects: their children are Kubernetes fields, documented
# by the comment on the parent key (and, in the schema, typed like the Kubernetes API).
K8S_OBJECT_KEYS = {"resources", "podSecurityContext", "securityContext", "affinity"}


def helm(testbed_bin: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(testbed_bin / "helm"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()})


@pytest.mark.parametrize(
    "set_arg, named",
    [
        ("replica=2", "'replica'"),  # top level: replicas
        ("image.tg=v2", "'tg'"),  # nested: image.tag
        ("watchNamespace[0]=a", "'watchNamespace'"),  # watchNamespaces
        ("securityContext.readOnlyRootFileSystem=true", "'readOnlyRootFileSystem'"),
        ("metrics.serviceMonitor.enable=true", "'enable'"),
        ("serviceAccount.annotation.a=b", "'annotation'"),
        ("podDisruptionBudget.maxUnavailable=1", "'maxUnavailable'"),
        ("resources.claims[0].nam=x", "'nam'"),  # inside an array's items
    ],
)
def test_a_mistyped_key_fails_naming_it(testbed_bin, set_arg, named):
    for command in ("template", "lint"):
        args = [command, str(CHART), "--set", set_arg]
        if command == "template":
            args.insert(1, "r")
        result = helm(testbed_bin, *args)
        assert result.returncode != 0, f"helm {command} accepted --set {set_arg}"
        output = result.stdout + result.stderr
        assert f"additional properties {named} not allowed" in output, output


@pytest.mark.parametrize(
    "set_arg, where",
    [
        ("replicas=two", "/replicas"),
        ("logLevel=verbose", "/logLevel"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("watchNamespaces[0]=Team_A", "/watchNamespaces/0"),
        ("metrics.port=70000", "/metrics/port"),
        ("podSecurityContext.runAsUser=-1", "/podSecurityContext/runAsUser"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        # Anchored on both alternatives: "Bad_Name" must not pass by its valid tail "ame".
        ("peering.name=Bad_Name", "/peering/name"),
        ("serviceAccount.name=Bad_Name", "/serviceAccount/name"),
        ("serviceAccount.name=ok-name-", "/serviceAccount/name"),
    ],
)
def test_a_wrong_value_fails_naming_its_path(testbed_bin, set_arg, where):
    result = helm(testbed_bin, "template", "r", str(CHART), "--set", set_arg)
    assert result.returncode != 0, f"helm template accepted --set {set_arg}"
    assert f"at '{where}'" in result.stderr, result.stderr


@pytest.mark.parametrize("set_arg", [
    "peering.name=my-operator.peering", "serviceAccount.name=mep-operator", "serviceAccount.name=",
    "resources.claims[0].name=gpu", "resources.claims[0].request=gpu-large",
])
def test_valid_values_still_pass(testbed_bin, set_arg):
    extra = ["--set", "resources.claims[0].name=gpu"] if "request" in set_arg else []
    result = helm(testbed_bin, "template", "r", str(CHART), "--set", set_arg, *extra)
    assert result.returncode == 0, result.stderr


def _object_schemas(node, path="$"):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for key, child in node.items():
            yield from _object_schemas(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _object_schemas(child, f"{path}[{i}]")


def _array_schemas(node, path="$"):
    if isinstance(node, dict):
        if node.get("type") == "array":
            yield path, node
        for key, child in node.items():
            yield from _array_schemas(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _array_schemas(child, f"{path}[{i}]")


def test_every_object_level_of_the_schema_is_closed():
    # Closed: additionalProperties false, or a typed map (labels, annotations, nodeSelector:
    # string values). Open only where the value is an arbitrary Kubernetes sub-object.
    open_on_purpose = {"$.properties.global"} | {
        f"{prefix}{path}"
        for prefix in ("$.properties", "$.properties.gateway.properties")
        for path in (".extraEnv.items.properties.valueFrom", ".affinity.properties.nodeAffinity",
                     ".affinity.properties.podAffinity", ".affinity.properties.podAntiAffinity")
    }
    checked = 0
    for path, node in _array_schemas(SCHEMA):
        # An array without an items schema accepts anything in it (claims[0].nam=x).
        assert isinstance(node.get("items"), dict) and node["items"].get("type"), f"{path} has no items schema"
    for path, node in _object_schemas(SCHEMA):
        if path in open_on_purpose:
            continue
        extra = node.get("additionalProperties")
        assert extra is False or (isinstance(extra, dict) and extra.get("type") == "string"), path
        checked += 1
    assert checked > 20
    assert "$.properties.resources.properties.claims.items" in dict(_object_schemas(SCHEMA))


def _schema_keys(schema: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, sub in schema.get("properties", {}).items():
        keys.add(prefix + key)
        if key not in K8S_OBJECT_KEYS and sub.get("type") == "object" and "properties" in sub:
            keys |= _schema_keys(sub, f"{prefix}{key}.")
    return keys


def _value_keys(values: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        keys.add(prefix + key)
        if key not in K8S_OBJECT_KEYS and isinstance(value, dict) and value:
            keys |= _value_keys(value, f"{prefix}{key}.")
    return keys


def test_values_and_schema_describe_the_same_keys():
    assert _value_keys(VALUES) == _schema_keys(SCHEMA) - {"global"}


def test_every_key_in_values_yaml_is_commented():
    lines = VALUES_TEXT.splitlines()
    undocumented = []
    parents: list[tuple[int, str]] = []  # (indent, key) of enclosing mappings
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        inside_k8s_object = any(k in K8S_OBJECT_KEYS for _, k in parents)
        parents.append((indent, key))
        if inside_k8s_object:
            continue
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if not previous.startswith("#"):
            undocumented.append(".".join(k for _, k in parents))
    assert not undocumented, f"keys without a comment above them: {undocumented}"


def test_defaults_are_secure_and_valid_for_the_operator():
    assert VALUES["watchNamespaces"] == []
    assert VALUES["securityContext"]["readOnlyRootFilesystem"] is True
    assert VALUES["securityContext"]["allowPrivilegeEscalation"] is False
    assert VALUES["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert VALUES["podSecurityContext"]["runAsNonRoot"] is True
    assert VALUES["podSecurityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert VALUES["metrics"]["serviceMonitor"]["enabled"] is False  # needs prometheus-operator


def _leaf_keys(values: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        if key not in K8S_OBJECT_KEYS and isinstance(value, dict) and value:
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def test_readme_values_table_lists_every_value():
    readme = (CHART / "README.md").read_text()
    table = readme.split("## Values", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([\w.]+)` \|", table, re.M))
    assert documented == _leaf_keys(VALUES)
