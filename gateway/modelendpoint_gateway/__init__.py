"""modelendpoint-gateway: one OpenAI base URL for every ModelEndpoint of a cluster.

It discovers ModelEndpoints and their ready runtime pods by watching the API
server, routes each request by its ``model`` to the owner of that served name,
balances across ready replicas (least outstanding requests, or consistent
hashing with bounded load on the prompt's start), checks API keys before
anything costs a GPU, and holds requests while a model wakes from zero.
See docs/gateway.md.
"""

__version__ = "0.1.0"
