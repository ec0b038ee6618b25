"""The runtime's own settings and their one-line errors; the exit before vLLM is imported (no engine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelendpoint_runtime.settings import ACCEPTED, ConfigError, RuntimeSettings, load_settings, parse_keys

BASE = {"MODEL_NAME": "org/model"}


def test_defaults():
    s = load_settings(BASE)
    assert s.served_model_name == "org/model"
    assert s.openai_response_role == "assistant"
    assert s.raw_openai_output is True
    assert s.api_keys == ()
    assert (s.host, s.port) == ("0.0.0.0", 8000)
    assert s.endpoint_id is None


def test_override_and_role_and_keys():
    s = load_settings(
        BASE
        | {
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "my-model",
            "OPENAI_RESPONSE_ROLE": "bot",
            "API_KEY": "old, new",
            "RAW_OPENAI_OUTPUT": "0",
        }
    )
    assert s.served_model_name == "my-model"
    assert s.openai_response_role == "bot"
    assert s.api_keys == ("old", "new")
    assert s.raw_openai_output is False


def test_empty_optional_values_mean_unset():
    s = load_settings(BASE | {"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "", "ENDPOINT_ID": " ", "METRICS_PORT": ""})
    assert s.served_model_name == "org/model"
    assert s.endpoint_id is None and s.metrics_port is None


@pytest.mark.parametrize("value", ["", " ", "\n", " \t "])
def test_set_but_empty_api_key_is_a_bad_setting_not_no_auth(value):
    # Issue 13.1: an empty Secret value (or a newline) used to mean "no auth".
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | {"API_KEY": value})
    line = str(err.value)
    assert line == f"invalid API_KEY=<redacted>: set but empty; accepted values: {ACCEPTED['API_KEY']}"


@pytest.mark.parametrize("value", ["a,,b", "a,", ",a", "a, ,b"])
def test_an_empty_entry_in_the_key_list_is_a_bad_setting(value):
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | {"API_KEY": value})
    assert str(err.value).startswith("invalid API_KEY=<redacted>: an empty key in the list;")


def test_unset_api_key_is_no_auth():
    s = load_settings(BASE)
    assert s.api_keys == () and not s.auth_configured


def test_parse_keys():
    assert parse_keys("k1") == ("k1",)
    assert parse_keys(" k1 , k2 ") == ("k1", "k2")
    assert parse_keys("k1\nk2\n") == ("k1", "k2")  # a Secret file's final newline is fine
    assert parse_keys("k1\r\nk2") == ("k1", "k2")
    for bad in ("", "\n", "k1,,k2", "k1\n\nk2", ","):
        with pytest.raises(ValueError):
            parse_keys(bad)


def test_api_key_and_api_key_file_together_are_a_bad_setting():
    with pytest.raises(ConfigError, match="^invalid API_KEY_FILE='/k': API_KEY is set too"):
        load_settings(BASE | {"API_KEY": "k", "API_KEY_FILE": "/k"})
    with pytest.raises(ConfigError, match="^invalid API_KEY_FILE='': set but empty"):
        load_settings(BASE | {"API_KEY_FILE": ""})


def test_metrics_port_must_differ_from_port():
    assert load_settings(BASE | {"METRICS_PORT": "9400"}).metrics_port == 9400
    with pytest.raises(ConfigError, match="^invalid METRICS_PORT='8000': equals PORT;"):
        load_settings(BASE | {"METRICS_PORT": "8000"})


def test_new_limits_and_timeouts_have_sane_defaults():
    s = load_settings(BASE)
    assert (s.limit_prompts, s.limit_messages, s.limit_stop) == (64, 2048, 16)
    assert (s.max_header_bytes, s.max_connections) == (32768, 1024)
    assert (s.read_timeout_seconds, s.write_timeout_seconds, s.api_key_file_poll_seconds) == (30, 30, 5)


def test_vllm_options_are_not_runtime_settings():
    # Issue 10: no engine fields in our settings; vLLM's options follow the worker rule.
    assert not {"max_model_len", "dtype", "tensor_parallel_size", "enforce_eager"} & set(RuntimeSettings.model_fields)
    s = load_settings(BASE | {"MAX_MODEL_LEN": "nonsense", "DTYPE": "nonsense"})  # vLLM judges those, later
    assert s.model_name == "org/model"


def test_unrelated_environment_is_ignored():
    s = load_settings(BASE | {"PATH": "/bin", "HOME": "/root", "SOMETHING_ELSE": "x"})
    assert s.model_name == "org/model"


def test_vllm_extra_args_shell_syntax_error():
    with pytest.raises(ConfigError, match="^invalid VLLM_EXTRA_ARGS="):
        load_settings(BASE | {"VLLM_EXTRA_ARGS": "--seed 'unclosed"})


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("METRICS_PORT", "0"),
        ("RAW_OPENAI_OUTPUT", "2"),
        ("LIMIT_PROMPTS", "0"),
        ("LIMIT_MESSAGES", "-1"),
        ("LIMIT_STOP", "-1"),
        ("MAX_HEADER_BYTES", "100"),
        ("MAX_CONNECTIONS", "0"),
        ("READ_TIMEOUT_SECONDS", "0"),
        ("WRITE_TIMEOUT_SECONDS", "never"),
        ("API_KEY_FILE_POLL_SECONDS", "0"),
        ("LIMIT_N", "0"),
        ("MAX_CONCURRENT_REQUESTS", "none"),
        ("DRAIN_TIMEOUT_SECONDS", "-3"),
        ("LOG_LEVEL", "verbose"),
        ("ENDPOINT_ID", "a/b"),
        ("OPENAI_RESPONSE_ROLE", ""),
    ],
)
def test_bad_setting_is_one_line_naming_variable_and_accepted_values(var, value):
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | {var: value})
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"invalid {var}=")
    assert ACCEPTED[var] in line


def test_missing_model_name():
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert str(err.value) == f"MODEL_NAME is not set; accepted values: {ACCEPTED['MODEL_NAME']}"


def test_bad_api_key_list_is_redacted():
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | {"API_KEY": "secret-one,,secret-two"})
    assert "secret" not in str(err.value)
    assert str(err.value).startswith("invalid API_KEY=<redacted>")


def test_every_setting_field_is_documented_in_accepted():
    assert {name.upper() for name in RuntimeSettings.model_fields} == set(ACCEPTED)


def _run_main(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelendpoint_runtime"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_process_exits_with_one_line_and_no_traceback():
    # Settings are validated before vLLM is imported: this is fast.
    proc = _run_main({"MODEL_NAME": "m", "PORT": "eighty"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"modelendpoint-runtime: invalid PORT='eighty'; accepted values: {ACCEPTED['PORT']}"
    ]


# generation defaults: the guide's temperature, the LIMIT_MAX_TOKENS default -----


def test_generation_overrides_carry_the_guide_temperature_and_the_max_tokens_cap():
    from modelendpoint_runtime.settings import generation_overrides

    s = load_settings({**BASE, "LIMIT_MAX_TOKENS": "1024"})
    # max_new_tokens is vLLM's default max_tokens for a request that omits it
    # (and its server-wide ceiling): without it the cap would not hold.
    assert generation_overrides(s) == {"temperature": 0.7, "max_new_tokens": 1024}
    # The user's values win, except that max_new_tokens cannot lift the cap.
    merged = generation_overrides(s, {"temperature": 0.2, "top_k": 5})
    assert merged == {"temperature": 0.2, "top_k": 5, "max_new_tokens": 1024}
    assert generation_overrides(s, {"max_new_tokens": 64})["max_new_tokens"] == 64
    assert generation_overrides(s, {"max_new_tokens": 99999})["max_new_tokens"] == 1024


# listening socket: bound before anything heavy ----------------------------------


def test_busy_port_exits_2_with_one_line_naming_port_before_loading_anything():
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        # The console script itself (the image's entrypoint).
        script = str(Path(sys.executable).with_name("modelendpoint-runtime"))
        proc = subprocess.run([script], env={"PATH": "/usr/bin:/bin", "MODEL_NAME": "/no/such/model",
                                             "HOST": "127.0.0.1", "PORT": str(port)},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        busy.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"modelendpoint-runtime: invalid PORT={port}: the port is already in use on 127.0.0.1; "
        f"accepted values: a free port, {ACCEPTED['PORT']}"
    ]


@pytest.mark.parametrize("host", ["203.0.113.7", "no host"])
def test_bad_host_exits_2_with_one_line_naming_host(host):
    proc = _run_main({"MODEL_NAME": "m", "HOST": host, "PORT": "8000"})
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"modelendpoint-runtime: invalid HOST={host!r}") and "Traceback" not in proc.stderr


def _busy_port():
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    return busy, busy.getsockname()[1]


def test_busy_metrics_port_exits_2_with_one_line_naming_metrics_port():
    busy, port = _busy_port()
    try:
        from localcluster import free_port

        other = free_port()
        proc = _run_main({"MODEL_NAME": "m", "HOST": "127.0.0.1", "PORT": str(other), "METRICS_PORT": str(port)})
    finally:
        busy.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"modelendpoint-runtime: invalid METRICS_PORT={port}: the port is already in use on 127.0.0.1; "
        f"accepted values: a free port, {ACCEPTED['PORT']}"
    ]


@pytest.mark.parametrize("value", ["", "\n"])
def test_process_with_set_but_empty_api_key_exits_2_naming_api_key(value):
    # Issue 13.1: the pod of a ModelEndpoint whose key Secret is empty must not serve anonymously.
    proc = _run_main({"MODEL_NAME": "m", "HOST": "127.0.0.1", "PORT": "8000", "API_KEY": value})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"modelendpoint-runtime: invalid API_KEY=<redacted>: set but empty; accepted values: {ACCEPTED['API_KEY']}"
    ]


@pytest.mark.parametrize(("content", "reason"), [("", "the file is empty"), ("\n", "the file is empty"),
                                                 ("sk-1,,sk-2", "the file holds an empty key in the list"),
                                                 (None, "cannot read it (No such file or directory)")])  # fmt: skip
def test_process_with_an_unusable_key_file_exits_2_naming_api_key_file(tmp_path, content, reason):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    proc = _run_main({"MODEL_NAME": "m", "HOST": "127.0.0.1", "PORT": "8000", "API_KEY_FILE": str(path)})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"modelendpoint-runtime: invalid API_KEY_FILE={str(path)!r}: {reason}; "
        f"accepted values: {ACCEPTED['API_KEY_FILE']}"
    ]
    assert "sk-1" not in proc.stderr
