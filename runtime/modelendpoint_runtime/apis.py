"""The APIs the runtime serves, in one table, and the checks each needs before vLLM sees a request.

Every API is vLLM's own serving object (built by vLLM's ``init_app_state``,
found on ``Engine.state`` under :attr:`Api.state`); the runtime decides
whether a request reaches it, exactly as for the guide's two routes: the
body is read and checked whole (model name, shape, counts, caps) before it
takes an admission slot, weighted by the work it puts in the engine
(:func:`weight`).

Which APIs answer depends on the model vLLM loaded (``spec.task`` sets
RUNNER/CONVERT): vLLM leaves the serving object of an API the model does not
serve unset, and the route answers 400 ``unsupported_task`` saying what the
model is (:func:`describe_model`).

Pure functions over the raw JSON body (a dict), except :func:`validate`,
which builds vLLM's request model (pydantic) for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

from .errors import ANTHROPIC, OPENAI, APIError, invalid_request
from .limits import Limits, prompt_count

# What the serving object needs of the model (vLLM's supported tasks).
GENERATE = "generate"
POOLING = "pooling"
ANY = "any"


@dataclass(frozen=True)
class Api:
    name: str
    suffix: str  # the route under each prefix (/openai/v1, /v1, /v2/{endpoint_id}/openai/v1)
    state: str  # the attribute of vLLM's app state holding its serving object
    needs: str  # GENERATE, POOLING or ANY
    prompt_param: str  # the request field holding the input (named by context-length errors, logged by LOG_PROMPTS)
    dialect: str = OPENAI  # the error shape
    model_required: bool = True
    streams: bool = False  # takes "stream": true
    events: bool = False  # streams typed server-sent events (event: + data:), never NDJSON

    @property
    def title(self) -> str:
        return f"POST {self.suffix}"


APIS: dict[str, Api] = {
    api.name: api
    for api in (
        Api("chat", "/chat/completions", "openai_serving_chat", GENERATE, "messages", streams=True),
        Api("completion", "/completions", "openai_serving_completion", GENERATE, "prompt", streams=True),
        Api("responses", "/responses", "openai_serving_responses", GENERATE, "input", streams=True, events=True),
        Api("messages", "/messages", "anthropic_serving_messages", GENERATE, "messages", ANTHROPIC, streams=True,
            events=True),  # fmt: skip
        Api("count_tokens", "/messages/count_tokens", "anthropic_serving_messages", GENERATE, "messages", ANTHROPIC),
        Api("embeddings", "/embeddings", "serving_embedding", POOLING, "input"),
        Api("score", "/score", "serving_scores", POOLING, "queries", model_required=False),
        Api("rerank", "/rerank", "serving_scores", POOLING, "documents", model_required=False),
        Api("classify", "/classify", "serving_classification", POOLING, "input", model_required=False),
        Api("tokenize", "/tokenize", "serving_tokenization", ANY, "prompt", model_required=False),
        Api("detokenize", "/detokenize", "serving_tokenization", ANY, "tokens", model_required=False),
    )
}
ANTHROPIC_SUFFIXES = tuple(api.suffix for api in APIS.values() if api.dialect == ANTHROPIC)


def dialect_of(path: str) -> str:
    """The error shape a path answers in: Anthropic's on the Messages routes, else OpenAI's."""
    return ANTHROPIC if path.endswith(ANTHROPIC_SUFFIXES) else OPENAI


def describe_model(tasks: Iterable[str]) -> str:
    """What a model is, from vLLM's supported tasks, for the 400 of a route it does not serve."""
    tasks = set(tasks)
    if "generate" in tasks:
        return "is a text-generation model"
    if "embed" in tasks or "token_embed" in tasks:
        return "is an embedding model (task: embed)"
    if "classify" in tasks or "token_classify" in tasks:
        return "is a classification model (task: classify)"
    return "is a pooling model"


# -- counts and weights ---------------------------------------------------------


def input_count(value: Any) -> int:
    """Inputs in an embeddings/classify ``input`` (or a score side): a string, a token list or a
    conversation is one; a list of strings or of token lists is one per item."""
    if isinstance(value, list):
        if not value:
            return 0
        if isinstance(value[0], dict):  # one chat conversation
            return 1
        return prompt_count(value)
    return 1


def _pooling_count(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], list):
        return len(messages)  # a batch of conversations
    if messages is not None:
        return 1
    return input_count(body.get("input"))


_SCORE_SIDES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


def score_sides(body: dict[str, Any]) -> tuple[str, str]:
    for first, second in _SCORE_SIDES:
        if first in body or second in body:
            return first, second
    return _SCORE_SIDES[0]


def weight(api: Api, body: dict[str, Any]) -> int:
    """The sequences a (validated) request puts in the engine: its admission weight.

    Pooling requests run one engine sequence per input (per pair for
    ``/score``, per document for ``/rerank``); everything else here is one.
    """
    if api.name in ("embeddings", "classify"):
        return max(1, _pooling_count(body))
    if api.name == "score":
        first, second = score_sides(body)
        return max(1, input_count(body.get(first)), input_count(body.get(second)))
    if api.name == "rerank":
        return max(1, input_count(body.get("documents")))
    return 1


# -- caps on the raw body ---------------------------------------------------------


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _max_tokens(body: dict[str, Any], name: str, limits: Limits) -> APIError | None:
    value = _int(body.get(name))
    if value is None:
        return None
    if value < 1:
        return invalid_request(f"{name} must be at least 1, got {value}.", name)
    if value > limits.max_tokens:
        return invalid_request(f"{name} must be at most {limits.max_tokens}, got {value}.", name)
    return None


def _count_cap(body: dict[str, Any], name: str, count: int, limit: int, what: str) -> APIError | None:
    if count > limit:
        return invalid_request(f"{name} may hold at most {limit} {what}, got {count}.", name)
    return None


def check_api_shape(api: Api, body: dict[str, Any], limits: Limits) -> APIError | None:
    """Counts and caps of the APIs beyond the guide's, on the raw body (before vLLM's models walk it).

    The same variables as for the guide's routes: LIMIT_MESSAGES (Responses
    ``input`` items, Messages ``messages``), LIMIT_STOP (``stop_sequences``),
    LIMIT_MAX_TOKENS (``max_output_tokens``, ``max_tokens``), LIMIT_PROMPTS
    (inputs of one pooling request: embeddings, classify, score sides, rerank
    documents).
    """
    name = api.name
    if name == "responses":
        items = body.get("input")
        if isinstance(items, list) and (err := _count_cap(body, "input", len(items), limits.messages, "items")):
            return err
        if body.get("background") is True:
            # vLLM would run it after the response is sent, outside admission and the drain.
            return invalid_request("background responses are not supported by this server.", "background")
        return _max_tokens(body, "max_output_tokens", limits)
    if name in ("messages", "count_tokens"):
        messages = body.get("messages")
        if isinstance(messages, list) and (err := _count_cap(body, "messages", len(messages), limits.messages,
                                                             "messages")):  # fmt: skip
            return err
        stop = body.get("stop_sequences")
        if isinstance(stop, list) and (err := _count_cap(body, "stop_sequences", len(stop), limits.stop, "sequences")):
            return err
        return _max_tokens(body, "max_tokens", limits) if name == "messages" else None
    if name in ("embeddings", "classify"):
        field = "messages" if "messages" in body else "input"
        return _count_cap(body, field, _pooling_count(body), limits.prompts, "inputs")
    if name == "score":
        for side in score_sides(body):
            if err := _count_cap(body, side, input_count(body.get(side)), limits.prompts, "inputs"):
                return err
        return None
    if name == "rerank":
        return _count_cap(body, "documents", input_count(body.get("documents")), limits.prompts, "documents")
    if name == "tokenize":
        messages = body.get("messages")
        if isinstance(messages, list):
            return _count_cap(body, "messages", len(messages), limits.messages, "messages")
    return None


# -- tools: strict unless the client says otherwise ----------------------------------


def _function_tools(api_name: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The dicts holding each function tool's ``strict``, in the API's own layout."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    found = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if api_name == "chat" and tool.get("type", "function") == "function":
            function = tool.get("function")
            if isinstance(function, dict):
                found.append(function)
        elif api_name == "responses" and tool.get("type") == "function":
            found.append(tool)
        elif api_name in ("messages", "count_tokens") and tool.get("type") in (None, "custom"):
            found.append(tool)  # a client tool; server tools (web_search_...) have their own types
    return found


def default_strict_tools(api_name: str, body: dict[str, Any]) -> int:
    """Set ``strict: true`` on every function tool that does not say (TOOL_STRICT_DEFAULT).

    With a tool-call parser that has a grammar (``hermes``, ...), vLLM pins
    a call's arguments to the tool's JSON schema only for strict tools;
    without ``strict`` a forced call could carry arguments such as
    ``"Paris"`` for an object schema. An explicit ``strict: false`` is kept.
    Returns how many tools it changed.
    """
    changed = 0
    for holder in _function_tools(api_name, body):
        if holder.get("strict") is None:
            holder["strict"] = True
            changed += 1
    return changed


def usage_of(api: Api, body: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a finished JSON answer, whatever the API calls them."""
    usage = body.get("usage")
    if api.name == "count_tokens":
        return body.get("input_tokens"), None
    if not isinstance(usage, dict):
        return None, None
    if api.name in ("responses", "messages"):
        return usage.get("input_tokens"), usage.get("output_tokens")
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


# -- vLLM's request models ------------------------------------------------------


@cache
def _adapter(api_name: str, variant: str) -> Any:
    """The pydantic validator of vLLM's request model for an API (``variant``: which member of a union)."""
    from pydantic import TypeAdapter

    if api_name == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as model
    elif api_name == "completion":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as model
    elif api_name == "responses":
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as model
    elif api_name == "messages":
        from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest as model
    elif api_name == "count_tokens":
        from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest as model
    elif api_name == "embeddings":
        from vllm.entrypoints.pooling.embed import protocol as embed

        model = embed.EmbeddingCompletionRequest if variant == "plain" else embed.EmbeddingRequest
    elif api_name == "classify":
        from vllm.entrypoints.pooling.classify import protocol as classify

        model = classify.ClassificationCompletionRequest if variant == "plain" else classify.ClassificationRequest
    elif api_name == "score":
        from vllm.entrypoints.pooling.scoring import protocol as scoring

        model = {
            "queries/documents": scoring.ScoreQueriesDocumentsRequest,
            "queries/items": scoring.ScoreQueriesItemsRequest,
            "data_1/data_2": scoring.ScoreDataRequest,
            "text_1/text_2": scoring.ScoreTextRequest,
        }[variant]
    elif api_name == "rerank":
        from vllm.entrypoints.pooling.scoring.protocol import RerankRequest as model
    elif api_name == "tokenize":
        from vllm.entrypoints.serve.tokenize import protocol as tokenize

        model = tokenize.TokenizeChatRequest if variant == "chat" else tokenize.TokenizeCompletionRequest
    elif api_name == "detokenize":
        from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest as model
    else:  # pragma: no cover - the table above is closed
        raise KeyError(api_name)
    return TypeAdapter(model)


def _variant(api_name: str, body: dict[str, Any]) -> str:
    if api_name == "score":
        return "/".join(score_sides(body))
    if api_name == "tokenize":
        return "chat" if "messages" in body else "plain"
    return "any"


def validate(api: Api, body: dict[str, Any]) -> Any:
    """vLLM's request object for ``body``; raises pydantic's ValidationError (or vLLM's own errors).

    vLLM's embeddings and classify requests are unions (plain inputs, one
    conversation, a batch of them): when the union refuses a body without
    ``messages``, the plain member's errors are the ones that say what is
    wrong, so those are raised.
    """
    from pydantic import ValidationError

    try:
        return _adapter(api.name, _variant(api.name, body)).validate_python(body)
    except ValidationError:
        if api.name in ("embeddings", "classify") and "messages" not in body and not _chat_shaped(body.get("input")):
            _adapter(api.name, "plain").validate_python(body)
        raise


def _chat_shaped(value: Any) -> bool:
    """A conversation (a list of message objects), or a list of them."""
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    return isinstance(first, dict) or (isinstance(first, list) and bool(first) and isinstance(first[0], dict))
