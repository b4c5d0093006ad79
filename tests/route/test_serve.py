"""``moelab route serve``: the official ``openai`` client against the routing server, with backends
that are real HTTP servers on loopback (stdlib http.server: canned, failing, slow)."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client is needed for the server tests")
uvicorn = pytest.importorskip("uvicorn", reason="the 'serve' extra (uvicorn) is not installed")
pytest.importorskip("starlette", reason="the 'serve' extra (starlette) is not installed")
httpx = pytest.importorskip("httpx2", reason="the 'serve' extra (httpx2) is not installed")

from moelab.errors import MoelabError  # noqa: E402
from moelab.route import build_router  # noqa: E402
from moelab.route.serve import build_app, load_config  # noqa: E402
from moelab.route.synthetic import topic_dataset  # noqa: E402


def _answer(name, body, chat):
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    if chat:
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"canned answer from {name}"}}]}
    return {"id": "t1", "object": "text_completion", "created": 0, "model": body["model"], "usage": usage,
            "choices": [{"index": 0, "text": f"canned text from {name}", "finish_reason": "stop", "logprobs": None}]}


def _chunks(name, body):
    for i, piece in enumerate(["canned ", "answer ", f"from {name}"]):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        yield {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _handler(name, mode, delay_s=0.0):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, code, payload, ctype="application/json"):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            self.server.seen.append({"path": self.path, "model": body.get("model"),
                                     "auth": self.headers.get("authorization")})
            if mode == "fail":
                return self._send(500, {"error": {"message": "backend exploded", "type": "server_error"}})
            time.sleep(delay_s)
            chat = self.path.endswith("/chat/completions")
            if body.get("stream"):
                sse = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in _chunks(name, body)) + b"data: [DONE]\n\n"
                return self._send(200, sse, "text/event-stream")
            self._send(200, _answer(name, body, chat))

    return H


def _serve_thread(server):
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    backends = {}
    for name, mode, delay in (("A", "ok", 0.0), ("F", "fail", 0.0), ("S", "ok", 2.0)):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(name, mode, delay))
        srv.seen, srv.daemon_threads = [], True
        _serve_thread(srv)
        backends[name] = srv
    # model0 is best on algebra, model1 on poetry, model2 on history (costs rise with the index)
    ds = topic_dataset(n=600, n_models=3, seed=0)
    build_router("knn", k=10).fit(ds).save(tmp / "routers" / "knn")
    build_router("carrot").fit(ds).save(tmp / "routers" / "carrot")
    url = lambda n: f"http://127.0.0.1:{backends[n].server_address[1]}/v1"  # noqa: E731
    (tmp / "backends.toml").write_text(f"""
[server]
timeout_s = 5

[keys]
"tight-key" = 1e-12

[models.model0]
base_url = "{url('A')}"
api_key_env = "MOELAB_TEST_KEY_A"
model = "backend-a"
price_in = 1.0
price_out = 2.0

[models.model1]
base_url = "{url('F')}"

[models.model2]
base_url = "{url('S')}"
timeout_s = 0.3
""")
    app = build_app(tmp / "routers", tmp / "backends.toml", env={"MOELAB_TEST_KEY_A": "sk-backend-a"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "backends": backends, "url": url, "tmp": tmp,
           "client": openai.OpenAI(base_url=f"{base}/v1", api_key="client-key", max_retries=0)}
    server.should_exit = True
    th.join(timeout=10)
    for srv in backends.values():
        srv.shutdown()


def test_routes_and_forwards_with_the_official_client(stack):
    raw = stack["client"].chat.completions.with_raw_response.create(
        model="router-knn-0.0", messages=[{"role": "user", "content": "algebra algebra question please"}])
    resp = raw.parse()
    assert resp.choices[0].message.content == "canned answer from A"
    assert raw.headers["x-moelab-routed-model"] == "model0" and raw.headers["x-moelab-fallback"] == "false"
    assert resp.model_extra["routing"]["model"] == "model0"
    assert resp.model_extra["routing"]["charged_usd"] == pytest.approx((10 * 1.0 + 5 * 2.0) / 1e6)
    seen = stack["backends"]["A"].seen[-1]
    assert seen["model"] == "backend-a" and seen["auth"] == "Bearer sk-backend-a"  # key from the env var


def test_text_completions_and_models_and_health(stack):
    c = stack["client"]
    r = c.completions.create(model="router-carrot-0.0", prompt="algebra algebra explain")
    assert r.choices[0].text == "canned text from A"
    ids = [m.id for m in c.models.list().data]
    assert "router-knn-0.5" in ids and "model0" in ids
    h = httpx.get(stack["base"] + "/health").json()
    assert h["status"] == "ok" and set(h["routers"]) == {"knn", "carrot"}


def test_streaming(stack):
    stream = stack["client"].chat.completions.create(
        model="router-knn-0.0", messages=[{"role": "user", "content": "algebra algebra algebra"}], stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text == "canned answer from A"


@pytest.mark.parametrize("prompt,bad", [("poetry poetry please", "model1"), ("history history please", "model2")])
def test_failing_and_slow_backends_fall_back(stack, prompt, bad):
    raw = stack["client"].chat.completions.with_raw_response.create(
        model="router-knn-0.0", messages=[{"role": "user", "content": prompt}])
    info = raw.parse().model_extra["routing"]
    assert info["fallback"] is True and info["attempts"][0]["model"] == bad
    assert raw.headers["x-moelab-fallback"] == "true" and info["model"] != bad
    assert raw.parse().choices[0].message.content.startswith("canned answer from")


def test_budget_refusals(stack):
    tight = openai.OpenAI(base_url=stack["base"] + "/v1", api_key="tight-key", max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        tight.chat.completions.create(model="router-knn-0.5", messages=[{"role": "user", "content": "algebra"}])
    assert e.value.body["type"] == "insufficient_quota" and e.value.body["code"] == "budget_exceeded"
    with pytest.raises(openai.RateLimitError):
        stack["client"].chat.completions.create(model="router-knn-budget-0.0000000001",
                                                messages=[{"role": "user", "content": "algebra"}])
    ok = stack["client"].chat.completions.create(model="router-knn-budget-1.0",
                                                 messages=[{"role": "user", "content": "algebra algebra"}])
    assert ok.model_extra["routing"]["model"] == "model0"


def test_malformed_requests_get_openai_format_4xx(stack):
    c = stack["client"]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="router-nope-0.5", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="router-knn-1.5", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="router-knn-0.5", messages=[])
    assert e.value.body["param"] == "messages"
    r = httpx.post(stack["base"] + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(stack["base"] + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_metrics_exposition(stack):
    stack["client"].chat.completions.create(model="router-knn-0.0", messages=[{"role": "user", "content": "algebra"}])
    txt = httpx.get(stack["base"] + "/metrics").text
    assert 'moelab_requests_total{model="model0",status="ok"}' in txt
    assert "moelab_routing_latency_seconds_count" in txt and 'moelab_cost_usd_total{model="model0"}' in txt


def test_config_errors(tmp_path):
    p = tmp_path / "b.toml"
    p.write_text('[models.m]\nbase_url = "http://x"\napi_key = "sk-in-file"\n')
    with pytest.raises(MoelabError, match="api_key_env"):
        load_config(p)
    p.write_text('[models.m]\nbase_url = "http://x"\napi_key_env = "NOPE_NOT_SET"\n')
    with pytest.raises(MoelabError, match="NOPE_NOT_SET"):
        load_config(p, env={})
    p.write_text("[models.m\n")
    with pytest.raises(MoelabError, match="not valid TOML"):
        load_config(p)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_bounded_concurrency_overhead(stack, capsys):
    """200 requests, 20 at a time, through the router and straight to the backend; reports the
    routing overhead (p50/p99); timings are printed, not asserted."""
    msgs = [{"role": "user", "content": f"algebra algebra question {i}"} for i in range(200)]
    via = openai.OpenAI(base_url=stack["base"] + "/v1", api_key="client-key", max_retries=0)
    direct = openai.OpenAI(base_url=stack["url"]("A"), api_key="sk-backend-a", max_retries=0)
    with ThreadPoolExecutor(20) as ex:
        routed = list(ex.map(lambda m: _timed(lambda: via.chat.completions.create(
            model="router-knn-0.0", messages=[m])), msgs))
        plain = list(ex.map(lambda m: _timed(lambda: direct.chat.completions.create(
            model="backend-a", messages=[m])), msgs))
    txt = httpx.get(stack["base"] + "/metrics").text
    n_ok = int(next(ln for ln in txt.splitlines() if ln.startswith('moelab_requests_total{model="model0",status="ok"}')).split()[-1])
    assert n_ok >= 200 and len(routed) == len(plain) == 200
    val = lambda k: float(next(ln for ln in txt.splitlines() if ln.startswith(k + " ")).split()[-1])  # noqa: E731
    route_ms = 1e3 * val("moelab_routing_latency_seconds_sum") / val("moelab_routing_latency_seconds_count")
    r, p = np.array(routed) * 1e3, np.array(plain) * 1e3
    line = (f"serve overhead, 200 requests at concurrency 20 (under load): routed p50 {np.percentile(r, 50):.1f} ms "
            f"p99 {np.percentile(r, 99):.1f} ms; direct p50 {np.percentile(p, 50):.1f} ms p99 {np.percentile(p, 99):.1f} ms; "
            f"overhead p50 {np.percentile(r, 50) - np.percentile(p, 50):.1f} ms p99 {np.percentile(r, 99) - np.percentile(p, 99):.1f} ms; "
            f"routing decision itself (features + router) mean {route_ms:.3f} ms; client, server and backends share "
            "one Python process")
    with capsys.disabled():
        print("\n" + line)
    (stack["tmp"] / "overhead.txt").write_text(line)
