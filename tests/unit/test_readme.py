"""The README's table of ModelEndpoint fields → runtime variables, checked
against the operator's own mapping (``manifests.container_env``), row by row.

Every row's field, set on a ModelEndpoint, must make the operator set that
row's variables to the value the field implies; every variable the operator
sets must have a row; and where the operator sets a variable without the
field, its value must be the row's stated default. So the table cannot drift
from the code unnoticed.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest

from modelendpoint_operator import constants as c
from modelendpoint_operator import manifests
from modelendpoint_operator.settings import load_settings

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### ModelEndpoint fields and the runtime variables they set"
SETTINGS = load_settings({"MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE": "reg.example/runtime:9"})

# A value to set for each field the table names, and what the operator should
# turn it into. A new row naming a field not here fails, asking for an example.
EXAMPLES: dict[str, tuple[object, object]] = {
    "model": ("org/other-model", "org/other-model"),
    "servedModelName": ("chat", "chat"),
    "responseRole": ("bot", "bot"),
    "rawOpenAIOutput": (False, "0"),
    "apiKeySecretRef": ({"name": "keys", "key": "api-key"}, {"secretKeyRef": {"name": "keys", "key": "api-key"}}),
    "hfTokenSecretRef": ({"name": "hf", "key": "token"}, {"secretKeyRef": {"name": "hf", "key": "token"}}),
    "engine.maxModelLen": (4096, "4096"),
    "engine.dtype": ("bfloat16", "bfloat16"),
    "engine.tensorParallelSize": (2, "2"),
    "engine.gpuMemoryUtilization": (0.5, "0.5"),
    "engine.quantization": ("awq", "awq"),
    "engine.enforceEager": (True, "1"),
    "engine.trustRemoteCode": (True, "1"),
    "engine.maxNumSeqs": (8, "8"),
    "engine.extraArgs": (["--enable-prefix-caching", "--x", "a b"],
                         shlex.join(["--enable-prefix-caching", "--x", "a b"])),
    "drainTimeoutSeconds": (45, "45"),
}


def table_rows() -> list[dict]:
    """The table's rows: variables, their stated defaults and the field (None if fixed)."""
    text = README.read_text()
    assert SECTION in text, f"the README lost its section {SECTION!r}"
    rows = []
    for line in text.split(SECTION, 1)[1].splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == "runtime variable" or set(cells[0]) <= {"-"}:
            continue
        field = re.match(r"`([^`]+)`", cells[2])
        rows.append({
            "vars": re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]),
            "defaults": re.findall(r"`([^`]*)`", cells[1]),
            "field": field.group(1) if field else None,
            "line": line,
        })
    return rows


ROWS = table_rows()


def owner(name: str = "llm", **spec) -> dict:
    return {"apiVersion": c.API_VERSION, "kind": c.KIND,
            "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
            "spec": {"model": "org/model", **spec}}


def with_field(obj: dict, path: str, value: object) -> dict:
    obj = copy.deepcopy(obj)
    node = obj["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return obj


def env_of(obj: dict) -> dict[str, dict]:
    return {e["name"]: e for e in manifests.container_env(obj)}


def test_the_table_is_there_and_every_row_names_variables():
    assert len(ROWS) >= 20
    for row in ROWS:
        assert row["vars"], f"a row without a runtime variable: {row['line']}"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: ",".join(r["vars"]))
def test_each_rows_field_sets_its_variables(row):
    field = row["field"]
    if field is None:  # fixed by the operator: set, to the stated defaults
        env = env_of(owner())
        assert [env[v]["value"] for v in row["vars"]] == row["defaults"]
    elif field == "env":  # anything through spec.env reaches the runtime as is
        for var in row["vars"]:
            env = env_of(owner(env=[{"name": var, "value": "42"}]))
            assert env[var]["value"] == "42"
    elif field == "metadata.name":
        for var in row["vars"]:
            assert env_of(owner(name="my-llm"))[var]["value"] == "my-llm"
    elif field == "modelCache":  # a path inside the cache volume, PVC or emptyDir
        obj = owner()
        (var,) = row["vars"]
        path = env_of(obj)[var]["value"]
        mounts = manifests.pod_template(obj, SETTINGS)["spec"]["containers"][0]["volumeMounts"]
        assert any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
                   for m in mounts), f"{var}={path} is not on a mounted volume"
    else:
        assert field in EXAMPLES, f"add an example value for {field!r} to EXAMPLES ({row['line']})"
        value, expected = EXAMPLES[field]
        (var,) = row["vars"]
        entry = env_of(with_field(owner(), field, value))[var]
        got = entry.get("valueFrom") if isinstance(expected, dict) else entry.get("value")
        assert got == expected, f"{field}={value!r} should set {var}={expected!r}, the operator sets {got!r}"


def test_every_variable_the_operator_sets_has_a_row():
    everything = owner()
    for field, (value, _) in EXAMPLES.items():
        everything = with_field(everything, field, value)
    documented = {v for row in ROWS for v in row["vars"]}
    assert set(env_of(everything)) - documented == set()


@pytest.mark.parametrize("row", [r for r in ROWS if r["field"] not in (None, "env")],
                         ids=lambda r: ",".join(r["vars"]))
def test_defaults_the_operator_sets_match_the_table(row):
    """Without the field, a variable the operator still sets has the row's stated default."""
    env = env_of(owner())
    for var, default in zip(row["vars"], row["defaults"]):
        if var in env and len(row["defaults"]) == len(row["vars"]) and "value" in env[var]:
            assert env[var]["value"] == default, f"{var}: README says {default!r}"


def test_tensor_parallel_size_defaults_to_gpus_as_the_table_says():
    row = next(r for r in ROWS if r["vars"] == ["TENSOR_PARALLEL_SIZE"])
    assert "(default `gpus`)" in row["line"]
    assert env_of(owner(gpus=4))["TENSOR_PARALLEL_SIZE"]["value"] == "4"
