"""The CRD file: generated from the typed models, names, columns, subresources, defaults and
CEL rules (parsed here; tests/integration/test_operator_validation.py applies it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelendpoint_operator import constants as c
from modelendpoint_operator import crd
from modelendpoint_operator.spec import ModelEndpointSpec

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "modelendpoints.yaml"
CRD = yaml.safe_load(CRD_FILE.read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]["properties"]

ISSUE_FIELDS = [
    "model", "servedModelName", "responseRole", "rawOpenAIOutput", "replicas", "gpus",
    "gpuResourceName", "engine", "image", "imagePullPolicy", "imagePullSecrets", "resources",
    "env", "envFrom", "hfTokenSecretRef", "apiKeySecretRef", "modelCache", "shmSize",
    "nodeSelector", "tolerations", "affinity", "priorityClassName", "runtimeClassName",
    "service", "ingress",
]


def test_the_committed_crd_is_what_the_models_generate() -> None:
    """One source of truth: `make crds` writes crds/modelendpoints.yaml from spec.py."""
    assert CRD_FILE.read_text() == crd.crd_yaml(), "crds/modelendpoints.yaml is stale: run `make crds`"


def test_the_docs_field_table_is_what_the_models_generate() -> None:
    docs = (REPO / "docs" / "operator.md").read_text()
    assert docs == crd.replace_table(docs), "docs/operator.md's field table is stale: run `make crds`"


def test_names_match_the_operator() -> None:
    assert CRD["metadata"]["name"] == f"{c.PLURAL}.{c.GROUP}"
    assert CRD["spec"]["group"] == c.GROUP and VERSION["name"] == c.VERSION
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (c.KIND, c.PLURAL, ["mep"])
    assert CRD["spec"]["scope"] == "Namespaced"


def test_printer_columns() -> None:
    cols = [(col["name"], col["jsonPath"]) for col in VERSION["additionalPrinterColumns"]]
    assert [n for n, _ in cols] == ["Model", "Served-As", "Ready", "Phase", "URL", "Age"]
    assert dict(cols)["Age"] == ".metadata.creationTimestamp"


def test_status_and_scale_subresources() -> None:
    sub = VERSION["subresources"]
    assert sub["status"] == {}
    assert sub["scale"] == {"specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector"}


@pytest.mark.parametrize("field", ISSUE_FIELDS)
def test_every_issue_field_is_in_the_schema(field: str) -> None:
    assert field in SPEC


def test_engine_fields() -> None:
    engine = SPEC["engine"]["properties"]
    assert set(engine) >= {"maxModelLen", "dtype", "gpuMemoryUtilization", "tensorParallelSize",
                           "quantization", "enforceEager", "trustRemoteCode", "maxNumSeqs",
                           "enablePrefixCaching", "extraArgs"}
    assert engine["dtype"]["enum"] == ["auto", "half", "float16", "bfloat16", "float", "float32"]
    assert engine["gpuMemoryUtilization"]["exclusiveMinimum"] is True
    assert engine["gpuMemoryUtilization"]["maximum"] == 1


def test_schema_defaults_are_the_ones_the_operator_reads_with() -> None:
    """The API server and the operator fill in the same defaults (both from spec.py)."""
    parsed = ModelEndpointSpec.model_validate({"model": "m"}).wire()
    for key, prop in SPEC.items():
        if "default" in prop and prop["default"] != {}:
            assert parsed[key] == prop["default"], key
    assert parsed["service"] == {"type": "ClusterIP", "port": 80}
    assert parsed["ingress"] == {"enabled": False}
    assert parsed["loadBalancing"]["strategy"] == "LeastRequests"
    assert SCHEMA["properties"]["spec"]["required"] == ["model"]


def test_structural_schema_has_no_json_schema_leftovers() -> None:
    text = CRD_FILE.read_text()
    for leftover in ("$ref", "anyOf", "title:", "null", "$defs"):
        assert leftover not in text, leftover


def _rules(node, path="") -> list[tuple[str, dict]]:
    found = []
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            found.append((path, rule))
        for key, child in node.items():
            found.extend(_rules(child, f"{path}/{key}"))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found.extend(_rules(child, f"{path}[{i}]"))
    return found


def test_every_cel_rule_has_a_message_and_names_its_field() -> None:
    rules = _rules(SCHEMA)
    assert len(rules) >= 10
    for path, rule in rules:
        assert rule.get("message"), path
        assert rule.get("reason"), path
        # A rule on an object names the field it judges; a rule on a list item is reported
        # at that item (spec.env[3]) and names it in its messageExpression; the root rule
        # (metadata.name) names its field in the message.
        if path.endswith("/items"):
            assert rule.get("fieldPath") or rule.get("messageExpression"), (path, rule)
        elif path:
            assert rule.get("fieldPath", "").startswith("."), (path, rule)


def test_status_phases() -> None:
    status = SCHEMA["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Progressing", "Ready", "Degraded", "Failed"]
    for field in ("replicas", "readyReplicas", "servedModelName", "url", "externalURL",
                  "observedGeneration", "conditions", "selector", "ready"):
        assert field in status


def test_crd_has_no_yaml_anchors() -> None:
    text = CRD_FILE.read_text()
    assert not any(line.strip().startswith(("&", "*")) or ": &" in line or ": *" in line
                   for line in text.splitlines())


def _quantities(node, path="") -> list[tuple[str, dict]]:
    """Every int-or-string quantity field of the schema (sizes and resources)."""
    found = []
    if isinstance(node, dict):
        if node.get("x-kubernetes-int-or-string") and "pattern" in node:
            found.append((path, node))
        for key, child in node.items():
            found.extend(_quantities(child, f"{path}.{key}"))
    return found


def test_quantities_are_never_negative() -> None:
    import re

    fields = _quantities(SPEC)
    names = {p for p, _ in fields}
    assert {".shmSize.", ".modelCache.properties.size.",
            ".resources.properties.requests.properties.cpu."} <= {p + "." for p in names}
    for path, node in fields:
        pattern = re.compile(node["pattern"])
        for good in ("8Gi", "1", "500m", "1.5G", "0", "1e3"):
            assert pattern.match(good), (path, good)
        for bad in ("-1Gi", "-5Gi", "+1Gi", "-1", "-0.5"):
            assert not pattern.match(bad), (path, bad)
        assert node.get("minimum") == 0, path  # an integer value: no pattern applies


def test_the_crd_refuses_every_option_the_runtime_refuses() -> None:
    """One list in two packages (the operator must not import vLLM): kept equal here, in
    every spelling vLLM's parser takes (short, --no-, and the help that would end the engine)."""
    import argparse

    from modelendpoint_runtime.engine import build_parser, refused_options

    refused = refused_options()
    spellings = {option for action in build_parser()._actions
                 if action.dest in refused or isinstance(action, argparse._HelpAction)
                 for option in action.option_strings}
    assert {"-asc", "--no-enable-request-id-headers", "-h"} <= spellings
    assert set(c.RUNTIME_OWNED_OPTIONS) == spellings
    assert len(c.RUNTIME_OWNED_OPTIONS) == len(spellings)
