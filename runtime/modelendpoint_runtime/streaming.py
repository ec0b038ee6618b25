"""Stream framing: OpenAI server-sent events, or NDJSON when RAW_OPENAI_OUTPUT=0.

vLLM's serving layer yields OpenAI SSE frames (``data: {json}\\n\\n``, an error
as a ``data: {"error": ...}`` frame, then ``data: [DONE]\\n\\n``). This module
only re-frames them, without parsing the JSON of ordinary chunks (that would
cost time on every token):

* ``sse`` (``RAW_OPENAI_OUTPUT=1``, the default): frames pass through; an
  error frame is rewritten into the runtime's error shape and still comes
  last before ``[DONE]``.
* ``ndjson`` (``RAW_OPENAI_OUTPUT=0``): each chunk is the same JSON object on
  its own line (``application/x-ndjson``); an error is a last
  ``{"error": {...}}`` line; there is no ``[DONE]`` line, the end of the body
  ends the stream.

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

    def __init__(self, fmt: str, prompt_param: str, retry_after: int = 1) -> None:
        self.fmt = fmt
        self.prompt_param = prompt_param
        self.retry_after = retry_after
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
