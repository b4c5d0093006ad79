"""``moelab route serve``: an OpenAI-compatible routing server (see :mod:`moelab.route.serve`)."""

from __future__ import annotations


def _cmd_serve(args) -> int:
    from moelab.route.serve import main_serve

    return main_serve(args)


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server that routes each request to a backend LLM",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and "
                                   "/metrics. The request's model names the router and its operating point "
                                   "(router-knn-0.3, router-carrot-budget-0.002, or 'auto'). Needs the "
                                   "'serve' extra: pip install 'moelab[serve]'.")
    s.add_argument("router_dir", help="a router folder from `moelab route fit`, or a folder of such folders")
    s.add_argument("--backends", required=True, help="TOML file: one [models.NAME] table per model with "
                                                     "base_url, api_key_env, timeout_s (keys come from env vars)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--default-tradeoff", type=float, default=0.5, help="trade-off for model='auto'")
    s.set_defaults(func=_cmd_serve)
