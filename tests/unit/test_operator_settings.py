"""Operator settings: MEP_OPERATOR_* variables, one-line errors, exit status."""

from __future__ import annotations

import pytest

from modelendpoint_operator import main as main_mod
from modelendpoint_operator.settings import (
    DEFAULT_RUNTIME_IMAGE,
    OperatorSettings,
    SettingsError,
    load_settings,
)


def test_defaults_watch_everything() -> None:
    s = load_settings({})
    assert s.clusterwide and s.namespace_list == []
    assert s.default_runtime_image == DEFAULT_RUNTIME_IMAGE
    assert s.default_ingress_class is None
    assert (s.metrics_port, s.liveness_port) == (9090, 8080)
    assert s.log_format == "json" and s.log_level == "info"
    assert not s.standalone and s.peering_name == "modelendpoint-operator"


def test_values_are_read_from_the_prefixed_variables() -> None:
    s = load_settings({
        "MEP_OPERATOR_NAMESPACES": " team-b, team-a ,team-b",
        "MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE": "reg.example/rt:2",
        "MEP_OPERATOR_DEFAULT_INGRESS_CLASS": "nginx",
        "MEP_OPERATOR_LOG_LEVEL": "DEBUG",
        "MEP_OPERATOR_METRICS_PORT": "0",
        "MEP_OPERATOR_PEERING_PRIORITY": "7",
        "MEP_OPERATOR_STANDALONE": "true",
        "UNRELATED": "x",
    })
    assert not s.clusterwide and s.namespace_list == ["team-a", "team-b"]
    assert s.default_runtime_image == "reg.example/rt:2"
    assert s.default_ingress_class == "nginx"
    assert s.log_level == "debug" and s.metrics_port == 0
    assert s.effective_priority() == 7 and s.standalone


def test_star_means_all_namespaces_and_empty_ingress_class_is_unset() -> None:
    s = load_settings({"MEP_OPERATOR_NAMESPACES": "*", "MEP_OPERATOR_DEFAULT_INGRESS_CLASS": " "})
    assert s.clusterwide and s.default_ingress_class is None


def test_random_priority_per_process_when_unset() -> None:
    s = load_settings({})
    priorities = {s.effective_priority() for _ in range(20)}
    assert len(priorities) > 1 and all(p > 0 for p in priorities)


@pytest.mark.parametrize("var,value", [
    ("MEP_OPERATOR_METRICS_PORT", "ninety"),
    ("MEP_OPERATOR_LIVENESS_PORT", "70000"),
    ("MEP_OPERATOR_NAMESPACES", "ok,Not_OK"),
    ("MEP_OPERATOR_LOG_LEVEL", "loud"),
    ("MEP_OPERATOR_LOG_FORMAT", "xml"),
    ("MEP_OPERATOR_DEFAULT_IMAGE_PULL_POLICY", "Sometimes"),
    ("MEP_OPERATOR_DEFAULT_RUNTIME_IMAGE", ""),
    ("MEP_OPERATOR_PEERING_PRIORITY", "-1"),
    ("MEP_OPERATOR_STANDALONE", "perhaps"),
])
def test_bad_value_is_one_line_naming_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({var: value})
    text = str(err.value)
    assert "\n" not in text and var in text and repr(value) in text


def test_unknown_variable_is_named_with_the_known_ones() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({"MEP_OPERATOR_NAMESPACE": "a"})
    assert "MEP_OPERATOR_NAMESPACE;" in str(err.value)
    assert "MEP_OPERATOR_NAMESPACES" in str(err.value)


def test_settings_do_not_read_the_process_environment(monkeypatch) -> None:
    monkeypatch.setenv("MEP_OPERATOR_METRICS_PORT", "1234")
    assert load_settings({}).metrics_port == 9090


def test_main_exits_2_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEP_OPERATOR_METRICS_PORT", "x")
    assert main_mod.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "MEP_OPERATOR_METRICS_PORT" in err


def test_main_rejects_arguments_and_prints_help(capsys) -> None:
    assert main_mod.main(["--bogus"]) == 2
    assert main_mod.main(["--help"]) == 0
    assert "MEP_OPERATOR_NAMESPACES" in capsys.readouterr().out


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operator.md").read_text()
    for field in OperatorSettings.model_fields:
        assert f"MEP_OPERATOR_{field.upper()}" in doc, field
