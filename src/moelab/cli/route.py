"""``moelab route``: model-level routing (choose which LLM answers each prompt).

    moelab route routers                                   list routers (name, paper, options)
    moelab route compare --data routellm-mmlu --routers knn,mf,carrot --out runs/route-mmlu
    moelab route fit carrot --data routellm-gsm8k --out runs/carrot-gsm8k
    moelab route predict runs/carrot-gsm8k --prompt "What is 2+2?" [--tradeoff 0.3 | --budget 1e-4]
"""

from __future__ import annotations

import argparse
import json
import sys

from moelab.errors import MoelabError


def _parse_options(items: list[str] | None) -> dict:
    """``ROUTER.key=value`` strings -> {router: {key: value}} (value parsed as JSON when possible)."""
    out: dict[str, dict] = {}
    for it in items or []:
        if "=" not in it or "." not in it.split("=", 1)[0]:
            raise MoelabError(f"--option={it!r} is not ROUTER.key=value (e.g. knn.k=40)")
        lhs, val = it.split("=", 1)
        router, key = lhs.split(".", 1)
        try:
            v = json.loads(val)
        except json.JSONDecodeError:
            v = val
        out.setdefault(router, {})[key] = v
    return out


def _cmd_routers(args) -> int:
    from moelab.route.routers import router_info

    info = router_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for r in info:
        print(f"{r['name']:12s} {r['description']}\n{'':12s} paper: {r['paper']}")
        if r["options"]:
            print(f"{'':12s} options: " + ", ".join(f"{k}={v}" for k, v in r["options"].items()))
    return 0


def _cmd_compare(args) -> int:
    from moelab.route.data import load_dataset
    from moelab.route.evaluate import compare, format_table, write_report
    from moelab.route.features import default_cache_dir

    ds = load_dataset(args.data, max_prompts=args.max_prompts, allow_pickle=args.allow_pickle)
    if args.models:
        ds = ds.select_models(args.models.split(","))
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    res = compare(ds, routers, test_frac=args.test_frac, group_by=args.group_by, seed=args.seed,
                  n_boot=args.bootstrap, feature_dim=args.feature_dim, router_options=_parse_options(args.option),
                  cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
                  log=lambda s: print(s, file=sys.stderr))
    print(format_table(res))
    if args.out:
        paths = write_report(res, args.out)
        print(f"\nwrote {paths['json']} and {paths['html']}")
    return 0


def _cmd_fit(args) -> int:
    from moelab.route.base import build_router
    from moelab.route.data import load_dataset
    from moelab.route.features import TfidfSvdFeaturizer, default_cache_dir

    ds = load_dataset(args.data, max_prompts=args.max_prompts, allow_pickle=args.allow_pickle)
    if args.models:
        ds = ds.select_models(args.models.split(","))
    r = build_router(args.router, **_parse_options(args.option).get(args.router, {}))
    feat = None
    if r.needs_features:
        cache = None if args.no_cache else default_cache_dir()
        feat = TfidfSvdFeaturizer(dim=args.feature_dim).fit_cached(ds.require_texts(), cache)
    r.fit(ds, featurizer=feat)
    path = r.save(args.out)
    print(f"fitted {args.router} on {ds.n_prompts} prompts of {ds.name}; saved to {path}")
    return 0


def _cmd_predict(args) -> int:
    from moelab.route.base import load_router

    r = load_router(args.router_dir)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [ln.rstrip("\n") for ln in open(args.prompts_file) if ln.strip()]
    if not prompts:
        raise MoelabError("give at least one --prompt or --prompts-file")
    if r.uses_truth:
        raise MoelabError(f"router {r.name!r} needs true scores; it cannot route new prompts")
    idx = r.route(prompts, tradeoff=args.tradeoff, budget=args.budget)
    for p, i in zip(prompts, idx):
        print(json.dumps({"prompt": p[:80], "model": r.models[int(i)]}))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("route", help="model-level routing: choose which LLM answers each prompt",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="route_command", metavar="ROUTE_COMMAND")

    s = sub.add_parser("routers", help="list the registered model routers")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_routers)

    def data_args(s):
        s.add_argument("--data", required=True,
                       help="routellm-mmlu, routellm-gsm8k, routerarena, a file, a folder, or comma-separated "
                            "files (RouterBench schema or long format; CSV, JSONL, Parquet)")
        s.add_argument("--models", help="comma-separated subset of the dataset's models")
        s.add_argument("--max-prompts", type=int, help="deterministic subset of this many prompts")
        s.add_argument("--feature-dim", type=int, default=128)
        s.add_argument("--option", action="append", help="ROUTER.key=value router option (repeatable)")
        s.add_argument("--no-cache", action="store_true", help="do not cache prompt features")
        s.add_argument("--allow-pickle", action="store_true",
                       help="allow reading a pandas pickle as data (unpickling runs any code in the file: "
                            "trusted files only; CSV/Parquet/JSONL need no flag)")

    s = sub.add_parser("compare", help="fit routers, sweep cost–quality curves, print/write a report")
    data_args(s)
    s.add_argument("--routers", default="random,best-single,cheapest,knn,linear,mf,carrot")
    s.add_argument("--out", help="folder for results.json and report.html")
    s.add_argument("--test-frac", type=float, default=0.3)
    s.add_argument("--group-by", default="prompt", choices=["prompt", "source", "category"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for 95%% CIs")
    s.add_argument("--cache-dir", help="feature cache (default $MOELAB_CACHE/route or ~/.cache/moelab/route)")
    s.set_defaults(func=_cmd_compare)

    s = sub.add_parser("fit", help="fit a router on a whole dataset and save it (JSON + safetensors)")
    s.add_argument("router")
    data_args(s)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_fit)

    s = sub.add_parser("predict", help="route new prompts with a saved router")
    s.add_argument("router_dir")
    s.add_argument("--prompt", action="append")
    s.add_argument("--prompts-file")
    s.add_argument("--tradeoff", type=float, default=0.5, help="0 = quality only, 1 = cost only")
    s.add_argument("--budget", type=float, help="mean USD per prompt (overrides --tradeoff)")
    s.set_defaults(func=_cmd_predict)
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])
