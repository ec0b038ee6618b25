"""Request checks the runtime applies before vLLM sees a request.

Pure functions over the already schema-validated request object (vLLM's
``ChatCompletionRequest`` / ``CompletionRequest``; anything with the same
attributes works, which is how the unit tests drive them):

* the model name must be the served one (404 ``model_not_found``);
* on the raw body, before vLLM's request models spend time on it: caps on
  the number of ``messages``, of ``stop`` sequences and of prompts
  (``LIMIT_MESSAGES``, ``LIMIT_STOP``, ``LIMIT_PROMPTS``);
* configurable caps on ``n``, ``max_tokens`` (and ``max_completion_tokens``),
  ``best_of`` and ``logprobs`` / ``top_logprobs`` / ``prompt_logprobs``, and
  no negative log-probability counts (vLLM reads -1 as "the whole
  vocabulary"): 400 naming the parameter the client sent;
* :func:`sequences`, the weight of a request for admission control: the
  sequences it puts in the engine, prompts x max(n, best_of);
* ``best_of``, which vLLM 0.32 removed from its request models (its V1
  engine no longer samples extra sequences to rank them), is given its
  meaning back here: with ``use_beam_search`` it is the beam width and the
  best ``n`` beams are returned; otherwise the runtime asks the engine for
  ``best_of`` samples with their log-probabilities and returns the ``n`` with
  the highest cumulative log-probability (:func:`rank_choices`). That needs
  every sample finished, so ``best_of > n`` cannot stream (400, as OpenAI).
  With ``echo`` on a completions prompt given as text, the runtime echoes the
  prompt itself (:func:`prepend_echo`) so the engine computes no prompt
  log-probabilities for the ranking;
* :func:`prompt_logprobs_param`: the field that would make vLLM compute
  prompt log-probabilities, which the runtime refuses while LoRA is enabled
  (vLLM 0.32 fails on them there: issues 29955, 16668).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import APIError, clip, invalid_request, model_not_found


@dataclass(frozen=True)
class Limits:
    n: int = 16
    best_of: int = 16
    max_tokens: int = 32768
    logprobs: int = 20
    prompts: int = 64
    messages: int = 2048
    stop: int = 16


@dataclass(frozen=True)
class Plan:
    """What the route must do beyond handing the request to vLLM.

    ``engine_n``: if not None, set the request's ``n`` to it (beam width, or
    the number of samples to rank);
    ``keep_n``: trim the response's choices to this many (best first);
    ``rank``: the choices are samples, not beams: rank them by cumulative
    log-probability (:func:`rank_choices`) before trimming.
    """

    engine_n: int | None = None
    keep_n: int | None = None
    rank: bool = False


def prompt_count(prompt: Any) -> int:
    """How many prompts a completions ``prompt`` holds: a string or a list of token ids is one;
    a list of strings, or of token-id lists, is one per item."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def check_shape(body: dict[str, Any], kind: str, limits: Limits = Limits()) -> APIError | None:
    """Structural checks and counts, on the raw body, before vLLM's request models see it.

    vLLM validates ``messages`` inside model validators that iterate it
    before type-checking, so ``"messages": null`` surfaces as "'NoneType'
    object is not iterable" with no parameter. Checking the outline first gives
    the client a message and a ``param`` that say what is wrong. The counts
    come first: a body of 100,000 messages or stop strings is refused before
    anything walks it.
    """
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > limits.stop:
        return invalid_request(f"stop may hold at most {limits.stop} sequences, got {len(stop)}.", "stop")
    if isinstance(stop, str) and limits.stop < 1:
        return invalid_request("stop sequences are not accepted by this server.", "stop")
    if kind != "chat":
        count = prompt_count(body.get("prompt"))
        if count > limits.prompts:
            return invalid_request(f"prompt may hold at most {limits.prompts} prompts, got {count}.", "prompt")
        return None
    if "messages" not in body:
        return APIError(400, "Missing required parameter: 'messages'.", "invalid_request_error", "messages",
                        "missing_required_parameter")  # fmt: skip
    messages = body["messages"]
    if not isinstance(messages, list):
        return invalid_request("'messages' must be an array of message objects.", "messages")
    if not messages:
        return invalid_request("'messages' must contain at least one message.", "messages")
    if len(messages) > limits.messages:
        return invalid_request(f"messages may hold at most {limits.messages} messages, got {len(messages)}.",
                               "messages")  # fmt: skip
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return invalid_request(f"'messages[{i}]' must be an object with 'role' and 'content'.", f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            return invalid_request(f"'messages[{i}].role' must be a string.", f"messages[{i}].role")
    return None


def check_model(requested: Any, served: str) -> APIError | None:
    """The guide marks ``model`` required: missing (or null) is a 400, as OpenAI answers."""
    if requested is None:
        return APIError(400, "Missing required parameter: 'model'.", "invalid_request_error", "model",
                        "missing_required_parameter")  # fmt: skip
    if not isinstance(requested, str):
        return invalid_request("'model' must be a string.", "model")
    if requested != served:
        return model_not_found(clip(requested))
    return None


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    return value if isinstance(value, int) else None


def check_caps(request: Any, limits: Limits, kind: str) -> APIError | Plan:
    """Enforce the caps; return the plan for best_of, or the 400 to send."""
    n = getattr(request, "n", 1)
    n = 1 if n is None else n
    if n < 1:
        return invalid_request(f"n must be at least 1, got {n}.", "n")
    if n > limits.n:
        return invalid_request(f"n must be at most {limits.n}, got {n}.", "n")

    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name, None)
        if value is None:
            continue
        if value < 1:
            return invalid_request(f"{name} must be at least 1, got {value}.", name)
        if value > limits.max_tokens:
            return invalid_request(f"{name} must be at most {limits.max_tokens}, got {value}.", name)

    # Log-probability counts: vLLM reads -1 as "the whole vocabulary" (and
    # would name another parameter than the one sent), so negatives are ours to refuse.
    names = ("top_logprobs",) if kind == "chat" else ("logprobs",)
    for name in (*names, "prompt_logprobs"):
        value = _int_or_none(getattr(request, name, None))
        if value is None:
            continue
        if value < 0:
            return invalid_request(f"{name} must be at least 0, got {value}.", name)
        if value > limits.logprobs:
            return invalid_request(f"{name} must be at most {limits.logprobs}, got {value}.", name)

    return _plan_best_of(request, limits, n)


def sequences(request: Any, kind: str, plan: Plan) -> int:
    """The sequences a request puts in the engine, its weight for admission: prompts x max(n, best_of).

    ``plan.engine_n`` is best_of (or the beam width) when it exceeds n.
    """
    n = plan.engine_n or getattr(request, "n", None) or 1
    prompts = 1 if kind == "chat" else prompt_count(getattr(request, "prompt", None))
    return max(1, prompts) * max(1, n)


def _plan_best_of(request: Any, limits: Limits, n: int) -> APIError | Plan:
    extra = getattr(request, "model_extra", None) or {}
    raw = extra.get("best_of", getattr(request, "best_of", None))
    if raw is None:
        return Plan()
    best_of = _int_or_none(raw)
    if best_of is None:
        return invalid_request("best_of must be an integer.", "best_of")
    if best_of < 1:
        return invalid_request(f"best_of must be at least 1, got {best_of}.", "best_of")
    if best_of > limits.best_of:
        return invalid_request(f"best_of must be at most {limits.best_of}, got {best_of}.", "best_of")
    if best_of < n:
        return invalid_request(
            f"best_of must be greater than or equal to n, got best_of={best_of} and n={n}.", "best_of"
        )
    if best_of == n:
        return Plan()
    if getattr(request, "stream", False):
        # The best n are known only once all best_of samples have finished.
        return invalid_request("best_of greater than n cannot be combined with stream=true.", "best_of")
    if getattr(request, "use_beam_search", False):
        return Plan(engine_n=best_of, keep_n=n)
    return Plan(engine_n=best_of, keep_n=n, rank=True)


def _per_prompt(choices: list[dict[str, Any]], group: int) -> list[list[dict[str, Any]]]:
    """Choices in groups of ``group``, one per prompt: a list of prompts gives
    ``len(prompts) * n`` choices, prompt i's at indexes ``i*n .. i*n+n-1``."""
    ordered = sorted(choices, key=lambda c: c.get("index", 0))
    return [ordered[i : i + group] for i in range(0, len(ordered), max(group, 1))]


def trim_choices(body: dict[str, Any], keep_n: int, group: int | None = None) -> dict[str, Any]:
    """Keep the first ``keep_n`` choices of each prompt's ``group`` (beam search
    returns them best first); re-indexed as OpenAI numbers them, ``prompt * keep_n + j``."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body
    groups = _per_prompt(choices, group or len(choices))
    body["choices"] = [dict(c, index=p * keep_n + j) for p, g in enumerate(groups) for j, c in enumerate(g[:keep_n])]
    return body


def logprobs_for_ranking(request: Any, kind: str) -> dict[str, Any]:
    """The request fields to set so every sample comes back with its token log-probabilities.

    Only fields the client left unset are touched (0 alternatives: just the
    sampled token's log-probability); :func:`rank_choices` strips them again.
    """
    if kind == "chat":
        return {} if getattr(request, "logprobs", False) else {"logprobs": True, "top_logprobs": 0}
    return {} if getattr(request, "logprobs", None) is not None else {"logprobs": 0}


def cumulative_logprob(choice: dict[str, Any], kind: str) -> float:
    """The sum of the sampled tokens' log-probabilities of one response choice."""
    lp = choice.get("logprobs") or {}
    if kind == "chat":
        values = [t.get("logprob") for t in lp.get("content") or []]
    else:
        values = lp.get("token_logprobs") or []
    # With echo, the prompt's first token has no log-probability (None).
    return float(sum(v for v in values if v is not None))


def rank_choices(
    body: dict[str, Any], keep_n: int, kind: str, keep_logprobs: bool, group: int | None = None
) -> dict[str, Any]:
    """best_of: keep, for each prompt, the ``keep_n`` of its ``group`` samples
    with the highest cumulative log-probability.

    Ties go to the lower index; the kept choices are re-indexed in rank order
    as OpenAI numbers them (``prompt * keep_n + j``); log-probabilities the
    client did not ask for are removed. ``usage`` is left as the engine
    counted it: all best_of samples, as OpenAI bills them.
    """
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body
    kept = []
    for p, samples in enumerate(_per_prompt(choices, group or len(choices))):
        ranked = sorted(samples, key=lambda c: (-cumulative_logprob(c, kind), c.get("index", 0)))
        for j, choice in enumerate(ranked[:keep_n]):
            choice = dict(choice, index=p * keep_n + j)
            if not keep_logprobs:
                choice["logprobs"] = None
            kept.append(choice)
    body["choices"] = kept
    return body


def echo_prompts(request: Any, kind: str, plan: Plan, ranking_fields: dict[str, Any]) -> list[str] | None:
    """The prompt texts the runtime echoes itself (best_of ranking of text prompts), else None.

    Echo with the log-probabilities the ranking asks for would make vLLM
    compute the prompt's log-probabilities too, which nobody asked for (and
    which fail with LoRA enabled). The caller then turns vLLM's echo off.
    """
    if not (plan.rank and kind == "completion" and getattr(request, "echo", False) and ranking_fields):
        return None
    prompt = getattr(request, "prompt", None)
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    return None


def prepend_echo(body: dict[str, Any], prompts: list[str], per_prompt: int) -> dict[str, Any]:
    """Each choice's text with its prompt in front, as vLLM's echo gives it (choice i continues prompt i // n)."""
    for choice in body.get("choices") or ():
        if isinstance(choice, dict) and isinstance(choice.get("text"), str):
            index = choice.get("index", 0) // max(per_prompt, 1)
            if 0 <= index < len(prompts):
                choice["text"] = prompts[index] + choice["text"]
    return body


def prompt_logprobs_param(request: Any, kind: str) -> str | None:
    """The field that makes vLLM compute prompt log-probabilities: ``prompt_logprobs``, or ``echo`` with
    log-probabilities (vLLM then returns the prompt's too); None if nothing does."""
    if getattr(request, "prompt_logprobs", None) is not None:
        return "prompt_logprobs"
    if getattr(request, "echo", False):
        wanted = getattr(request, "top_logprobs", None) if kind == "chat" else getattr(request, "logprobs", None)
        if wanted is not None:
            return "echo"
    return None
