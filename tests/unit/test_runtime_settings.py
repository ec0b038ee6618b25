"""Settings -> engine arguments, and one-line errors for bad settings (no engine, no I/O)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelendpoint_runtime.settings import (
    ACCEPTED,
    ConfigError,
    RuntimeSettings,
    engine_arg_error,
    engine_argv,
    load_settings,
)

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
    s = load_settings(BASE | {"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "", "API_KEY": " ", "QUANTIZATION": ""})
    assert s.served_model_name == "org/model"
    assert s.api_keys == ()
    assert s.quantization is None


def test_unrelated_environment_is_ignored():
    s = load_settings(BASE | {"PATH": "/bin", "HOME": "/root", "SOMETHING_ELSE": "x"})
    assert s.model_name == "org/model"


def test_engine_argv_named_variables():
    s = load_settings(
        BASE
        | {
            "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "served",
            "OPENAI_RESPONSE_ROLE": "bot",
            "MAX_MODEL_LEN": "4096",
            "DTYPE": "BFloat16",
            "TENSOR_PARALLEL_SIZE": "2",
            "GPU_MEMORY_UTILIZATION": "0.85",
            "QUANTIZATION": "awq",
            "ENFORCE_EAGER": "true",
            "TRUST_REMOTE_CODE": "1",
            "MAX_NUM_SEQS": "64",
        }
    )
    argv = engine_argv(s)

    def value(opt):
        return argv[argv.index(opt) + 1]

    assert value("--model") == "org/model"
    assert value("--served-model-name") == "served"
    assert value("--response-role") == "bot"
    assert value("--max-model-len") == "4096"
    assert value("--dtype") == "bfloat16"
    assert value("--tensor-parallel-size") == "2"
    assert value("--gpu-memory-utilization") == "0.85"
    assert value("--quantization") == "awq"
    assert value("--max-num-seqs") == "64"
    assert "--enforce-eager" in argv and "--trust-remote-code" in argv


def test_engine_argv_leaves_vllm_defaults_alone():
    argv = engine_argv(load_settings(BASE))
    for opt in ("--max-model-len", "--gpu-memory-utilization", "--quantization", "--enforce-eager",
                "--trust-remote-code", "--max-num-seqs"):  # fmt: skip
        assert opt not in argv


def test_engine_args_passes_any_other_argument_last():
    argv = engine_argv(load_settings(BASE | {"VLLM_EXTRA_ARGS": "--seed 7 --max-num-batched-tokens 2048 --kv-cache-dtype 'auto'"}))
    assert argv[-6:] == ["--seed", "7", "--max-num-batched-tokens", "2048", "--kv-cache-dtype", "auto"]


@pytest.mark.parametrize("option", ["--model x", "--served-model-name=y", "--served_model_name y", "--api-key k", "--port 1"])
def test_engine_args_cannot_override_runtime_owned_options(option):
    with pytest.raises(ConfigError) as err:
        load_settings(BASE | {"VLLM_EXTRA_ARGS": option})
    assert str(err.value).startswith("invalid VLLM_EXTRA_ARGS")
    assert "\n" not in str(err.value)


def test_engine_args_shell_syntax_error():
    with pytest.raises(ConfigError, match="^invalid VLLM_EXTRA_ARGS"):
        load_settings(BASE | {"VLLM_EXTRA_ARGS": "--seed 'unclosed"})


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("MAX_MODEL_LEN", "-1"),
        ("DTYPE", "float8"),
        ("TENSOR_PARALLEL_SIZE", "0"),
        ("GPU_MEMORY_UTILIZATION", "1.5"),
        ("ENFORCE_EAGER", "maybe"),
        ("RAW_OPENAI_OUTPUT", "2"),
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


def test_engine_arg_error_names_the_variable_behind_an_option():
    err = engine_arg_error("argument --max-model-len: invalid int value: 'x'")
    assert str(err).startswith("invalid MAX_MODEL_LEN:")
    err = engine_arg_error("argument --max-num-seqs: invalid int value: 'foo'", engine_args="--max-num-seqs foo")
    assert str(err).startswith("invalid VLLM_EXTRA_ARGS:")
    err = engine_arg_error("unrecognized arguments: --no-such-flag")
    assert str(err) == "invalid VLLM_EXTRA_ARGS: unrecognized arguments: --no-such-flag"


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


def test_engine_config_error_names_the_variable():
    from modelendpoint_runtime.settings import engine_config_error

    msg = "User-specified max_model_len (999999) is greater than the derived max_model_len (8192)."
    assert str(engine_config_error(msg)) == f"invalid MAX_MODEL_LEN: {msg}"
    assert str(engine_config_error("Unknown quantization method: foo\nmore")).startswith("invalid QUANTIZATION:")
    assert str(engine_config_error("something else")).startswith("invalid engine configuration (MODEL_NAME or VLLM_EXTRA_ARGS)")


# generation defaults: the guide's temperature, the LIMIT_MAX_TOKENS default -----


def test_generation_overrides_carry_the_guide_temperature_and_the_max_tokens_cap():
    from modelendpoint_runtime.settings import generation_overrides

    s = load_settings({**BASE, "LIMIT_MAX_TOKENS": "1024"})
    # max_new_tokens is vLLM's default max_tokens for a request that omits it
    # (and its server-wide ceiling): without it the cap would not hold.
    assert generation_overrides(s) == {"temperature": 0.7, "max_new_tokens": 1024}
    # The user's values win, except that max_new_tokens cannot lift the cap.
    assert generation_overrides(s, {"temperature": 0.2, "top_k": 5}) == {"temperature": 0.2, "top_k": 5, "max_new_tokens": 1024}
    assert generation_overrides(s, {"max_new_tokens": 64})["max_new_tokens"] == 64
    assert generation_overrides(s, {"max_new_tokens": 99999})["max_new_tokens"] == 1024


def test_parse_engine_args_merges_generation_defaults_with_vllm_extra_args():
    # Through vLLM's own parser: the user's --override-generation-config (JSON
    # or dotted syntax) is merged, the user's value winning.
    from modelendpoint_runtime.engine import parse_engine_args

    s = load_settings({**BASE, "LIMIT_MAX_TOKENS": "300"})
    args = parse_engine_args(engine_argv(s), "", s)
    assert args.override_generation_config == {"temperature": 0.7, "max_new_tokens": 300}
    extra = """--override-generation-config '{"temperature": 0.3, "top_p": 0.9}'"""
    s = load_settings({**BASE, "LIMIT_MAX_TOKENS": "300", "VLLM_EXTRA_ARGS": extra})
    args = parse_engine_args(engine_argv(s), extra, s)
    assert args.override_generation_config == {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 300}
    extra = "--override-generation-config.max_new_tokens 50"
    s = load_settings({**BASE, "VLLM_EXTRA_ARGS": extra})
    args = parse_engine_args(engine_argv(s), extra, s)
    assert args.override_generation_config == {"temperature": 0.7, "max_new_tokens": 50}


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
