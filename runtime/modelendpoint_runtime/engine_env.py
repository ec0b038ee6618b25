"""The guide's worker rule: environment variables become vLLM ``serve`` options, derived from vLLM's parser.

No table of vLLM options lives here. At start-up the runtime builds vLLM's
own OpenAI-server parser (``make_arg_parser``, see ``engine.build_parser``)
and :func:`derive_options` reads its actions:

* every option ``--foo-bar`` is settable as the variable ``FOO_BAR`` (each
  long spelling of an option counts: ``--device-memory-utilization`` is
  ``DEVICE_MEMORY_UTILIZATION`` as well as ``GPU_MEMORY_UTILIZATION``);
* an option that takes no value (``store_true``, or a ``--foo``/``--no-foo``
  pair) takes a boolean: ``true``/``false``, ``1``/``0``, ``yes``/``no``,
  ``on``/``off``, in any case. True passes ``--foo``; false passes
  ``--no-foo`` where vLLM has that form, else nothing;
* an option that takes one value gets it verbatim (``--foo=<value>``); vLLM
  converts and checks it;
* an option that takes several values (``nargs``) gets the items of a JSON
  array (``'["a", {"b": 1}]'``: strings as they are, anything else as JSON),
  or else the value's shell words (``"a b 'c d'"``); a value that is one
  JSON object is one item;
* worker-vllm's historical names are aliases (:data:`ALIASES`);
* an empty value means "not set";
* ``VLLM_EXTRA_ARGS`` is parsed last, in vLLM's own syntax, and wins.

Kept off the command line (:func:`excluded`): the runtime's own variables,
and the few names that belong to the platform rather than to vLLM
(:data:`EXCLUDED`, plus every ``*_PORT``). Refused (a one-line error at
start): options the runtime owns or does not implement, computed by
``engine.refused_options`` from vLLM's own classes.

Everything here is pure: it takes the parser and the environment as
arguments, so it is unit-tested against vLLM's real parser.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .settings import ConfigError

# worker-vllm's historical variable names for options whose own names differ.
# MODEL_NAME and OPENAI_SERVED_MODEL_NAME_OVERRIDE are also read by the runtime
# itself (the served name, /models), which passes --model and
# --served-model-name from them: see ``owned_argv``.
ALIASES: dict[str, str] = {
    "MODEL_NAME": "--model",
    "OPENAI_SERVED_MODEL_NAME_OVERRIDE": "--served-model-name",
    "TOKENIZER_NAME": "--tokenizer",
    "MODEL_REVISION": "--revision",
    "CUSTOM_CHAT_TEMPLATE": "--chat-template",
}

# Variables that match a vLLM option but are never read as one, besides the
# runtime's own (HOST, PORT, API_KEY, LOG_LEVEL: see ``RuntimeSettings``):
EXCLUDED: dict[str, str] = {
    # A secret: huggingface_hub reads it from the environment itself.
    "HF_TOKEN": "read by huggingface_hub from the environment; never put on a command line",
    # Names generic enough that images and tools set them for other purposes.
    "MODEL": "generic; the model is MODEL_NAME",
    "CONFIG": "generic; vLLM's --config file is not supported",
    "HELP": "generic",
    # torch.distributed's rendezvous variables (torchrun, PyTorchJob set them).
    "MASTER_ADDR": "torch.distributed's variable",
    "NODE_RANK": "torch.distributed's variable",
}


def excluded(var: str) -> bool:
    """Whether a variable named like a vLLM option is kept off the command line.

    Besides :data:`EXCLUDED`: every ``*_PORT``. Kubernetes service links set
    ``<SERVICE>_PORT=tcp://...`` in every pod of a namespace (a Service named
    ``grpc`` or ``master`` would otherwise set vLLM's ``--grpc-port`` or
    ``--master-port``), and no vLLM port option is meaningful for the runtime,
    which serves HTTP itself on one node.
    """
    return var in EXCLUDED or var.endswith("_PORT")


Kind = Literal["bool", "value", "list", "append"]


@dataclass(frozen=True)
class Option:
    """One variable of the rule and the vLLM option it sets."""

    var: str
    flag: str  # the option string the variable is named after, e.g. --enable-prefix-caching
    dest: str  # vLLM's Namespace attribute
    kind: Kind
    negative: str | None = None  # --no-... for a BooleanOptionalAction pair


def var_name(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_").upper()


def _kind(action: argparse.Action) -> Kind:
    if action.nargs == 0:
        return "bool"
    if isinstance(action, argparse._AppendAction):
        return "append"
    if action.nargs in ("+", "*", argparse.REMAINDER) or (isinstance(action.nargs, int) and action.nargs > 1):
        return "list"
    return "value"


def long_flags(action: argparse.Action) -> list[str]:
    """An action's ``--`` spellings, without the ``--no-`` halves of a boolean pair."""
    flags = [s for s in action.option_strings if s.startswith("--")]
    if isinstance(action, argparse.BooleanOptionalAction):
        negatives = {"--no-" + s[2:] for s in flags if not s.startswith("--no-")}
        flags = [s for s in flags if s not in negatives]
    return flags


def _negative(action: argparse.Action, flag: str) -> str | None:
    if isinstance(action, argparse.BooleanOptionalAction):
        candidate = "--no-" + flag[2:]
        if candidate in action.option_strings:
            return candidate
    return None


def derive_options(parser: argparse.ArgumentParser, own: Iterable[str]) -> dict[str, Option]:
    """Every variable of the rule, from the parser's actions: ``{var: Option}``.

    ``own`` are the runtime's own variable names: never vLLM options, whatever
    vLLM adds later (a unit test pins today's overlap: HOST, PORT, API_KEY,
    LOG_LEVEL).
    """
    own = {v.upper() for v in own}
    by_flag: dict[str, argparse.Action] = {}
    options: dict[str, Option] = {}
    for action in parser._actions:
        if action.dest == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        for flag in long_flags(action):
            by_flag[flag] = action
            var = var_name(flag)
            if var in own or excluded(var):
                continue
            options[var] = Option(var, flag, action.dest, _kind(action), _negative(action, flag))
    for alias, flag in ALIASES.items():
        if alias in own:
            continue  # read by the runtime itself (owned_argv)
        action = by_flag[flag]
        options[alias] = Option(alias, flag, action.dest, _kind(action), _negative(action, flag))
    return options


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
BOOL_ACCEPTED = "true or false (also 1/0, yes/no, on/off)"
LIST_ACCEPTED = "a JSON array, or values separated by spaces (shell words)"


def shown(value: str, limit: int = 200) -> str:
    """A value as the one-line error quotes it (clipped: values can be long JSON)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def parse_bool(var: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"invalid {var}={shown(value)}; accepted values: {BOOL_ACCEPTED}")


def split_list(var: str, value: str) -> list[str]:
    """The items of a variable for an option with nargs (see the module docstring)."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"invalid {var}: not a JSON array ({exc}); accepted values: {LIST_ACCEPTED}") from None
        if not isinstance(items, list):
            raise ConfigError(f"invalid {var}: not a JSON array; accepted values: {LIST_ACCEPTED}")
        return [item if isinstance(item, str) else json.dumps(item) for item in items]
    if text.startswith("{"):
        return [text]  # one JSON object, e.g. one LoRA module
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"invalid {var}={shown(value)} ({exc}); accepted values: {LIST_ACCEPTED}") from None


def tokens(option: Option, value: str) -> list[str]:
    """The command-line tokens one set variable stands for."""
    if option.kind == "bool":
        if parse_bool(option.var, value):
            return [option.flag]
        return [option.negative] if option.negative else []
    if option.kind == "list":
        return [option.flag, *split_list(option.var, value)]
    if option.kind == "append":
        return [f"{option.flag}={item}" for item in split_list(option.var, value)]
    # --flag=value: a value starting with "-" is not taken for an option.
    return [f"{option.flag}={value}"]


@dataclass
class EnvArgs:
    """The command line the environment stands for, and where each option came from."""

    argv: list[str] = field(default_factory=list)
    by_var: dict[str, list[str]] = field(default_factory=dict)  # each set variable's own tokens
    values: dict[str, str] = field(default_factory=dict)  # each set variable's raw value
    sources: dict[str, str] = field(default_factory=dict)  # vLLM dest -> the variable that set it


def environment_argv(
    environ: Mapping[str, str], options: Mapping[str, Option], refused: Mapping[str, str]
) -> EnvArgs:
    """Translate the environment by the rule; ConfigError (one line) for a bad or refused variable.

    ``refused`` maps a vLLM dest to why the runtime refuses it. Variables are
    taken in name order (deterministic); two variables setting the same
    option (an alias and its name, or two spellings) are a bad setting.
    """
    out = EnvArgs()
    for var in sorted(set(environ) & set(options)):
        value = environ[var]
        if value.strip() == "":
            continue  # Kubernetes manifests often carry `VAR: ""` for "not set"
        option = options[var]
        if option.dest in refused and option.kind == "bool" and not parse_bool(var, value):
            continue  # asks for nothing: vLLM's default, which is how the runtime behaves
        if option.dest in refused:
            raise ConfigError(f"invalid {var}: vLLM's {option.flag} {refused[option.dest]}")
        other = out.sources.get(option.dest)
        if other is not None:
            raise ConfigError(
                f"invalid {var}: {other} sets vLLM's {option.flag} too; set only one of {other} and {var}"
            )
        argv = tokens(option, value)
        out.sources[option.dest] = var
        out.by_var[var] = argv
        out.values[var] = value
        out.argv += argv
    return out


def extra_tokens(raw: str) -> list[str]:
    """VLLM_EXTRA_ARGS in shell syntax; the options that must not even reach vLLM's parser refused.

    vLLM's parser reads a ``--config`` file and prints help and exits on
    ``--help`` while parsing, before anything else can look at the result.
    """
    try:
        extra = shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(
            f"invalid VLLM_EXTRA_ARGS ({exc}); accepted values: vLLM options in shell syntax, "
            "e.g. '--seed 0 --max-num-batched-tokens 4096'"
        ) from None
    for token in extra:
        name = token.split("=", 1)[0]
        if name in ("--config", "-h", "--help"):
            what = "reads another configuration file" if name == "--config" else "prints help and exits"
            raise ConfigError(f"invalid VLLM_EXTRA_ARGS: {name} {what}; the runtime does not take it")
    return extra


def mentioned_dests(message: str, flag_dests: Mapping[str, str]) -> list[str]:
    """The vLLM dests a message names, as options (``--max-model-len``), fields (``max_model_len``)
    or words (``chat template``), in the order they appear."""
    found: list[tuple[int, str]] = []
    for flag, dest in flag_dests.items():
        for needle in {flag, dest, dest.replace("_", " ")}:
            m = re.search(rf"(?<![A-Za-z0-9_-]){re.escape(needle)}(?![A-Za-z0-9_-])", message)
            if m:
                found.append((m.start(), dest))
    found.sort()
    seen: list[str] = []
    for _, dest in found:
        if dest not in seen:
            seen.append(dest)
    return seen


def attribute(message: str, sources: Mapping[str, str], flag_dests: Mapping[str, str]) -> str | None:
    """The variable behind the first option a vLLM message names that some variable set."""
    for dest in mentioned_dests(message, flag_dests):
        if dest in sources:
            return sources[dest]
    return None


def one_line(message: str, limit: int = 1500) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def engine_config_error(message: str, sources: Mapping[str, str], flag_dests: Mapping[str, str]) -> ConfigError:
    """vLLM's engine-config validation message (at model load) as one line naming the variable.

    Such messages name engine fields (``max_model_len``) or options; the
    first one a variable set decides, else the model itself is the suspect.
    """
    message = one_line(message)
    var = attribute(message, sources, flag_dests)
    if var is not None:
        return ConfigError(f"invalid {var}: {message}")
    return ConfigError(f"invalid engine configuration (MODEL_NAME or an engine variable): {message}")


def redact(dest: str, value: Any) -> Any:
    """Values the start-up log line must not show."""
    if set(dest.split("_")) & {"token", "key", "secret", "password", "credentials"}:
        return "<redacted>"
    return value
