"""The README's table of the runtime's own variables and the ModelEndpoint fields that
set them, checked against the operator's own mapping (``manifests.container_env``).

Every row with a field must make the operator set that row's variables to the value
the field implies; a fixed row's values must be what the operator always sets; every
variable the operator sets must have a row (the typed engine fields by the one rule,
which the table states once instead of repeating vLLM's options). So the table cannot
drift from the code unnoticed.
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
from modelendpoint_operator.spec import ENGINE_FIELDS_BY_RULE, Endpoint, engine_variable

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### ModelEndpoint fields and the runtime variables they set"
SETTINGS = load_settings({"MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE": "reg.example/runtime:9"})

# A value to set for each field the table names, and what the operator turns it into
# (per variable, in the row's order). A new row naming a field not here fails, asking for one.
EXAMPLES: dict[str, tuple[object, tuple[object, ...]]] = {
    "model": ("org/other-model", ("org/other-model",)),
    "servedModelName": ("chat", ("chat",)),
    "responseRole": ("bot", ("bot",)),
    "rawOpenAIOutput": (False, ("0",)),
    "apiKeySecretRef": ({"name": "keys", "key": "api-key"}, (c.API_KEY_FILE,)),
    "hfTokenSecretRef": ({"name": "hf", "key": "token"}, ({"secretKeyRef": {"name": "hf", "key": "token"}},)),
    "engine.tensorParallelSize": (2, ("2",)),
    "engine.chatTemplate": ({"inline": "{{ messages }}"}, ("{{ messages }}",)),
    "task": ("embed", ("pooling", "embed")),
    "adapters": ([{"name": "sql", "source": "org/sql"}], ("true", c.ADAPTERS_FILE)),
    "engine.extraArgs": (["--seed", "1", "--x", "a b"], (shlex.join(["--seed", "1", "--x", "a b"]),)),
    "drainTimeoutSeconds": (45, ("45",)),
}


def table_rows() -> list[dict]:
    """The table's rows: variables, stated defaults, the field (None: fixed or by hand)."""
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
            "fixed": (re.findall(r"`([^`]*)`", cells[2].split("fixed:", 1)[1].split(";", 1)[0])
                      if "fixed:" in cells[2] else None),
            "field": field.group(1) if field and not cells[2].startswith("(") else None,
            "by_hand": cells[2].startswith("(by hand"),
            "overridable": cells[2].startswith("set by the operator unless `env`"),
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
    return {e["name"]: e for e in manifests.container_env(Endpoint.from_body(obj))}


def test_the_table_is_there_and_every_row_names_variables():
    assert len(ROWS) >= 20
    for row in ROWS:
        assert row["vars"], f"a row without a runtime variable: {row['line']}"


@pytest.mark.parametrize("row", ROWS, ids=lambda r: ",".join(r["vars"]))
def test_each_rows_field_sets_its_variables(row):
    field = row["field"]
    if row["fixed"] is not None:  # set by the operator whatever the spec says, to these values
        env = env_of(owner())
        assert [env[v]["value"] for v in row["vars"]] == row["fixed"], row["line"]
    elif row["by_hand"]:
        env = env_of(owner(apiKeySecretRef={"name": "k", "key": "k"}))
        assert not set(row["vars"]) & set(env), f"the operator sets {row['vars']}: not by hand only"
    elif row["overridable"]:  # the operator's value, unless spec.env names the variable
        for var in row["vars"]:
            assert env_of(owner(gpus=0))[var]["value"], row["line"]
            names = [e["name"] for e in manifests.container_env(Endpoint.from_body(
                owner(gpus=0, env=[{"name": var, "value": "42"}])))]
            assert env_of(owner(gpus=0, env=[{"name": var, "value": "42"}]))[var]["value"] == "42"
            assert names.count(var) == 1
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
        mounts = manifests.pod_template(Endpoint.from_body(obj), SETTINGS)["spec"]["containers"][0]["volumeMounts"]
        assert any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
                   for m in mounts), f"{var}={path} is not on a mounted volume"
    elif field == "engine.maxModelLen":  # the rule's row: its examples are typed fields, by the rule
        examples = dict(zip(row["vars"], ("max_model_len", "enable_prefix_caching"), strict=True))
        for var, name in examples.items():
            assert name in ENGINE_FIELDS_BY_RULE and engine_variable(name) == var
            spec_value = {"max_model_len": 4096, "enable_prefix_caching": False}[name]
            alias = "maxModelLen" if name == "max_model_len" else "enablePrefixCaching"
            assert env_of(owner(engine={alias: spec_value}))[var]["value"] == str(spec_value).lower()
    else:
        assert field in EXAMPLES, f"add an example value for {field!r} to EXAMPLES ({row['line']})"
        value, expected = EXAMPLES[field]
        env = env_of(with_field(owner(), field, value))
        for var, want in zip(row["vars"], expected, strict=True):
            entry = env[var]
            got = entry.get("valueFrom") if isinstance(want, dict) else entry.get("value")
            assert got == want, f"{field}={value!r} should set {var}={want!r}, the operator sets {got!r}"


def test_every_variable_the_operator_sets_has_a_row():
    everything = owner()
    for field, (value, _) in EXAMPLES.items():
        everything = with_field(everything, field, value)
    documented = {v for row in ROWS for v in row["vars"]}
    rule = {engine_variable(name) for name in ENGINE_FIELDS_BY_RULE}
    assert set(env_of(everything)) - documented - rule == set()


def test_tensor_parallel_size_defaults_to_gpus_as_the_table_says():
    row = next(r for r in ROWS if r["vars"] == ["TENSOR_PARALLEL_SIZE"])
    assert "(default `gpus`)" in row["line"]
    assert env_of(owner(gpus=4))["TENSOR_PARALLEL_SIZE"]["value"] == "4"
