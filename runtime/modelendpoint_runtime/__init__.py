"""modelendpoint-runtime: the OpenAI-compatible server every ModelEndpoint pod runs.

A FastAPI app (served by uvicorn with uvloop) over vLLM's async engine in the
same process. The OpenAI protocol itself (request models, sampling, chat
templates, streaming chunks) is vLLM's own serving layer; this package is what
surrounds it: configuration, routes, auth, the error shape, limits, admission
control, health, metrics, request logs and the drain on SIGTERM.

Pure logic (settings -> engine arguments, request checks, error mapping,
stream framing) lives in modules without I/O so it can be unit-tested without
an engine: ``settings``, ``errors``, ``limits``, ``auth``, ``streaming``,
``admission``.
"""

__version__ = "0.1.0"
