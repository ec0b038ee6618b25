"""Stream framing: OpenAI server-sent events, or NDJSON when RAW_OPENAI_OUTPUT=0.

vLLM's serving layer yields OpenAI SSE frames (``data: {json}\\n\\n``, an error
as a ``data: {"error": ...}`` frame, then ``data: [DONE]\\n\\n``). This module
only re-frames them, without parsing the JSON of ordinary chunks (that would
cost time on every token):

* chat frames carrying reasoning get ``reasoning_content`` beside vLLM's
  ``reasoning`` (:func:`mirror_reasoning`); only those frames are parsed;
* ``sse`` (``RAW_OPENAI_OUTPUT=1``, the default): frames pass through; an
  error frame is rewritten into the runtime's error shape and still comes
  last before ``[DONE]``.
* ``ndjson`` (``RAW_OPENAI_OUTPUT=0``): each chunk is the same JSON object on
  its own line (``application/x-ndjson``); an error is a last
  ``{"error": {...}}`` line; there is no ``[DONE]`` line, the end of the body
  ends the stream.

The Responses and Messages APIs stream typed events (``event: <type>`` then
``data:``), always as SSE: :class:`EventStream`.

A request can ask for either framing explicitly with its ``Accept`` header
(``text/event-stream`` or ``application/x-ndjson``); otherwise
``RAW_OPENAI_OUTPUT`` decides.
"""

from __future__ import annotations

import json

from .errors import engine_error_from_body

SSE = "sse"
NDJSON = "ndjson"
MEDIA_TYPES = {SSE: "text/event-stream", NDJSON: "application/x-ndjson"}

_DATA = "data: "
_DONE = "data: [DONE]"


def choose_format(raw_openai_output: bool, accept: str | None) -> str:
    """The framing for one streamed response."""
    if accept:
        accept = accept.lower()
        if "application/x-ndjson" in accept:
            return NDJSON
        if "text/event-stream" in accept:
            return SSE
    return SSE if raw_openai_output else NDJSON


def is_token_frame(frame: str, kind: str) -> bool:
    """Whether a frame carries generated text (for time to first token).

    A chat stream opens with a role-only delta whose content is empty; that is
    not a token. Substring checks keep this O(frame) without JSON parsing.
    """
    if not frame.startswith(_DATA) or frame.startswith(_DONE) or frame.startswith('data: {"error"'):
        return False
    if kind == "chat":
        return '"content":"' in frame and '"content":""' not in frame or '"reasoning' in frame
    return '"text":"' in frame


class Reframer:
    """Turns vLLM's SSE strings into the output framing; records if an error was sent."""

    def __init__(self, fmt: str, prompt_param: str, retry_after: int = 1, mirror: bool = False) -> None:
        self.fmt = fmt
        self.prompt_param = prompt_param
        self.retry_after = retry_after
        self.mirror = mirror  # chat: add reasoning_content beside vLLM's reasoning
        self.error_status: int | None = None

    def feed(self, piece: str) -> str:
        # vLLM yields one frame per string; splitting keeps us correct should
        # a future version batch several into one.
        if piece.count(_DATA) > 1:
            return "".join(self._frame(f + "\n\n") for f in piece.split("\n\n") if f)
        return self._frame(piece)

    def _frame(self, frame: str) -> str:
        if frame.startswith('data: {"error"'):
            frame = self._error_frame(frame)
        elif self.mirror and _REASONING in frame:
            frame = _mirror_frame(frame)
        if self.fmt == SSE:
            return frame
        if frame.startswith(_DONE) or not frame.startswith(_DATA):
            return ""  # [DONE] and SSE comments have no NDJSON counterpart
        return frame[len(_DATA):].rstrip("\n") + "\n"

    def _error_frame(self, frame: str) -> str:
        try:
            body = json.loads(frame[len(_DATA):])
            status = int(body["error"].get("code") or 500)
        except (ValueError, KeyError, TypeError, AttributeError):
            body, status = {}, 500
        err = engine_error_from_body(status, body, self.prompt_param, self.retry_after)
        self.error_status = err.status
        return _DATA + json.dumps(err.body(), separators=(",", ":")) + "\n\n"

    def error_frame(self, body: dict) -> str:
        """A frame for an error raised while streaming (our own, not vLLM's)."""
        data = json.dumps(body, separators=(",", ":"))
        if self.fmt == SSE:
            return f"{_DATA}{data}\n\n{_DONE}\n\n"
        return data + "\n"


# -- reasoning: both field names ---------------------------------------------------
#
# vLLM 0.32 names a reasoning parser's output `reasoning` (it renamed the
# older `reasoning_content`, which DeepSeek's API and many clients read). The
# runtime sends both, with the same text, in chat messages and deltas.

_REASONING = '"reasoning":"'


def _mirror_into(holder: object) -> None:
    if isinstance(holder, dict) and holder.get("reasoning") is not None:
        holder["reasoning_content"] = holder["reasoning"]


def mirror_reasoning(body: dict) -> dict:
    """A chat completion or chunk with ``reasoning_content`` beside each non-null ``reasoning``."""
    for choice in body.get("choices") or ():
        if isinstance(choice, dict):
            _mirror_into(choice.get("message"))
            _mirror_into(choice.get("delta"))
    return body


def _mirror_frame(frame: str) -> str:
    try:
        chunk = json.loads(frame[len(_DATA):])
    except ValueError:
        return frame
    if not isinstance(chunk, dict):
        return frame
    return _DATA + json.dumps(mirror_reasoning(chunk), separators=(",", ":")) + "\n\n"


# -- typed event streams (Responses, Messages) --------------------------------------

# Internal details never go to a client; the log has them.
_INTERNAL = "The server had an error while processing your request. Sorry about that!"


class EventStream:
    """Frames one stream of the Responses or Messages API, and notes what the runtime reports about it.

    Responses items are vLLM's event objects, framed as vLLM's own route
    frames them; Messages items are vLLM's frames already. ``first_token``
    turns true on the first event carrying generated text (a ``.delta``
    event, a ``content_block_delta``); token counts are read from the few
    events that carry usage, so ordinary deltas are never parsed.
    """

    def __init__(self, api_name: str) -> None:
        self.api_name = api_name
        self.first_token = False
        self.error_sent = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self._sequence = 0

    def frame(self, item: object) -> str:
        if isinstance(item, str):
            return self._messages_frame(item)
        return self._responses_frame(item)

    def _responses_frame(self, event: object) -> str:
        kind = str(getattr(event, "type", "unknown"))
        self._sequence = getattr(event, "sequence_number", self._sequence) or self._sequence
        if kind.endswith(".delta"):
            self.first_token = True
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            usage = getattr(getattr(event, "response", None), "usage", None)
            if usage is not None:
                self.prompt_tokens = getattr(usage, "input_tokens", None)
                self.completion_tokens = getattr(usage, "output_tokens", None)
        elif kind == "error":
            return self.error_frame()
        dump = getattr(event, "model_dump_json", None)
        data = dump(indent=None, by_alias=True) if dump is not None else json.dumps(event, default=str)
        return f"event: {kind}\n{_DATA}{data}\n\n"

    def _messages_frame(self, frame: str) -> str:
        if frame.startswith("event: content_block_delta"):
            self.first_token = True
        elif frame.startswith(("event: message_start", "event: message_delta")):
            self._messages_usage(frame)
        elif frame.startswith("event: error"):
            return self.error_frame()
        return frame

    def _messages_usage(self, frame: str) -> None:
        _, _, data = frame.partition(_DATA)
        try:
            event = json.loads(data)
        except ValueError:
            return
        usage = event.get("usage") or (event.get("message") or {}).get("usage") or {}
        if isinstance(usage.get("input_tokens"), int) and usage["input_tokens"] > 0:
            self.prompt_tokens = usage["input_tokens"]
        if isinstance(usage.get("output_tokens"), int) and event.get("type") == "message_delta":
            self.completion_tokens = usage["output_tokens"]

    def error_frame(self) -> str:
        """The last frame of a stream that failed after it started, in the API's own error event."""
        self.error_sent = True
        if self.api_name == "responses":
            self._sequence += 1
            body: dict = {"type": "error", "code": "internal_error", "message": _INTERNAL, "param": None,
                          "sequence_number": self._sequence}  # fmt: skip
        else:
            body = {"type": "error", "error": {"type": "api_error", "message": _INTERNAL}}
        return f"event: error\n{_DATA}{json.dumps(body, separators=(',', ':'))}\n\n"
