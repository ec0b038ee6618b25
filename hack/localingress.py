"""A local ingress: routes a loopback port by the cluster's Ingress objects.

For `make dev` and the end-to-end tests. It reads Ingresses (any class) and their
backend Services from the API server, and proxies each request whose path
matches a rule (longest prefix first) to that Service's cluster IP, streaming
both ways; kube-proxy on the real node takes it from there to a ready pod. So a
request takes the path a real cluster gives it, Ingress → Service → ready pod,
with this process in the place of an ingress controller. Host rules are matched
when the request carries that Host header; rules without a host match any.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from kubernetes import client, config

log = logging.getLogger("localingress")

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass(frozen=True)
class Route:
    host: str
    prefix: str
    exact: bool
    namespace: str
    service: str
    port: int | str


def routes_from_ingresses(ingresses: list[dict]) -> list[Route]:
    """Ingress objects → routes, longest prefix first (what ingress controllers do)."""
    out = []
    for ing in ingresses:
        ns = ing["metadata"]["namespace"]
        for rule in ing.get("spec", {}).get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                svc = p["backend"]["service"]
                port = svc["port"].get("number") or svc["port"].get("name")
                out.append(Route(rule.get("host", ""), p.get("path", "/"), p.get("pathType") == "Exact",
                                 ns, svc["name"], port))
    return sorted(out, key=lambda r: (-len(r.prefix), r.host == ""))


def matches(route: Route, host: str, path: str) -> bool:
    if route.host and route.host != host.split(":")[0]:
        return False
    if route.exact:
        return path == route.prefix
    prefix = route.prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


class LocalIngress:
    def __init__(self) -> None:
        self.api = client.ApiClient()
        self.networking = client.NetworkingV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.session: aiohttp.ClientSession | None = None

    def _routes(self) -> list[Route]:
        ings = self.networking.list_ingress_for_all_namespaces()
        return routes_from_ingresses([self.api.sanitize_for_serialization(i) for i in ings.items])

    def _service_address(self, route: Route) -> str | None:
        """The Service's cluster IP and port (the rule names the port by number or name)."""
        svc = self.core.read_namespaced_service(route.service, route.namespace)
        port = next((p.port for p in svc.spec.ports
                     if p.port == route.port or (p.name and p.name == route.port)), None)
        if not svc.spec.cluster_ip or svc.spec.cluster_ip == "None" or port is None:
            return None
        return f"{svc.spec.cluster_ip}:{port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        routes = await asyncio.to_thread(self._routes)
        route = next((r for r in routes if matches(r, request.host, request.path)), None)
        if route is None:
            return web.json_response({"error": {"message": f"no Ingress rule matches {request.path}",
                                                "type": "not_found", "param": None, "code": None}},
                                     status=404)
        target = await asyncio.to_thread(self._service_address, route)
        if target is None:
            return web.json_response(
                {"error": {"message": f"service {route.namespace}/{route.service} has no cluster IP and port",
                           "type": "service_unavailable", "param": None, "code": None}},
                status=503, headers={"Retry-After": "5"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers["X-Forwarded-For"] = request.remote or ""
        assert self.session is not None
        try:
            async with self.session.request(request.method, f"http://{target}{request.rel_url}", headers=headers,
                                            data=await request.read(), allow_redirects=False) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS})
                response.headers["X-Local-Ingress-Backend"] = target
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientConnectorError:
            # kube-proxy refuses connections to a Service without ready endpoints (nothing
            # has been sent to the client yet: the connection is what failed).
            return web.json_response(
                {"error": {"message": f"service {route.namespace}/{route.service} has no ready endpoints",
                           "type": "service_unavailable", "param": None, "code": None}},
                status=503, headers={"Retry-After": "5"})

    async def serve(self, host: str, port: int) -> None:
        # A new connection per request: kube-proxy balances connections, not requests, so
        # reused ones would pin every request to the pod behind the first.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
                                             connector=aiohttp.TCPConnector(force_close=True))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("local ingress listening on http://%s:%d", host, port)
        try:
            await asyncio.Event().wait()
        finally:
            await self.session.close()
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s localingress %(message)s")
    config.load_kube_config(args.kubeconfig)
    try:
        asyncio.run(LocalIngress().serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
