"""The worker rule (variables -> vLLM options), against vLLM's real parser; no engine.

The parser is vLLM's own (``engine.build_parser``: ``make_arg_parser`` over
``FlexibleArgumentParser``), built once for the module (vLLM's import takes
~10 s). Each test checks what reaches vLLM's parsed ``Namespace``, the thing
``AsyncEngineArgs.from_cli_args`` turns into the engine's configuration.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelendpoint_runtime.engine_env import ALIASES, EXCLUDED, derive_options, excluded, var_name
from modelendpoint_runtime.settings import ACCEPTED, ConfigError, load_settings

BASE = {"MODEL_NAME": "org/model"}


@pytest.fixture(scope="module")
def parser():
    from modelendpoint_runtime.engine import build_parser

    return build_parser()


def parse(parser, **env):
    from modelendpoint_runtime.engine import engine_args

    environ = BASE | env
    return engine_args(environ, load_settings(environ), parser)


def error(parser, **env) -> str:
    with pytest.raises(ConfigError) as err:
        parse(parser, **env)
    line = str(err.value)
    assert "\n" not in line
    return line


# issue 10's done-when: a typed engine field reaches vLLM's parsed arguments --------


def test_enable_prefix_caching_false_and_max_num_batched_tokens_reach_vllms_parsed_arguments(parser):
    args = parse(parser).args
    assert args.enable_prefix_caching is None and args.max_num_batched_tokens is None  # vLLM's defaults
    parsed = parse(parser, ENABLE_PREFIX_CACHING="false", MAX_NUM_BATCHED_TOKENS="4096")
    assert parsed.args.enable_prefix_caching is False
    assert parsed.args.max_num_batched_tokens == 4096
    assert parse(parser, ENABLE_PREFIX_CACHING="true").args.enable_prefix_caching is True
    # ...and the start-up log line says so, naming the variable.
    assert parsed.log_fields()["enable_prefix_caching"] == {"value": False, "from": "ENABLE_PREFIX_CACHING"}
    assert parsed.log_fields()["max_num_batched_tokens"] == {"value": 4096, "from": "MAX_NUM_BATCHED_TOKENS"}


def test_worker_vllm_variables_reach_vllm(parser):
    # worker-vllm's documented examples, with no table of ours behind them.
    env = {
        "MAX_MODEL_LEN": "4096", "TENSOR_PARALLEL_SIZE": "2", "GPU_MEMORY_UTILIZATION": "0.85", "DTYPE": "bfloat16",
        "QUANTIZATION": "awq", "KV_CACHE_DTYPE": "fp8", "ENFORCE_EAGER": "true", "ENABLE_LORA": "1", "MAX_LORAS": "2",
        "SPECULATIVE_CONFIG": '{"model": "org/draft", "num_speculative_tokens": 3}', "TOOL_CALL_PARSER": "hermes",
        "ENABLE_AUTO_TOOL_CHOICE": "true", "REASONING_PARSER": "deepseek_r1", "MAX_NUM_SEQS": "64",
        "TRUST_REMOTE_CODE": "TRUE", "SEED": "7", "LORA_MODULES": '[{"name": "a", "path": "/adapters/a"}]',
    }  # fmt: skip
    args = parse(parser, **env).args
    assert (args.max_model_len, args.tensor_parallel_size, args.gpu_memory_utilization) == (4096, 2, 0.85)
    assert (args.dtype, args.quantization, args.kv_cache_dtype) == ("bfloat16", "awq", "fp8")
    assert args.enforce_eager is True and args.enable_lora is True and args.max_loras == 2
    assert args.speculative_config == {"model": "org/draft", "num_speculative_tokens": 3}
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser) == (
        "hermes",
        True,
        "deepseek_r1",
    )
    assert (args.max_num_seqs, args.trust_remote_code, args.seed) == (64, True, 7)
    assert [(m.name, m.path) for m in args.lora_modules] == [("a", "/adapters/a")]


BOOLEANS = [("true", True), ("1", True), ("Yes", True), ("ON", True),
            ("false", False), ("0", False), ("no", False), ("Off", False)]  # fmt: skip


@pytest.mark.parametrize(("value", "expected"), BOOLEANS)
def test_booleans(parser, value, expected):
    args = parse(parser, ENFORCE_EAGER=value, DISABLE_LOG_STATS=value).args
    assert args.enforce_eager is expected  # a --x/--no-x pair
    assert args.disable_log_stats is expected  # a plain store_true: false passes nothing


def test_a_bad_boolean_is_one_line_naming_the_variable(parser):
    assert error(parser, ENABLE_PREFIX_CACHING="maybe") == (
        "invalid ENABLE_PREFIX_CACHING='maybe'; accepted values: true or false (also 1/0, yes/no, on/off)"
    )


def test_options_with_several_values_take_a_json_array_or_shell_words(parser):
    assert parse(parser, IGNORE_PATTERNS="a b 'c d'").args.ignore_patterns == ["a", "b", "c d"]
    assert parse(parser, IGNORE_PATTERNS='["x y", "z"]').args.ignore_patterns == ["x y", "z"]
    assert parse(parser, CUDAGRAPH_CAPTURE_SIZES="[1, 2, 4]").args.cudagraph_capture_sizes == [1, 2, 4]
    one = parse(parser, LORA_MODULES='{"name": "b", "path": "/p"}').args.lora_modules  # one JSON object: one item
    assert [(m.name, m.path) for m in one] == [("b", "/p")]
    assert error(parser, IGNORE_PATTERNS="[1, ").startswith("invalid IGNORE_PATTERNS: not a JSON array")


def test_worker_vllm_aliases(parser, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    args = parse(parser, TOKENIZER_NAME="org/tok", MODEL_REVISION="v2", CUSTOM_CHAT_TEMPLATE=str(template),
                 OPENAI_SERVED_MODEL_NAME_OVERRIDE="served").args  # fmt: skip
    assert (args.model, args.served_model_name, args.tokenizer, args.revision) == (
        "org/model",
        ["served"],
        "org/tok",
        "v2",
    )
    assert args.chat_template == str(template)
    assert set(ALIASES) == {"MODEL_NAME", "OPENAI_SERVED_MODEL_NAME_OVERRIDE", "TOKENIZER_NAME", "MODEL_REVISION",
                            "CUSTOM_CHAT_TEMPLATE"}  # fmt: skip


def test_a_name_and_its_alias_together_are_a_bad_setting(parser):
    assert error(parser, TOKENIZER="a", TOKENIZER_NAME="b").startswith("invalid TOKENIZER_NAME: TOKENIZER sets vLLM's")
    assert "set only one of" in error(parser, GPU_MEMORY_UTILIZATION="0.5", DEVICE_MEMORY_UTILIZATION="0.5")


def test_empty_values_mean_unset(parser):
    args = parse(parser, MAX_MODEL_LEN="", ENFORCE_EAGER=" ").args
    assert args.max_model_len is None and args.enforce_eager is False


def test_vllm_extra_args_come_last_and_win(parser):
    args = parse(parser, MAX_NUM_SEQS="8", VLLM_EXTRA_ARGS="--max-num-seqs 16 --seed 3").args
    assert (args.max_num_seqs, args.seed) == (16, 3)
    parsed = parse(parser, MAX_NUM_SEQS="8", VLLM_EXTRA_ARGS="--max-num-seqs 16")
    assert parsed.sources["max_num_seqs"] == "VLLM_EXTRA_ARGS"


@pytest.mark.parametrize(
    ("env", "start"),
    [
        ({"MAX_MODEL_LEN": "x"}, "invalid MAX_MODEL_LEN: argument --max-model-len: invalid"),
        ({"DTYPE": "float8"}, "invalid DTYPE: argument --dtype: invalid choice: 'float8'"),
        ({"KV_CACHE_DTYPE": "bogus", "MAX_NUM_SEQS": "4"}, "invalid KV_CACHE_DTYPE: argument --kv-cache-dtype"),
        ({"TENSOR_PARALLEL_SIZE": "two"}, "invalid TENSOR_PARALLEL_SIZE: argument --tensor-parallel-size"),
        ({"VLLM_EXTRA_ARGS": "--max-num-seqs foo"}, "invalid VLLM_EXTRA_ARGS: argument --max-num-seqs"),
        ({"VLLM_EXTRA_ARGS": "--no-such-flag"}, "invalid VLLM_EXTRA_ARGS: unrecognized arguments: --no-such-flag"),
        (
            {"ENABLE_AUTO_TOOL_CHOICE": "true"},
            "invalid ENABLE_AUTO_TOOL_CHOICE: Error: --enable-auto-tool-choice requires",
        ),
        ({"VLLM_EXTRA_ARGS": "--enable-auto-tool-choice"}, "invalid VLLM_EXTRA_ARGS: Error: --enable-auto-tool-choice"),
        (
            {"CUSTOM_CHAT_TEMPLATE": "/no/such/template.jinja"},
            "invalid CUSTOM_CHAT_TEMPLATE: The supplied chat template",
        ),
    ],
)
def test_vllm_validates_and_the_error_names_the_variable_set(parser, env, start):
    assert error(parser, **env).startswith(start)


# what stays off the command line -----------------------------------------------


def test_excluded_and_own_variables_never_reach_vllm(parser):
    env = {"HOST": "0.0.0.0", "PORT": "8001", "API_KEY": "sk-secret", "LOG_LEVEL": "debug", "HF_TOKEN": "hf_secret",
           "MODEL": "other/model", "CONFIG": "x.yaml", "HELP": "1", "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "3",
           # Kubernetes service links of Services named grpc and master:
           "GRPC_PORT": "tcp://10.0.0.5:50051", "MASTER_PORT": "tcp://10.0.0.6:29501",
           "DATA_PARALLEL_RPC_PORT": "tcp://10.0.0.7:1"}  # fmt: skip
    parsed = parse(parser, **env)
    args = parsed.args
    assert (args.host, args.port, args.api_key, args.hf_token, args.model) == (None, 8000, None, None, "org/model")
    assert (args.master_addr, args.node_rank, args.grpc_port, args.master_port) == ("127.0.0.1", 0, None, 29501)
    assert args.config is None and parsed.sources == {}


def test_the_runtimes_own_variables_that_vllm_also_has_are_exactly_these(parser):
    # A new vLLM option named like one of our variables would show up here: ours
    # wins (it never reaches vLLM), and this list and docs/runtime.md need it.
    options = {var_name(f) for a in parser._actions for f in a.option_strings if f.startswith("--")}
    assert options & set(ACCEPTED) == {"HOST", "PORT", "API_KEY", "LOG_LEVEL"}
    assert not set(derive_options(parser, ACCEPTED)) & (set(ACCEPTED) - set(ALIASES))


def test_platform_variable_names_that_match_vllm_options_are_excluded(parser):
    # Names images, Kubernetes and torch.distributed set on their own: a match
    # with a vLLM option must be on the exclusion list, or it would reach vLLM.
    platform = {"HOME", "PATH", "HOSTNAME", "USER", "LANG", "TZ", "TERM", "PWD", "SHELL", "DEBUG", "HTTP_PROXY",
                "HTTPS_PROXY", "NO_PROXY", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HF_HOME",
                "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_CACHE", "MODEL", "CONFIG", "HELP", "RANK", "WORLD_SIZE",
                "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "KUBERNETES_SERVICE_HOST",
                "KUBERNETES_SERVICE_PORT", "KUBERNETES_PORT", "GRPC_PORT", "POD_NAME", "POD_IP",
                "NAMESPACE"}  # fmt: skip
    options = set(derive_options(parser, ACCEPTED))
    assert not platform & options
    everything = {var_name(f) for a in parser._actions for f in a.option_strings if f.startswith("--")}
    assert platform & everything == set(EXCLUDED) | {"MASTER_PORT", "GRPC_PORT"}
    assert all(excluded(v) for v in everything if v.endswith("_PORT"))


# refused: options the runtime owns or does not implement ------------------------


@pytest.mark.parametrize(
    ("var", "value", "why"),
    [
        ("SERVED_MODEL_NAME", "x", "use OPENAI_SERVED_MODEL_NAME_OVERRIDE instead"),
        ("RESPONSE_ROLE", "bot", "use OPENAI_RESPONSE_ROLE instead"),
        ("SSL_CERTFILE", "/tls/cert.pem", "vLLM's own HTTP server"),
        ("UDS", "/run/s.sock", "vLLM's own HTTP server"),
        ("ROOT_PATH", "/prefix", "vLLM's own HTTP server"),
        ("ALLOWED_ORIGINS", '["*"]', "vLLM's own HTTP server"),
        ("MIDDLEWARE", "my.middleware", "vLLM's own HTTP server"),
        ("HEADLESS", "true", "vLLM's launcher"),
        ("API_SERVER_COUNT", "2", "vLLM's launcher"),
        ("TOKENS_ONLY", "true", "routes the runtime does not serve"),
    ],
)
def test_refused_variables_are_one_line(parser, var, value, why):
    line = error(parser, **{var: value})
    assert line.startswith(f"invalid {var}: vLLM's --") and why in line


def test_refused_booleans_set_to_false_ask_for_nothing(parser):
    parse(parser, HEADLESS="false", ALLOW_CREDENTIALS="0", DISABLE_FASTAPI_DOCS="no")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("--model x", "--model"),
        ("--served-model-name=y", "--served-model-name"),
        ("--served_model_name y", "--served-model-name"),
        ("--api-key k", "--api-key"),
        ("--api-key.x 1", "--api-key"),
        ("--port 1", "--port"),
        ("--host 0.0.0.0", "--host"),
        ("--response-role r", "--response-role"),
        # Issue 13.5: abbreviations and the options vLLM's parser accepted past the old exact-token check.
        ("--served-model x", "--served-model"),
        ("--config f.yaml", "--config"),
        ("--config=f.yaml", "--config"),
        ("--uds /run/s.sock", "--uds"),
        ("--root-path /p", "--root-path"),
        ("-asc 2", "--api-server-count"),
        ("-as 2", "--api-server-count"),
        ("--ssl-certfile c.pem", "--ssl-certfile"),
        ("--no-allow-credentials", "--allow-credentials"),
        ("--middleware m", "--middleware"),
        ("--help", "--help"),
        ("org/other-model", "positional"),
    ],
)
def test_vllm_extra_args_cannot_set_what_the_runtime_owns(parser, extra, named):
    line = error(parser, VLLM_EXTRA_ARGS=extra)
    assert line.startswith("invalid VLLM_EXTRA_ARGS: ") and named in line, line


def test_a_refused_option_in_vllm_extra_args_stops_the_process_with_one_line():
    # Through main: exit 2 before the model loads (after vLLM's import, ~10 s).
    from localcluster import free_port

    env = {"PATH": "/usr/bin:/bin", "MODEL_NAME": "/no/such/model", "HOST": "127.0.0.1", "PORT": str(free_port()),
           "VLLM_EXTRA_ARGS": "--served-model other"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "modelendpoint_runtime"], env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("modelendpoint-runtime:")]
    assert lines == ["modelendpoint-runtime: invalid VLLM_EXTRA_ARGS: unrecognized arguments: --served-model"]
    assert "Traceback" not in proc.stderr


# generation defaults merge from the variable and from VLLM_EXTRA_ARGS -------------


def test_override_generation_config_merges_from_the_variable_and_vllm_extra_args(parser):
    assert parse(parser, LIMIT_MAX_TOKENS="300").args.override_generation_config == {
        "temperature": 0.7, "max_new_tokens": 300}  # fmt: skip
    extra = """--override-generation-config '{"temperature": 0.3, "top_p": 0.9}'"""
    assert parse(parser, LIMIT_MAX_TOKENS="300", VLLM_EXTRA_ARGS=extra).args.override_generation_config == {
        "temperature": 0.3, "top_p": 0.9, "max_new_tokens": 300}  # fmt: skip
    dotted = parse(parser, VLLM_EXTRA_ARGS="--override-generation-config.max_new_tokens 50")
    assert dotted.args.override_generation_config == {"temperature": 0.7, "max_new_tokens": 50}
    variable = json.dumps({"temperature": 0.2, "top_k": 3})
    both = parse(parser, LIMIT_MAX_TOKENS="300", OVERRIDE_GENERATION_CONFIG=variable,
                 VLLM_EXTRA_ARGS="--override-generation-config.top_p 0.5")  # fmt: skip
    assert both.args.override_generation_config == {"temperature": 0.2, "top_k": 3, "top_p": 0.5, "max_new_tokens": 300}
    capped = parse(parser, LIMIT_MAX_TOKENS="300", OVERRIDE_GENERATION_CONFIG='{"max_new_tokens": 9999}')
    assert capped.args.override_generation_config["max_new_tokens"] == 300


def test_omitted_sampling_parameters_default_to_the_guides_tables_not_the_models_file(parser):
    # vLLM's "auto" would take top_p, top_k, penalties ... from generation_config.json.
    assert parse(parser).args.generation_config == "vllm"
    assert parse(parser, GENERATION_CONFIG="auto").args.generation_config == "auto"
    assert parse(parser, VLLM_EXTRA_ARGS="--generation-config auto").args.generation_config == "auto"
    assert parse(parser, GENERATION_CONFIG="/models/gen").args.generation_config == "/models/gen"


# errors at model load, and the start-up log line -----------------------------------


def test_engine_config_errors_name_the_variable_that_set_the_field(parser):
    msg = "User-specified max_model_len (999999) is greater than the derived max_model_len (8192)."
    assert str(parse(parser, MAX_MODEL_LEN="999999").config_error(msg)) == f"invalid MAX_MODEL_LEN: {msg}"
    assert str(parse(parser, VLLM_EXTRA_ARGS="--max-model-len 999999").config_error(msg)).startswith(
        "invalid VLLM_EXTRA_ARGS: "
    )
    assert str(parse(parser).config_error(msg)).startswith(
        "invalid engine configuration (MODEL_NAME or an engine variable)"
    )
    err = parse(parser, QUANTIZATION="foo").config_error("Unknown quantization method: foo\nmore")
    assert str(err) == "invalid QUANTIZATION: Unknown quantization method: foo more"


def test_the_start_up_log_line_redacts_secrets(parser):
    fields = parse(parser, MAX_NUM_BATCHED_TOKENS="2048", VLLM_EXTRA_ARGS="--hf-token hf_secret").log_fields()
    assert fields["hf_token"] == {"value": "<redacted>", "from": "VLLM_EXTRA_ARGS"}
    assert fields["max_num_batched_tokens"]["value"] == 2048


def test_plain_parse_engine_args_still_builds_vllms_own_app_arguments():
    # hack/microbench_runtime.py builds vLLM's own app from a plain argv.
    from modelendpoint_runtime.engine import parse_engine_args

    args = parse_engine_args(["--model", "/m", "--served-model-name", "s", "--api-key", "k"])
    assert (args.model, args.served_model_name, args.api_key) == ("/m", ["s"], ["k"])
