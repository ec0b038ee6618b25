"""MEP_GATEWAY_* settings: defaults, one-line errors naming the variable, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelendpoint_gateway.settings import SettingsError, load_settings

BIN = Path(sys.executable).parent / "modelendpoint-gateway"


def test_defaults():
    s = load_settings({})
    assert (s.port, s.metrics_port, s.bind_address) == (8080, 9090, "0.0.0.0")
    assert s.clusterwide and s.namespace_list == []
    assert (s.hold_timeout_seconds, s.max_held_requests, s.hold_keepalive_seconds) == (600, 1000, 10)
    assert (s.max_attempts, s.key_refresh_seconds, s.drain_timeout_seconds) == (3, 10, 60)
    assert s.upstream_idle_seconds < 5      # below the runtime's keep-alive timeout
    assert s.pod_name


def test_values():
    s = load_settings({"MEP_GATEWAY_NAMESPACES": "b, a", "MEP_GATEWAY_PORT": "8081",
                       "MEP_GATEWAY_LOG_LEVEL": "DEBUG", "mep_gateway_access_log": "false",
                       "OTHER": "ignored"})
    assert s.namespace_list == ["a", "b"] and not s.clusterwide
    assert (s.port, s.log_level, s.access_log) == (8081, "debug", False)
    assert load_settings({"MEP_GATEWAY_NAMESPACES": "*"}).clusterwide


@pytest.mark.parametrize("env, needle", [
    ({"MEP_GATEWAY_PORT": "eighty"}, "MEP_GATEWAY_PORT='eighty'"),
    ({"MEP_GATEWAY_PORT": "0"}, "MEP_GATEWAY_PORT='0'"),
    ({"MEP_GATEWAY_NAMESPACES": "Bad_NS"}, "MEP_GATEWAY_NAMESPACES"),
    ({"MEP_GATEWAY_HOLD_TIMEOUT_SECONDS": "-1"}, "MEP_GATEWAY_HOLD_TIMEOUT_SECONDS"),
    ({"MEP_GATEWAY_MAX_ATTEMPTS": "0"}, "MEP_GATEWAY_MAX_ATTEMPTS"),
    ({"MEP_GATEWAY_LOG_FORMAT": "xml"}, "MEP_GATEWAY_LOG_FORMAT"),
    ({"MEP_GATEWAY_POD_NAME": "Not A Pod"}, "MEP_GATEWAY_POD_NAME"),
    ({"MEP_GATEWAY_HOLD_TIMEOUT": "5"}, "unknown setting MEP_GATEWAY_HOLD_TIMEOUT"),
])
def test_bad_values_name_the_variable_in_one_line(env, needle):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_console_script_exits_2_with_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEP_GATEWAY_")}
    env["MEP_GATEWAY_PORT"] = "eighty"
    proc = subprocess.run([str(BIN)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("modelendpoint-gateway: invalid MEP_GATEWAY_PORT='eighty'")


def test_console_script_without_kubernetes_configuration_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEP_GATEWAY_", "KUBERNETES_"))}
    env.update(KUBECONFIG=str(tmp_path / "missing"), HOME=str(tmp_path))
    proc = subprocess.run([str(BIN)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("modelendpoint-gateway: no Kubernetes configuration")
    assert proc.stderr.strip().count("\n") == 0


def test_version_and_help():
    out = subprocess.run([str(BIN), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("modelendpoint-gateway 0.1.0")
    assert "MEP_GATEWAY_NAMESPACES" in subprocess.run([str(BIN), "--help"], capture_output=True, text=True,
                                                        timeout=60).stdout
