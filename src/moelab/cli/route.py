"""`moelab route`: model-level routing (choose which LLM answers each prompt). The help text is
DESCRIPTION below (plain text: argparse prints it as is)."""

from __future__ import annotations

import argparse
import json
import sys

from moelab.errors import MoelabError


DESCRIPTION = """Model-level routing: learn which LLM should answer each prompt from logged scores and costs.

  moelab route routers                                   list routers (name, paper, options)
  moelab route compare --data routellm-mmlu --routers knn,mf,carrot --out runs/route-mmlu
  moelab route fit carrot --data routellm-gsm8k --out runs/carrot-gsm8k
  moelab route predict runs/carrot-gsm8k --prompt "What is 2+2?" [--tradeoff 0.3 | --budget 1e-4]
  moelab route serve runs/ROUTERS --backends backends.toml --port 8000   (OpenAI-compatible server)

Data files are CSV, JSONL or Parquet; a pandas pickle is read only with --allow-pickle (unpickling
runs any code in the file). Hyperparameters in each router's CV grid are tuned by 3-fold
cross-validation on the training data unless --no-tune (options given with --option stay fixed)."""

SUB_DESCRIPTIONS = {
    "routers": "List the registered model routers: name, one-line description, paper and options with their "
               "defaults.",
    "compare": "Split the data into train and test prompts, CV-tune and fit every router on the training split, "
               "sweep each over its cost-quality trade-off on the test split, and print a table of AIQ, gap "
               "closed, APGR, CPT, arena score and quality at fixed budgets (95% bootstrap CIs). With --out, also "
               "write results.json and report.html.",
    "fit": "Fit one router on the whole dataset (CV-tuning its grid unless --no-tune) and save it as a folder "
           "(router.json + tensors.safetensors, no pickle) for `moelab route predict` and `moelab route serve`.",
    "predict": "Route new prompts with a saved router: prints one JSON line per prompt with the chosen model and "
               "the router's estimated quality and cost of that choice, then a summary line on stderr.",
}


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


def _featurizer(args):
    """--embedding-model FOLDER: a local sentence-transformers / model2vec model instead of TF-IDF."""
    if not getattr(args, "embedding_model", None):
        return None
    from moelab.route.features import LocalEmbeddingFeaturizer

    return LocalEmbeddingFeaturizer(args.embedding_model)


def _load(args):
    from moelab.route.data import load_dataset

    ds = load_dataset(args.data, max_prompts=args.max_prompts, allow_pickle=args.allow_pickle)
    return ds.select_models(args.models.split(",")) if args.models else ds


def _cmd_compare(args) -> int:
    from moelab.route.evaluate import compare, format_table, validate_plan, write_report
    from moelab.route.features import default_cache_dir

    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    opts = _parse_options(args.option)
    ds = _load(args)
    validate_plan(ds, routers, opts)
    res = compare(ds, routers, test_frac=args.test_frac, group_by=args.group_by, seed=args.seed,
                  n_boot=args.bootstrap, feature_dim=args.feature_dim, router_options=opts,
                  cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
                  log=lambda s: print(s, file=sys.stderr), tune=not args.no_tune, cv_folds=args.cv_folds,
                  featurizer=_featurizer(args))
    print(format_table(res))
    if args.out:
        paths = write_report(res, args.out)
        print(f"\nwrote {paths['json']} and {paths['html']}")
    return 0


def _cmd_fit(args) -> int:
    from moelab.route.base import MODEL_ROUTERS, build_router
    from moelab.route.features import TfidfSvdFeaturizer, default_cache_dir

    cls = MODEL_ROUTERS.get(args.router)
    if cls.uses_truth:
        raise MoelabError(f"router {args.router!r} reads the true scores of the prompts it routes, so a fitted "
                          "copy cannot route new prompts; use it in `moelab route compare` as the upper bound")
    opts = _parse_options(args.option)
    extra = sorted(set(opts) - {args.router})
    if extra:
        raise MoelabError(f"--option given for router(s) {extra}; this command fits {args.router!r} only")
    build_router(args.router, **opts.get(args.router, {}))  # unknown options fail before loading data
    ds = _load(args)
    if cls.two_model and len(ds.models) != 2:
        raise MoelabError(f"router {args.router!r} routes between two models; the data has {len(ds.models)} "
                          f"({', '.join(ds.models)}); pick two with --models A,B")
    feat = _featurizer(args)
    if cls.needs_features and feat is None:
        print(f"fitting TF-IDF+SVD features on {ds.n_prompts} prompts ...", file=sys.stderr)
        cache = None if args.no_cache else default_cache_dir()
        feat = TfidfSvdFeaturizer(dim=args.feature_dim).fit_cached(ds.require_texts(), cache)
    chosen = {}
    if not args.no_tune:
        from moelab.route.tuning import tune_router

        x = feat.transform(ds.require_texts()) if cls.needs_features else None
        print(f"cross-validating {args.router}'s grid ({args.cv_folds} folds) ...", file=sys.stderr)
        chosen = tune_router(args.router, ds, x, fixed=opts.get(args.router, {}), folds=args.cv_folds)["chosen"]
    r = build_router(args.router, **{**opts.get(args.router, {}), **chosen})
    r.fit(ds, featurizer=feat)
    path = r.save(args.out)
    tuned = f"; CV-tuned {chosen}" if chosen else ""
    print(f"fitted {args.router} on {ds.n_prompts} prompts of {ds.name}{tuned}; saved to {path}")
    return 0


def _cmd_predict(args) -> int:
    from moelab.route.base import load_router

    r = load_router(args.router_dir)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [ln.rstrip("\n") for ln in open(args.prompts_file) if ln.strip()]
    if not prompts:
        raise MoelabError("give at least one --prompt or --prompts-file")
    ex = r.route_explained(prompts, tradeoff=args.tradeoff, budget=args.budget)
    for p, line in zip(prompts, _predictions(r, ex, args.all_models)):
        print(json.dumps({"prompt": p[:80], **line}))
    print(_predict_summary(r, ex, args), file=sys.stderr)
    return 0


def _predictions(r, ex: dict, all_models: bool) -> list[dict]:
    """One record per prompt: the chosen model and the router's estimates for it (and for every
    model with --all-models)."""
    out = []
    for p, i in enumerate(ex["idx_P"]):
        d = {"model": r.models[int(i)], "est_quality": round(float(ex["quality_P"][p]), 4),
             "est_cost_usd": float(f"{ex['cost_P'][p]:.4g}")}
        if all_models:
            d["estimates"] = {m: {"quality": round(float(ex["q_PM"][p, j]), 4),
                                  "cost_usd": float(f"{ex['c_PM'][p, j]:.4g}")} for j, m in enumerate(r.models)}
        out.append(d)
    return out


def _predict_summary(r, ex: dict, args) -> str:
    """Why these models: the setting used and the mean estimated quality and cost it buys."""
    from collections import Counter

    setting = f"budget ${args.budget:g} per prompt" if args.budget is not None else f"tradeoff {args.tradeoff:g}"
    counts = Counter(r.models[int(i)] for i in ex["idx_P"])
    picked = ", ".join(f"{m} x{n}" for m, n in counts.most_common())
    return (f"{r.name} at {setting}: {picked}; estimated mean quality {ex['quality_P'].mean():.3f}, "
            f"estimated mean cost ${ex['cost_P'].mean():.3g} per prompt (the router's estimates, not measurements)")


def register(subparsers) -> None:
    p = subparsers.add_parser("route", help="model-level routing: choose which LLM answers each prompt",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="route_command", metavar="ROUTE_COMMAND")

    s = sub.add_parser("routers", help="list the registered model routers", description=SUB_DESCRIPTIONS["routers"])
    s.add_argument("--json", action="store_true", help="print the list as JSON (for scripts)")
    s.set_defaults(func=_cmd_routers)

    def data_args(s):
        s.add_argument("--data", required=True,
                       help="routellm-mmlu, routellm-gsm8k, routerarena, a file, a folder, or comma-separated "
                            "files (RouterBench schema or long format; CSV, JSONL, Parquet)")
        s.add_argument("--models", help="comma-separated subset of the dataset's models (two for the "
                                        "strong/weak routers threshold and cascade)")
        s.add_argument("--max-prompts", type=int, help="deterministic subset of this many prompts")
        s.add_argument("--feature-dim", type=int, default=128, help="TF-IDF+SVD feature dimension")
        s.add_argument("--embedding-model", help="local sentence-transformers or model2vec folder to embed "
                                                 "prompts with, instead of TF-IDF+SVD (nothing is downloaded)")
        s.add_argument("--option", action="append", help="ROUTER.key=value router option (repeatable); fixes "
                                                         "that option (it is then not CV-tuned)")
        s.add_argument("--no-cache", action="store_true", help="do not cache prompt features")
        s.add_argument("--allow-pickle", action="store_true",
                       help="allow reading a pandas pickle as data (unpickling runs any code in the file: "
                            "trusted files only; CSV/Parquet/JSONL need no flag)")
        s.add_argument("--no-tune", action="store_true", help="skip cross-validated tuning of the routers' grids")
        s.add_argument("--cv-folds", type=int, default=3, help="folds for the tuning cross-validation")

    s = sub.add_parser("compare", help="fit routers, sweep cost–quality curves, print/write a report", description=SUB_DESCRIPTIONS["compare"])
    data_args(s)
    s.add_argument("--routers", default="random,best-single,cheapest,knn,linear,mf,carrot",
                   help="comma-separated router names (see `moelab route routers`); the oracle is always "
                        "evaluated as the upper bound")
    s.add_argument("--out", help="folder for results.json and report.html")
    s.add_argument("--test-frac", type=float, default=0.3,
                   help="fraction of prompts (or groups, with --group-by) held out for testing")
    s.add_argument("--group-by", default="prompt", choices=["prompt", "source", "category"],
                   help="split whole sources/categories into train or test (with few groups this is "
                        "leave-groups-out; a warning says how many)")
    s.add_argument("--seed", type=int, default=0, help="seed of the hash split, CV folds and bootstrap")
    s.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for 95%% CIs")
    s.add_argument("--cache-dir", help="feature cache (default $MOELAB_CACHE/route or ~/.cache/moelab/route)")
    s.set_defaults(func=_cmd_compare)

    s = sub.add_parser("fit", help="fit a router on a whole dataset and save it (JSON + safetensors)", description=SUB_DESCRIPTIONS["fit"])
    s.add_argument("router", help="router name (see `moelab route routers`)")
    data_args(s)
    s.add_argument("--out", required=True, help="folder to save the router to")
    s.set_defaults(func=_cmd_fit)

    s = sub.add_parser("predict", help="route new prompts with a saved router", description=SUB_DESCRIPTIONS["predict"])
    s.add_argument("router_dir", help="folder written by `moelab route fit`")
    s.add_argument("--prompt", action="append", help="a prompt to route (repeatable)")
    s.add_argument("--prompts-file", help="text file, one prompt per line")
    s.add_argument("--tradeoff", type=float, default=0.5, help="0 = quality only, 1 = cost only")
    s.add_argument("--budget", type=float, help="mean USD per prompt (overrides --tradeoff)")
    s.add_argument("--all-models", action="store_true",
                   help="also print every model's estimated quality and cost for each prompt (why this model)")
    s.set_defaults(func=_cmd_predict)

    from moelab.cli import route_serve

    route_serve.register(sub)
    p.set_defaults(func=lambda a: (p.print_help(), 0)[1])
