"""The prefix key of a request, for PrefixHash balancing (pure).

The key is the start of what the engine will see first, so that requests
sharing it (the same system prompt, the same first turns of a conversation)
share the replica whose prefix cache holds it:

- chat (``messages``; Anthropic's ``system`` + ``messages``; the Responses
  API's ``instructions`` + ``input``): a canonical serialization of the
  messages in order, ``role`` then text, with separators that cannot occur in
  JSON-decoded text by accident, cut at ``prefixCharLength`` characters. The
  chat template puts the system prompt and the first messages first, so equal
  keys mean an equal template prefix (the template itself is the same for
  every request of one model).
- completions (``prompt``): its first ``prefixCharLength`` characters (the
  first prompt of a list; token ids as decimal text).

No prompt in the body: no key (the request is balanced by least requests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_ROLE_SEP = "\x1f"  # unit separator: between a message's role and its text
_MSG_SEP = "\x1e"   # record separator: after each message


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text (and image/audio references) of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
                else:
                    # Images and files change the prefix too: their URL or id stands for them.
                    for k in ("image_url", "input_audio", "file", "source"):
                        ref = part.get(k)
                        if isinstance(ref, Mapping):
                            ref = ref.get("url") or ref.get("file_id") or ref.get("data")
                        if isinstance(ref, str):
                            out.append(ref[:256])
                            break
        return "".join(out)
    return ""


def _messages_key(messages: list[Any], limit: int, system: Any = None) -> str:
    parts: list[str] = []
    size = 0
    if system is not None:
        text = "system" + _ROLE_SEP + _text(system) + _MSG_SEP
        parts.append(text)
        size += len(text)
    for m in messages:
        if size >= limit:
            break
        if isinstance(m, Mapping):
            text = str(m.get("role") or "") + _ROLE_SEP + _text(m.get("content")) + _MSG_SEP
        else:
            text = _text(m) + _MSG_SEP
        parts.append(text)
        size += len(text)
    return "".join(parts)[:limit]


def _prompt_key(prompt: Any, limit: int) -> str | None:
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt[: limit]):
            return ",".join(str(t) for t in prompt[:limit])[:limit]
        prompt = prompt[0]
        if isinstance(prompt, list):
            return ",".join(str(t) for t in prompt[:limit])[:limit]
    if isinstance(prompt, str):
        return prompt[:limit]
    return None


def prefix_key(body: Mapping[str, Any], limit: int) -> str | None:
    """The prefix key of a request body, or None when it carries no prompt."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return _messages_key(messages, limit, body.get("system"))
    inp = body.get("input")
    if isinstance(inp, list) and inp and isinstance(inp[0], Mapping):
        return _messages_key(inp, limit, body.get("instructions"))
    if isinstance(inp, str) and body.get("instructions") is not None:
        return _messages_key([{"role": "user", "content": inp}], limit, body.get("instructions"))
    for field in ("prompt", "input"):
        key = _prompt_key(body.get(field), limit)
        if key:
            return key
    return None
