"""An OpenAI-compatible routing server: each request is routed to one backend LLM.

``moelab route serve ROUTER_DIR --backends backends.toml --port 8000`` (Starlette + uvicorn; the
``serve`` extra). Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (with
``stream``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

The request's ``model`` names the router and its operating point, as RouteLLM's server does
(``router-mf-0.11593``, where RouteLLM's number is its threshold): ``router-<name>-<tradeoff>``
routes with trade-off mu in [0, 1] (0 = quality only); ``router-<name>-budget-<usd>`` picks the
best model whose estimated cost for this prompt is within ``usd``; ``auto`` is the first router at
``--default-tradeoff``; a backend model's own name bypasses routing. The prompt routed is the last
user message (RouteLLM routes the last turn).

The chosen model's backend gets the request with ``model`` replaced by the backend's model name.
A backend that fails (connection error, timeout, HTTP 429/5xx) falls back to the next-best model
(by the router's utility for this prompt); the response says which model served it and whether it
fell back: JSON field ``routing`` and headers ``x-moelab-routed-model``, ``x-moelab-fallback``.

Backends TOML::

    [server]
    timeout_s = 30              # default backend timeout
    budget_usd = 100.0          # whole-server budget (optional)

    [keys]                      # per client API key (Authorization: Bearer ...), optional
    "team-a-key" = 5.0          # USD

    [models."gpt-4-1106-preview"]
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"   # the key is read from this environment variable, never the file
    model = "gpt-4-1106-preview"     # the backend's model name (default: the table name)
    timeout_s = 20
    price_in = 10.0                  # USD per million tokens, for budget accounting (optional:
    price_out = 30.0                 # otherwise the router's cost estimate is charged)

Budgets: a request is refused with HTTP 429 (``insufficient_quota``) once the key's or the
server's spend reaches its budget, and models whose estimated cost exceeds what is left are
skipped. Spend is charged when a response arrives (the backend's token usage x the TOML prices,
else the router's estimate), so concurrent requests may overshoot a budget by what is in flight. Errors use OpenAI's format ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


# ---------------------------------------------------------------------- config
@dataclass
class Backend:
    name: str
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 30.0
    price_in: float | None = None
    price_out: float | None = None


@dataclass
class ServeConfig:
    backends: dict[str, Backend]
    timeout_s: float = 30.0
    budget_usd: float | None = None
    key_budgets: dict[str, float] = field(default_factory=dict)


def _backend(name: str, t: dict, default_timeout: float, env) -> Backend:
    if "api_key" in t:
        raise MoelabError(f"backends: [models.{name!r}] has api_key in the file; put the key in an environment "
                          "variable and name it with api_key_env")
    if not isinstance(t.get("base_url"), str) or not t["base_url"].startswith(("http://", "https://")):
        raise MoelabError(f"backends: [models.{name!r}] base_url={t.get('base_url')!r} must be an http(s) URL")
    key = None
    if t.get("api_key_env"):
        key = env.get(t["api_key_env"])
        if not key:
            raise MoelabError(f"backends: [models.{name!r}] api_key_env={t['api_key_env']!r} is not set in the "
                              "environment")
    return Backend(name, t["base_url"].rstrip("/"), str(t.get("model", name)), key,
                   float(t.get("timeout_s", default_timeout)), t.get("price_in"), t.get("price_out"))


def load_config(path: str | Path, env=None) -> ServeConfig:
    """Parse and check the backends TOML (see the module docstring)."""
    import tomllib

    env = os.environ if env is None else env
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MoelabError(f"backends file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise MoelabError(f"backends file {str(path)!r} is not valid TOML: {e}") from None
    srv = doc.get("server", {})
    timeout = float(srv.get("timeout_s", 30.0))
    models = doc.get("models", {})
    if not models:
        raise MoelabError(f"backends file {str(path)!r} has no [models.NAME] tables")
    backends = {n: _backend(n, t, timeout, env) for n, t in models.items()}
    return ServeConfig(backends, timeout, srv.get("budget_usd"), {k: float(v) for k, v in doc.get("keys", {}).items()})


def load_routers(folder: str | Path) -> dict:
    """A router folder (has router.json) or a folder of them; keyed by router name."""
    from moelab.route.base import load_router

    folder = Path(folder)
    dirs = [folder] if (folder / "router.json").exists() else sorted(p.parent for p in folder.glob("*/router.json"))
    if not dirs:
        raise MoelabError(f"router_dir={str(folder)!r} holds no router.json (fit one with `moelab route fit`)")
    out = {}
    for d in dirs:
        r = load_router(d)
        if r.uses_truth:
            raise MoelabError(f"{d}: router {r.name!r} needs true scores and cannot serve")
        out[r.name] = r
    return out


# ---------------------------------------------------------------------- routing decisions
class RequestError(Exception):
    """An OpenAI-format error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Plan:
    router: str | None
    order: list[str]  # models to try, best first
    est_cost: dict[str, float]
    routing_ms: float


def parse_model(model, routers: dict, default_tradeoff: float) -> tuple[str, str, float]:
    """``(router, kind, value)`` with kind 'tradeoff' or 'budget'."""
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required: router-<name>-<tradeoff>, router-<name>-budget-<usd>, "
                                "auto, or a backend model name", param="model")
    if model == "auto":
        return next(iter(routers)), "tradeoff", default_tradeoff
    rest = model[len("router-"):] if model.startswith("router-") else None
    for name in sorted(routers, key=len, reverse=True) if rest is not None else []:
        if rest.startswith(name + "-"):
            tail = rest[len(name) + 1:]
            kind, num = ("budget", tail[len("budget-"):]) if tail.startswith("budget-") else ("tradeoff", tail)
            try:
                v = float(num)
            except ValueError:
                break
            if not np.isfinite(v) or v < 0 or (kind == "tradeoff" and v > 1):
                raise RequestError(400, f"model={model!r}: {kind} {num} is out of range "
                                        f"({'0..1' if kind == 'tradeoff' else '>= 0 USD'})", param="model")
            return name, kind, v
    raise RequestError(404, f"model {model!r} does not exist; routers: {sorted(routers)} "
                            "(name them router-<name>-<tradeoff> or router-<name>-budget-<usd>)",
                       param="model", code="model_not_found")


def plan_route(router, prompt: str, kind: str, value: float, allowed: set[str], left: float | None) -> tuple[list, dict]:
    """Models to try, best first, and the router's cost estimate per model for this prompt."""
    q_PM, c_PM = router.estimate([prompt])
    mu = value if kind == "tradeoff" else 0.0
    u = (1.0 - mu) * q_PM[0] - mu * c_PM[0] / router.c_scale - 1e-12 * c_PM[0] / router.c_scale
    first = int(router.decide_grid(q_PM, c_PM, [mu])[0][0]) if kind == "tradeoff" else -1
    order = [first] if first >= 0 else []
    order += [int(i) for i in np.argsort(-u, kind="stable") if int(i) != first]
    cap = value if kind == "budget" else None
    for lim in (cap, left):
        if lim is not None:
            order = [i for i in order if c_PM[0, i] <= lim * (1 + 1e-9)]
    names = [router.models[i] for i in order if router.models[i] in allowed]
    return names, {m: float(c_PM[0, j]) for j, m in enumerate(router.models)}


# ---------------------------------------------------------------------- metrics
class Metrics:
    """Counters for /metrics (Prometheus text exposition format 0.0.4)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.cost: dict[str, float] = {}
        self.fallbacks = 0
        self.refused = 0
        self.lat_buckets = [0] * len(LATENCY_BUCKETS_S)
        self.lat_sum = 0.0
        self.lat_count = 0

    def observe_routing(self, seconds: float) -> None:
        with self.lock:
            self.lat_sum += seconds
            self.lat_count += 1
            for i, b in enumerate(LATENCY_BUCKETS_S):
                if seconds <= b:
                    self.lat_buckets[i] += 1

    def count(self, model: str, status: str, cost: float = 0.0, fallback: bool = False) -> None:
        with self.lock:
            self.requests[(model, status)] = self.requests.get((model, status), 0) + 1
            self.cost[model] = self.cost.get(model, 0.0) + cost
            self.fallbacks += int(fallback)

    def text(self) -> str:
        with self.lock:
            out = ["# HELP moelab_requests_total Requests by served model and outcome.",
                   "# TYPE moelab_requests_total counter"]
            out += [f'moelab_requests_total{{model="{m}",status="{s}"}} {n}' for (m, s), n in sorted(self.requests.items())]
            out += ["# HELP moelab_cost_usd_total Charged cost by served model (USD).", "# TYPE moelab_cost_usd_total counter"]
            out += [f'moelab_cost_usd_total{{model="{m}"}} {c:.10g}' for m, c in sorted(self.cost.items())]
            out += ["# TYPE moelab_fallbacks_total counter", f"moelab_fallbacks_total {self.fallbacks}",
                    "# TYPE moelab_budget_refusals_total counter", f"moelab_budget_refusals_total {self.refused}",
                    "# HELP moelab_routing_latency_seconds Time to choose a model (features + router).",
                    "# TYPE moelab_routing_latency_seconds histogram"]
            out += [f'moelab_routing_latency_seconds_bucket{{le="{b}"}} {n}' for b, n in zip(LATENCY_BUCKETS_S, self.lat_buckets)]
            out += [f'moelab_routing_latency_seconds_bucket{{le="+Inf"}} {self.lat_count}',
                    f"moelab_routing_latency_seconds_sum {self.lat_sum:.9f}",
                    f"moelab_routing_latency_seconds_count {self.lat_count}"]
            return "\n".join(out) + "\n"


class Budgets:
    """Spend per client key and for the whole server (USD)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg, self.lock = cfg, threading.Lock()
        self.spent: dict[str, float] = {}
        self.total = 0.0

    def left(self, key: str | None) -> float | None:
        """USD left for this key (the smaller of its and the server's budget); None = unlimited."""
        lims = []
        if self.cfg.budget_usd is not None:
            lims.append(float(self.cfg.budget_usd) - self.total)
        if key is not None and key in self.cfg.key_budgets:
            lims.append(self.cfg.key_budgets[key] - self.spent.get(key, 0.0))
        return min(lims) if lims else None

    def charge(self, key: str | None, usd: float) -> None:
        with self.lock:
            self.total += usd
            if key is not None:
                self.spent[key] = self.spent.get(key, 0.0) + usd


# ---------------------------------------------------------------------- request parsing
def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def prompt_of(body: dict, chat: bool) -> str:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        users = [_text(m.get("content")) for m in msgs if m.get("role") == "user"]
        text = users[-1] if users else _text(msgs[-1].get("content"))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str):
            raise RequestError(400, "'prompt' must be a string (batched prompts are not routed)", param="prompt")
        text = p
    if not text.strip():
        raise RequestError(400, "the prompt to route is empty", param="messages" if chat else "prompt")
    return text


def charge_usd(be: Backend, usage: dict | None, estimate: float) -> float:
    if usage and be.price_in is not None and be.price_out is not None:
        return (usage.get("prompt_tokens", 0) * be.price_in + usage.get("completion_tokens", 0) * be.price_out) / 1e6
    return estimate


# ---------------------------------------------------------------------- the app
class RoutingService:
    """Routing, forwarding, fallback, budgets and metrics; the ASGI app is :meth:`app`."""

    def __init__(self, routers: dict, cfg: ServeConfig, default_tradeoff: float = 0.5) -> None:
        self.routers, self.cfg, self.default_tradeoff = routers, cfg, default_tradeoff
        self.metrics, self.budgets = Metrics(), Budgets(cfg)
        for name, r in routers.items():
            missing = [m for m in r.models if m not in cfg.backends]
            if len(missing) == len(r.models):
                raise MoelabError(f"router {name!r} routes to {r.models}; none has a backend in the TOML "
                                  f"(backends: {sorted(cfg.backends)})")
        self.client = None

    def plan(self, body: dict, chat: bool, key: str | None) -> Plan:
        model = body.get("model")
        left = self.budgets.left(key)
        if left is not None and left <= 0:
            self.metrics.refused += 1
            raise RequestError(429, f"budget exhausted for {'key' if key in self.cfg.key_budgets else 'the server'}",
                               "insufficient_quota", code="budget_exceeded")
        if isinstance(model, str) and model in self.cfg.backends:
            prompt_of(body, chat)
            return Plan(None, [model], {}, 0.0)
        name, kind, value = parse_model(model, self.routers, self.default_tradeoff)
        text = prompt_of(body, chat)
        t0 = time.perf_counter()
        order, est = plan_route(self.routers[name], text, kind, value, set(self.cfg.backends), left)
        dt = time.perf_counter() - t0
        self.metrics.observe_routing(dt)
        if not order:
            self.metrics.refused += 1
            why = f"budget {value} USD" if kind == "budget" else "the remaining budget"
            raise RequestError(429, f"no model's estimated cost for this prompt fits {why}", "insufficient_quota",
                               code="budget_exceeded")
        return Plan(name, order, est, dt * 1e3)

    async def _post(self, be: Backend, path: str, body: dict, stream: bool):
        import httpx2 as httpx

        headers = {"content-type": "application/json"}
        if be.api_key:
            headers["authorization"] = f"Bearer {be.api_key}"
        req = self.client.build_request("POST", f"{be.base_url}{path}", json={**body, "model": be.model},
                                        headers=headers, timeout=httpx.Timeout(be.timeout_s))
        return await self.client.send(req, stream=stream)

    async def forward(self, plan: Plan, body: dict, path: str, stream: bool):
        """(response, model, attempts): the first backend that answers without a retryable error."""
        import httpx2 as httpx

        attempts = []
        for m in plan.order:
            be = self.cfg.backends[m]
            try:
                resp = await self._post(be, path, body, stream)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                attempts.append({"model": m, "error": type(e).__name__})
                self.metrics.count(m, "failed")
                continue
            if resp.status_code in RETRY_STATUS:
                attempts.append({"model": m, "error": f"HTTP {resp.status_code}"})
                self.metrics.count(m, "failed")
                await resp.aclose()
                continue
            return resp, m, attempts
        raise RequestError(502, f"every backend failed: {attempts}", "api_error", code="backends_failed")

    def routing_info(self, plan: Plan, model: str, attempts: list) -> dict:
        return {"router": plan.router, "model": model, "fallback": bool(attempts), "attempts": attempts,
                "routing_ms": round(plan.routing_ms, 4), "estimated_cost_usd": plan.est_cost.get(model)}

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        async def startup():
            import httpx2 as httpx

            self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

        async def shutdown():
            if self.client is not None:
                await self.client.aclose()

        routes = [Route("/v1/chat/completions", self._endpoint(True), methods=["POST"]),
                  Route("/v1/completions", self._endpoint(False), methods=["POST"]),
                  Route("/v1/models", self._models, methods=["GET"]),
                  Route("/health", self._health, methods=["GET"]),
                  Route("/metrics", self._metrics, methods=["GET"])]
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app):
            await startup()
            yield
            await shutdown()

        app = Starlette(routes=routes, lifespan=lifespan)
        app.add_exception_handler(404, _not_found)
        app.add_exception_handler(405, _not_allowed)
        return app

    def _endpoint(self, chat: bool):
        path = "/chat/completions" if chat else "/completions"

        async def handle(request):
            from starlette.responses import JSONResponse

            try:
                body = await _json_body(request)
                plan = self.plan(body, chat, _client_key(request))
                if body.get("stream"):
                    return await self._stream(plan, body, path, _client_key(request))
                resp, model, attempts = await self.forward(plan, body, path, False)
                return await self._finish(resp, plan, model, attempts, _client_key(request))
            except RequestError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except MoelabError as e:  # e.g. a prompt the router cannot featurize
                return JSONResponse(RequestError(400, str(e)).body(), status_code=400)
            except Exception as e:  # noqa: BLE001 - an OpenAI-format 500 instead of a bare traceback
                return JSONResponse(RequestError(500, f"{type(e).__name__}: {e}", "api_error").body(), status_code=500)

        return handle

    async def _finish(self, resp, plan: Plan, model: str, attempts: list, key):
        from starlette.responses import JSONResponse

        try:
            data = resp.json()
        except ValueError:
            raise RequestError(502, f"backend {model!r} returned non-JSON (HTTP {resp.status_code})", "api_error") from None
        if resp.status_code >= 400:  # a non-retryable backend error (e.g. 400): passed through
            self.metrics.count(model, f"http_{resp.status_code}")
            return JSONResponse(data, status_code=resp.status_code)
        info = self.routing_info(plan, model, attempts)
        usd = charge_usd(self.cfg.backends[model], data.get("usage"), plan.est_cost.get(model, 0.0))
        self.budgets.charge(key, usd)
        self.metrics.count(model, "ok", usd, bool(attempts))
        data["routing"] = {**info, "charged_usd": usd}
        return JSONResponse(data, headers=_headers(info))

    async def _stream(self, plan: Plan, body: dict, path: str, key):
        from starlette.responses import StreamingResponse

        resp, model, attempts = await self.forward(plan, body, path, True)
        info = self.routing_info(plan, model, attempts)
        if resp.status_code >= 400:
            data = json.loads((await resp.aread()) or b"{}")
            await resp.aclose()
            from starlette.responses import JSONResponse

            self.metrics.count(model, f"http_{resp.status_code}")
            return JSONResponse(data, status_code=resp.status_code)
        usd = plan.est_cost.get(model, 0.0)
        self.budgets.charge(key, usd)
        self.metrics.count(model, "ok", usd, bool(attempts))

        async def body_iter():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(body_iter(), media_type="text/event-stream", headers=_headers(info))

    async def _models(self, request):
        from starlette.responses import JSONResponse

        now = int(time.time())
        ids = [f"router-{n}-{self.default_tradeoff}" for n in self.routers] + ["auto"] + sorted(self.cfg.backends)
        return JSONResponse({"object": "list", "data": [{"id": i, "object": "model", "created": now,
                                                         "owned_by": "moelab"} for i in ids]})

    async def _health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "routers": {n: r.models for n, r in self.routers.items()},
                             "backends": sorted(self.cfg.backends)})

    async def _metrics(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")


def _headers(info: dict) -> dict:
    return {"x-moelab-routed-model": info["model"], "x-moelab-fallback": str(info["fallback"]).lower(),
            "x-moelab-router": str(info["router"])}


def _client_key(request) -> str | None:
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        return None
    return auth[7:].strip() or None


async def _json_body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


async def _not_found(request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse(RequestError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)


async def _not_allowed(request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse(RequestError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                        status_code=405)


def build_app(router_dir, backends_toml, default_tradeoff: float = 0.5, env=None):
    """The ASGI app for a router folder and a backends TOML (used by the CLI and the tests)."""
    return RoutingService(load_routers(router_dir), load_config(backends_toml, env), default_tradeoff).app()


def main_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise MoelabError("`moelab route serve` needs the 'serve' extra: pip install 'moelab[serve]' "
                          "(starlette, uvicorn, httpx2)") from None
    from moelab.errors import check_range

    check_range("default_tradeoff", args.default_tradeoff, low=0.0, high=1.0)
    app = build_app(args.router_dir, args.backends, args.default_tradeoff)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
