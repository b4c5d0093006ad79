"""Routing-server overhead: 200 chat requests, 20 at a time, through ``moelab route serve`` and
straight to the backend, each in its own process (client, router server, canned backend).

Run: ``python benchmarks/route_serve.py`` (``--quick``: 60 requests). Needs the 'serve' extra and
the openai client. Writes benchmarks/results/route_serve.{json,md}. The backend is a stdlib HTTP
server returning a canned completion at once, so the difference is the router's overhead: parsing,
routing (features + kNN), forwarding and the extra HTTP hop.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np


class Canned(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": "canned"}}],
                          "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 120.0) -> None:
    import httpx2 as httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def _run(client, model, n, conc):
    msgs = [[{"role": "user", "content": f"algebra question number {i}"}] for i in range(n)]

    def one(m):
        t0 = time.perf_counter()
        client.chat.completions.create(model=model, messages=m)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(conc) as ex:
        return np.array(list(ex.map(one, msgs))) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", type=int, help=argparse.SUPPRESS)  # internal: run the canned backend
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "route_serve"))
    args = ap.parse_args()
    if args.backend:
        ThreadingHTTPServer(("127.0.0.1", args.backend), Canned).serve_forever()
        return
    import openai

    from moelab.route import build_router
    from moelab.route.synthetic import topic_dataset

    n = 60 if args.quick else 200
    tmp = Path(tempfile.mkdtemp())
    ds = topic_dataset(n=2000, n_models=3, seed=0)
    build_router("knn").fit(ds).save(tmp / "knn")
    bport, sport = _free_port(), _free_port()
    toml = "".join(f'[models.model{j}]\nbase_url = "http://127.0.0.1:{bport}/v1"\n' for j in range(3))
    (tmp / "b.toml").write_text(toml)
    procs = [subprocess.Popen([sys.executable, __file__, "--backend", str(bport)])]
    procs.append(subprocess.Popen([sys.executable, "-m", "moelab.cli.main", "route", "serve", str(tmp / "knn"),
                                   "--backends", str(tmp / "b.toml"), "--port", str(sport)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        _wait(f"http://127.0.0.1:{sport}/health")
        via = openai.OpenAI(base_url=f"http://127.0.0.1:{sport}/v1", api_key="x", max_retries=0)
        direct = openai.OpenAI(base_url=f"http://127.0.0.1:{bport}/v1", api_key="x", max_retries=0)
        _run(via, "router-knn-0.0", 20, 20), _run(direct, "model0", 20, 20)  # warm-up
        routed, plain = _run(via, "router-knn-0.0", n, 20), _run(direct, "model0", n, 20)
    finally:
        for p in procs:
            p.terminate()
    pct = lambda v, q: float(np.percentile(v, q))  # noqa: E731
    res = {"n": n, "concurrency": 20, "routed_p50_ms": pct(routed, 50), "routed_p99_ms": pct(routed, 99),
           "direct_p50_ms": pct(plain, 50), "direct_p99_ms": pct(plain, 99),
           "overhead_p50_ms": pct(routed, 50) - pct(plain, 50), "overhead_p99_ms": pct(routed, 99) - pct(plain, 99),
           "load_avg": os.getloadavg()[0], "when": time.strftime("%Y-%m-%d %H:%M")}
    line = (f"{n} requests at concurrency 20 ({res['when']}, load avg {res['load_avg']:.1f}): routed p50 "
            f"{res['routed_p50_ms']:.1f} ms, p99 {res['routed_p99_ms']:.1f} ms; direct p50 {res['direct_p50_ms']:.1f} ms, "
            f"p99 {res['direct_p99_ms']:.1f} ms; overhead p50 {res['overhead_p50_ms']:.1f} ms, p99 {res['overhead_p99_ms']:.1f} ms")
    print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    Path(args.out + ".md").write_text("# moelab route serve overhead (separate processes)\n\n" + line + "\n")


if __name__ == "__main__":
    main()
