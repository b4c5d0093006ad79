"""``moelab reroute`` (test-time re-routing with reference samples or self-supervision) and
``moelab steer`` (a router-logit bias toward a domain's experts): moelab.ops.reroute."""

from __future__ import annotations

import argparse

from moelab.errors import MoelabError

METHODS = ("r2t2", "c3po", "rewire")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory (moelab-trained, or an imported model's run)")
    p.add_argument("--eval", default="test", metavar="DATA",
                   help="evaluation windows: a split of the run's corpus (train/val/test) or a data source path "
                        "(default: test)")
    p.add_argument("--limit", type=int, default=16, help="windows per domain, for evaluation and reference (default 16)")
    p.add_argument("--layers", metavar="LIST", help="comma-separated MoE block indices to act on (default: all)")
    p.add_argument("--out", metavar="DIR", help="also write NAME.json and NAME.md here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reroute", help="re-route a trained MoE model at test time (R2-T2, C3PO, rewiring)",
                       description="Change only the routing of each test window (router-logit offsets found from "
                                   "its prompt and, for r2t2/c3po, its successful neighbours in --reference), score "
                                   "the continuation, and compare with the unmodified model: perplexity per domain "
                                   "and overall, and the extra compute per token.")
    _common(p)
    p.add_argument("--method", default="all", help=f"one of {', '.join(METHODS)} or all (default: all)")
    p.add_argument("--reference", default="val", metavar="DATA",
                   help="reference windows (split or data source; default: val); 'successful' = continuation "
                        "loss at or below --success-quantile")
    p.add_argument("--domain", help="target domain: evaluate on it (and draw references from it)")
    p.add_argument("--neighbours", type=int, default=5, help="neighbours per test window (default 5)")
    p.add_argument("--lam", type=float, default=0.5, help="step toward the neighbours' routing (default 0.5)")
    p.add_argument("--success-quantile", type=float, default=0.5, help="reference loss quantile (default 0.5)")
    p.add_argument("--steps", type=int, default=3, help="optimisation steps of ngd and rewire (default 3)")
    p.add_argument("--strategy", default="kernel", help="r2t2: knn|kernel|ngd; c3po: mode|kernel|ngd (default kernel)")
    p.set_defaults(func=cmd_reroute)

    p = sub.add_parser("steer", help="steer a trained MoE model's routers toward a domain's experts",
                       description="Add +STRENGTH to the router logits of the TOP experts that --toward's text "
                                   "uses most in --layers, and measure the change on every domain's windows.")
    _common(p)
    p.add_argument("--toward", required=True, metavar="DOMAIN", help="the domain whose experts are boosted")
    p.add_argument("--strength", type=float, default=1.0, help="logit bias (default 1.0)")
    p.add_argument("--top", type=int, help="experts boosted per layer (default: the layer's k)")
    p.add_argument("--reference", default="val", metavar="DATA", help="where --toward's windows come from (default val)")
    p.set_defaults(func=cmd_steer)


def _layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoelabError(f"--layers {text!r} is not a comma-separated list of block indices") from None


def _methods(args) -> dict:
    from moelab.ops.reroute.c3po import C3PO
    from moelab.ops.reroute.r2t2 import R2T2
    from moelab.ops.reroute.rewire import Rewire

    names = METHODS if args.method == "all" else [args.method]
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise MoelabError(f"--method {args.method!r} is not valid; choose one of: {', '.join(METHODS)}, all")
    build = {
        "r2t2": lambda: R2T2(strategy=args.strategy if args.strategy in ("knn", "kernel", "ngd") else "kernel",
                             neighbours=args.neighbours, lam=args.lam, steps=args.steps),
        "c3po": lambda: C3PO(surrogate=args.strategy if args.strategy in ("mode", "kernel", "ngd") else "kernel",
                             neighbours=args.neighbours, lam=args.lam, steps=args.steps, layers=_layers(args.layers)),
        "rewire": lambda: Rewire(steps=args.steps),
    }
    return {n: build[n]() for n in names}


def cmd_reroute(args: argparse.Namespace) -> int:
    from moelab.ops.reroute.run import compare, make_samples, write
    from moelab.ops.reroute.samples import successful
    from moelab.train.run import load_run

    methods = _methods(args)
    run = load_run(args.run)
    refs = successful(make_samples(run, args.reference, domain=args.domain, limit=args.limit), args.success_quantile)
    evals = make_samples(run, args.eval, domain=args.domain, limit=args.limit)
    layers = None if args.method == "c3po" else _layers(args.layers)
    results, md = compare(run, methods, refs, evals, layers=layers, target=args.domain, progress=not args.no_progress)
    print(md)
    write(args.out, "reroute", results, md, {"run": str(args.run), "reference": args.reference, "eval": args.eval,
                                             "domain": args.domain, "successful_references": len(refs)})
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from moelab.ops.reroute.offsets import gated_sites
    from moelab.ops.reroute.run import compare, make_samples, write
    from moelab.ops.reroute.steer import Steer
    from moelab.train.run import load_run

    run = load_run(args.run)
    toward = make_samples(run, args.reference, domain=args.toward, limit=args.limit)
    evals = make_samples(run, args.eval, domain=None, limit=args.limit)
    steer = Steer(top=args.top, strength=args.strength)
    steer.fit(gated_sites(run.model, _layers(args.layers), "steer"), toward)
    results, md = compare(run, {f"steer→{args.toward} (+{args.strength:g})": steer}, toward, evals,
                          layers=_layers(args.layers), target=args.toward, progress=not args.no_progress)
    print(md)
    write(args.out, "steer", results, md, {"run": str(args.run), "toward": args.toward, "strength": args.strength,
                                           "layers": _layers(args.layers)})
    return 0
