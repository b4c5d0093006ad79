"""MoE layer benchmark: moelab's dispatch backends vs Hugging Face Mixtral vs the dense floor.

Run: ``python benchmarks/moe_layer.py`` (``make bench``), ``--quick`` for a smoke test,
``--device cuda --dtype bf16`` on a GPU. Writes benchmarks/results/moe_layer.{json,md}.

Compared side by side in one process, in interleaved rounds (benchmarks/common.py):

- ``moelab-<backend>``: ``MoELayer`` (router + switch aux loss attached to the graph + routing
  stats + dispatch) with dispatch ``loop``, ``sorted``, ``grouped`` and ``capacity`` (capacity
  factor 1.25, drop policy probs: it computes fewer slots when the routing is unbalanced);
- ``hf-eager`` / ``hf-grouped_mm``: transformers' ``MixtralSparseMoeBlock`` built from a
  ``MixtralConfig`` with random weights (no download), its experts implementation chosen with
  ``config._experts_implementation`` (read at every forward by ``@use_experts_implementation``);
- ``dense-floor``: one SwiGLU FFN with hidden size k*d_ff, the same FLOPs as the routed experts
  with no routing or dispatch at all (the compute floor).

Routing modes: ``natural`` (each router's own top-k choice with its random init) and
``uniform`` (every router forced to the same perfectly balanced assignment, token t -> experts
(t*k + j) mod E, with the router's own probabilities as weights, renormalised).

Timed: ``fwd`` = forward under ``torch.no_grad()`` (inference); ``fwdbwd`` = forward plus
backward of ``<y, g>`` for a fixed random g, with gradients for the input and every parameter
(grads reset to None before each call). Medians over ``--rounds`` rounds after warm-up.
On CPU the process first tells glibc to keep freed memory for reuse (``set_malloc_reuse``;
``--system-malloc`` turns this off): with glibc's defaults every tensor above 32 MiB is a fresh
``mmap`` whose page faults, on the 2-core VM this was measured on, cost more than the arithmetic
of the elementwise ops, so the comparison would measure the kernel's page-fault path.
``peak_mib``: peak tensor memory of one fwd+bwd call above what was live before (CPU: the c10
allocator's own alloc/free events via torch.profiler; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Case, machine_info, markdown_table, peak_memory_mib, time_interleaved, median, write_results  # noqa: E402

from moelab.layers.config import MoEConfig  # noqa: E402
from moelab.layers.moe import MoELayer  # noqa: E402
from moelab.layers.routing import RoutingResult  # noqa: E402


@dataclass
class Shape:
    name: str
    T: int
    D: int
    F: int
    E: int
    k: int


FULL_SHAPES = [Shape("E8k2", 4096, 512, 1024, 8, 2), Shape("fine-E64k8", 4096, 512, 256, 64, 8)]
QUICK_SHAPES = [Shape("quick-E4k2", 256, 64, 128, 4, 2), Shape("quick-fine-E16k4", 256, 64, 32, 16, 4)]
BACKENDS = ["loop", "sorted", "grouped", "capacity"]
HF_IMPLS = ["eager", "grouped_mm"]


def uniform_indices(T: int, E: int, k: int, device) -> torch.Tensor:
    t = torch.arange(T, device=device).unsqueeze(1)
    return (t * k + torch.arange(k, device=device)) % E


class ForcedRouter(nn.Module):
    """Wraps a moelab router: same probabilities and losses, forced (uniform) expert choice."""

    def __init__(self, inner: nn.Module, idx_TK: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.idx_TK = inner, idx_TK

    def forward(self, x_TD, ctx=None):
        r = self.inner(x_TD, ctx)
        w_TK = r.probs_TE.gather(1, self.idx_TK)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return RoutingResult.from_topk(self.idx_TK, w_TK, r.num_experts, logits_TE=r.logits_TE,
                                       probs_TE=r.probs_TE, valid_T=r.valid_T)

    def balance_losses(self, routing, ctx=None):
        return self.inner.balance_losses(routing, ctx)


def build_moelab(shape: Shape, backend: str, mode: str, device, dtype) -> nn.Module:
    cfg = MoEConfig(d_model=shape.D, d_ff=shape.F, num_experts=shape.E, k=shape.k, dispatch=backend,
                    capacity_factor=1.25 if backend == "capacity" else None)
    layer = MoELayer(cfg).to(device=device, dtype=dtype)
    layer.router.to(torch.float32)  # routers run in fp32
    if mode == "uniform":
        layer.router = ForcedRouter(layer.router, uniform_indices(shape.T, shape.E, shape.k, device))
    return layer


def build_hf(shape: Shape, impl: str, mode: str, device, dtype) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=shape.D, intermediate_size=shape.F, num_local_experts=shape.E,
                        num_experts_per_tok=shape.k, router_jitter_noise=0.0)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(device=device, dtype=dtype)
    if mode == "uniform":
        idx = uniform_indices(shape.T, shape.E, shape.k, device)
        gate = block.gate

        def forced(hidden_states):
            logits = F.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            w = probs.gather(1, idx)
            return logits, (w / w.sum(-1, keepdim=True)).to(hidden_states.dtype), idx

        gate.forward = forced
    return block


class DenseFloor(nn.Module):
    def __init__(self, D: int, H: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(H, D) * 0.02)
        self.w_up = nn.Parameter(torch.randn(H, D) * 0.02)
        self.w_down = nn.Parameter(torch.randn(D, H) * 0.02)

    def forward(self, x):
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


def make_calls(module: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]
    xg = x.detach().clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return module(x)

    def fwdbwd():
        for p in params:
            p.grad = None
        xg.grad = None
        module(xg).backward(gy)

    return fwd, fwdbwd


def bench_shape(shape: Shape, mode: str, args, device, dtype) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, shape.T, shape.D, device=device, dtype=dtype)
    gy = torch.randn_like(x)
    modules: dict[str, nn.Module] = {"dense-floor": DenseFloor(shape.D, shape.k * shape.F).to(device, dtype)}
    for b in BACKENDS:
        if b == "loop" and args.skip_loop:
            continue
        modules[f"moelab-{b}"] = build_moelab(shape, b, mode, device, dtype)
    for impl in HF_IMPLS:
        try:
            modules[f"hf-{impl}"] = build_hf(shape, impl, mode, device, dtype)
        except Exception as e:  # transformers missing or too old: report, do not fail
            print(f"  skipping hf-{impl}: {type(e).__name__}: {e}")
    calls = {n: make_calls(m, x, gy) for n, m in modules.items()}
    fwd_t = time_interleaved([Case(n, c[0]) for n, c in calls.items()], args.rounds, args.warmup, str(device))
    fb_t = time_interleaved([Case(n, c[1]) for n, c in calls.items()], args.rounds, args.warmup, str(device))
    rows = []
    for n, (fwd, fwdbwd) in calls.items():
        rows.append({
            "shape": shape.name, "routing": mode, "impl": n,
            "fwd_ms": median(fwd_t[n]), "fwdbwd_ms": median(fb_t[n]),
            "fwd_times_ms": fwd_t[n], "fwdbwd_times_ms": fb_t[n],
            "peak_mib": peak_memory_mib(fwdbwd, str(device)) if not args.no_memory else None,
        })
    floor = next(r for r in rows if r["impl"] == "dense-floor")
    hf = [r for r in rows if r["impl"].startswith("hf-")]
    for r in rows:
        for key in ("fwd_ms", "fwdbwd_ms"):
            r[f"{key[:-3]}_ratio_to_floor"] = r[key] / floor[key]
            r[f"{key[:-3]}_ratio_to_fastest_hf"] = r[key] / min(h[key] for h in hf) if hf else None
        r["fastest_hf_fwdbwd"] = min(hf, key=lambda h: h["fwdbwd_ms"])["impl"] if hf else None
    for r in rows:
        print(f"  {r['impl']:18s} fwd {r['fwd_ms']:8.1f} ms  fwd+bwd {r['fwdbwd_ms']:8.1f} ms  "
              f"x floor {r['fwdbwd_ratio_to_floor']:.3f}  x fastest HF "
              f"{r['fwdbwd_ratio_to_fastest_hf'] or float('nan'):.3f}  peak {r['peak_mib'] or 0:.0f} MiB")
    return rows


def set_malloc_reuse() -> None:
    """Keep large freed blocks in the heap: without this, glibc hands every block above its mmap
    threshold (<= 32 MiB) back to the OS and the next tensor pays a page fault per 4 KiB page,
    which on this VM costs more than the arithmetic of an elementwise op. PyTorch's CPU tuning
    guide recommends jemalloc/tcmalloc for the same reason."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; quick 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--routing", default="natural,uniform")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names to run")
    ap.add_argument("--skip-loop", action="store_true", help="leave out the slow loop oracle backend")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--system-malloc", dest="malloc_reuse", action="store_false",
                    help="leave glibc's defaults (by default the benchmark keeps freed memory for reuse, as "
                         "jemalloc/tcmalloc do, for every implementation alike; see set_malloc_reuse)")
    ap.add_argument("--name", default=None, help="results file name (default moe_layer, quick: moe_layer_quick)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_reuse and torch.device(args.device).type == "cpu":
        set_malloc_reuse()
    args.rounds = args.rounds or (3 if args.quick else 7)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes.split(",")]
    rows: list[dict] = []
    name = args.name or ("moe_layer_quick" if args.quick else "moe_layer")
    for shape in shapes:
        for mode in args.routing.split(","):
            print(f"== {shape} routing={mode} device={device} dtype={args.dtype} threads={torch.get_num_threads()}")
            rows += bench_shape(shape, mode, args, device, dtype)
            write(name, rows, shapes, args, device)  # partial results survive an interrupted run


def write(name, rows, shapes, args, device) -> None:
    info = machine_info(str(device))
    payload = {"benchmark": "moe_layer", "device": str(device), "dtype": args.dtype, "rounds": args.rounds,
               "warmup": args.warmup, "malloc_reuse": args.malloc_reuse, "machine": info, "shapes": [vars(s) for s in shapes], "rows": rows}
    cols = ["shape", "routing", "impl", "fwd_ms", "fwdbwd_ms", "peak_mib", "fwd_ratio_to_floor",
            "fwdbwd_ratio_to_floor", "fwdbwd_ratio_to_fastest_hf"]
    md = (f"# MoE layer benchmark ({args.device}, {args.dtype})\n\n"
          f"Machine: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']}, "
          f"{info['torch_threads']} threads, 1-min load average at the end {info['load_avg_1m']}, "
          f"malloc reuse {'on' if args.malloc_reuse else 'off'}.\n"
          f"Medians of {args.rounds} interleaved rounds after {args.warmup} warm-up calls; "
          "fwd = no_grad forward, fwdbwd = forward + backward; ratios are against the dense "
          "SwiGLU floor (hidden k*d_ff) and the fastest Hugging Face Mixtral variant of the same "
          "shape and routing (lower is better). peak_mib: peak tensor memory of one fwd+bwd.\n\n"
          + markdown_table(rows, cols) + "\n")
    pj, pm = write_results(name, payload, md)
    print(f"wrote {pj} and {pm}")


if __name__ == "__main__":
    main()
