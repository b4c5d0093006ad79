"""DUME: training-free dynamic upcycling of several dense models into one MoE with a closed-form router.

DUME (seed catalog #11, file 003): dense domain experts that share one base become one MoE whose experts
are their FFNs; the router is fitted by ridge regression ``W = (X^T X + lambda I)^-1 X^T Y`` from hidden
states X to one-hot domain labels Y, so no gradient training is needed (adding an expert only updates
X^T X and X^T Y).

What this implements, and the choices we made:

- Inputs: n dense runs with the same architecture (``model`` config) and the same tokenizer (raised
  otherwise, naming what differs). Expert i of block l = run i's FFN at block l (every dense block).
- Non-FFN parameters (embeddings, attention, norms) are averaged over the runs (Branch-Train-MiX's
  convention; the paper's runs share a base, so they are close).
- X: the FFN inputs of block l *in the merged model* (blocks before l already routed by their fitted
  routers: fitted in depth order), on ``calib_batches`` training batches of each run's own data;
  Y: the one-hot index of the run whose data the token came from. A bias-free linear fit
  (moelab routers have no bias).
- Router: ``softmax_topk`` whose gate is ``sharpness * W^T``; top-k (``k``, default 1) with softmax-then-
  top-k. The ridge logits approximate 0/1 labels, so the sharpness (default 20) makes the selected
  weight close to 1 (k=1 routers keep the raw probability).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.models.moe_protocol import calibration_hooks, get_site
from moelab.ops.upcycle.common import persist_model_config, router_matrix
from moelab.ops.upcycle.dense import dense_ffn_sites, ffn_weights, replace_dense_ffn
from moelab.ops.upcycle.registry import UPCYCLE_CONFIGS, UPCYCLERS


@dataclass(kw_only=True)
class DumeConfig:
    k: int = 1
    ridge: float = 1e-2  # lambda
    sharpness: float = 20.0
    calib_batches: int = 8
    seed: int = 0

    def validate(self, n_models: int) -> None:
        check_range("number of runs", n_models, low=2)
        check_range("k", self.k, low=1, high=n_models)
        check_range("ridge", self.ridge, low=0.0, low_inclusive=False)
        check_range("sharpness", self.sharpness, low=0.0, low_inclusive=False)


def ridge_router(X_TD: Tensor, y_T: Tensor, n: int, lam: float) -> Tensor:
    """Closed-form ridge regression ``(X^T X + lam I)^-1 X^T Y`` -> ``[D, n]`` (float64 solve)."""
    X = X_TD.double()
    Y = torch.nn.functional.one_hot(y_T, n).double()
    A = X.T @ X + lam * torch.eye(X.shape[1], dtype=torch.float64)
    return torch.linalg.solve(A, X.T @ Y)


def check_compatible(models: list[nn.Module], configs: list, tokenizers: list) -> None:
    ref = configs[0].to_dict()
    for i, c in enumerate(configs[1:], 1):
        diff = sorted(k for k, v in c.to_dict().items() if ref.get(k) != v and k not in ("moe", "layout"))
        if diff:
            raise MoelabError(f"DUME runs must share one architecture; run {i} differs in model.{diff[0]} "
                              f"({c.to_dict()[diff[0]]!r} vs {ref[diff[0]]!r})")
        if tokenizers[i].fingerprint != tokenizers[0].fingerprint:
            raise MoelabError(f"DUME runs must share one tokenizer; run {i}'s tokenizer differs from run 0's")
    if any(not dense_ffn_sites(m) for m in models):
        raise MoelabError("DUME combines dense runs; one of the runs has no dense FFN blocks (already MoE)")


def merge_models(models: list[nn.Module], cfg: DumeConfig, template: MoEConfig) -> nn.Module:
    """Average non-FFN parameters; every dense block becomes an MoE of the runs' FFNs (router fitted later)."""
    merged = models[0]
    ffn_names = {n for s in dense_ffn_sites(merged) for n, _ in _named(merged, s.module)}
    with torch.no_grad():
        sds = [m.state_dict() for m in models]
        for name, t in merged.state_dict().items():
            if name not in ffn_names and t.is_floating_point():
                t.copy_(torch.stack([sd[name] for sd in sds]).mean(0))
    per_model_sites = [{s.index: s.module for s in dense_ffn_sites(m)} for m in models]
    for s in dense_ffn_sites(merged):
        ws = [ffn_weights(sites[s.index]) for sites in per_model_sites]
        mcfg = dataclasses.replace(template, d_model=ws[0].d_model, d_ff=ws[0].d_ff, num_experts=len(models),
                                   k=cfg.k, num_shared_experts=0, shared_d_ff=None, routed_scale=1.0,
                                   router="softmax_topk", router_kwargs={})
        layer = MoELayer(mcfg)
        with torch.no_grad():
            for e, w in enumerate(ws):
                layer.experts.w_gate_EFD[e].copy_(w.w_gate_FD)
                layer.experts.w_up_EFD[e].copy_(w.w_up_FD)
                layer.experts.w_down_EDF[e].copy_(w.w_down_DF)
        replace_dense_ffn(merged, s.index, layer)
    return merged


def _named(model: nn.Module, module: nn.Module):
    prefix = next(n for n, m in model.named_modules() if m is module)
    return [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]


def fit_routers(model: nn.Module, calibration: list[list[Tensor]], cfg: DumeConfig) -> dict[int, float]:
    """Fit every MoE block's router in depth order; returns each block's training accuracy."""
    from moelab.models.moe_protocol import moe_layers

    acc = {}
    for site in moe_layers(model):
        xs, ys = [], []
        with calibration_hooks(model, lambda s, x, y, i=site.index: xs.append(x.detach()) if s.index == i else None):
            with torch.no_grad():
                for label, batches in enumerate(calibration):
                    for ids in batches:
                        n0 = len(xs)
                        model(ids)
                        ys += [torch.full((xs[-1].shape[0],), label)] if len(xs) > n0 else []
        X, y = torch.cat(xs).float(), torch.cat(ys)
        W_Dn = ridge_router(X, y, len(calibration), cfg.ridge)
        gate = router_matrix(get_site(model, site.index).layer.router, len(calibration), X.shape[1])
        with torch.no_grad():
            gate.copy_((cfg.sharpness * W_Dn.T).to(gate))
        acc[site.index] = float(((X.double() @ W_Dn).argmax(1) == y).double().mean())
    return acc


@UPCYCLERS.register("dume", description="several dense runs -> one MoE, ridge-regression router (training-free)",
                    paper="DUME (training-free dynamic upcycling; seed catalog #11)")
def dume(models: list[nn.Module], cfg: DumeConfig, *, calibration: list[list[Tensor]],
         template: MoEConfig | None = None, configs=None, tokenizers=None) -> nn.Module:
    """Combine ``models`` (dense, one architecture) into one MoE; ``calibration[i]`` = token-id batches of
    model i's domain. Returns the merged model (``models[0]``, changed in place)."""
    cfg.validate(len(models))
    if configs is not None:
        check_compatible(models, configs, tokenizers)
    merged = merge_models(models, cfg, template or MoEConfig())
    merged.dume_train_accuracy = fit_routers(merged, calibration, cfg)
    return merged


def dume_runs(runs: list[str | Path], cfg: DumeConfig, out: str | Path, *, overwrite: bool = False) -> Path:
    """``moelab upcycle --method dume RUN_A RUN_B ... --out OUT``."""
    from moelab.ops.upcycle.runs import calibration_batches, prepare_out, save_model_run
    from moelab.train.run import load_run

    loaded = [load_run(r) for r in runs]
    cfg.validate(len(loaded))
    check_compatible([r.model for r in loaded], [r.config.model for r in loaded], [r.tokenizer for r in loaded])
    calib = [[ids for ids, _ in calibration_batches(r, cfg.calib_batches)] for r in loaded]
    out = Path(out)
    prepare_out(out, overwrite)
    merged = dume([r.model for r in loaded], cfg, calibration=calib, template=loaded[0].config.model.moe)
    config = loaded[0].config
    config.model = persist_model_config(config.model, merged)
    record = {"method": "dume", "options": dataclasses.asdict(cfg), "source": [str(r) for r in runs],
              "source_step": [r.step for r in loaded], "router_train_accuracy": merged.dume_train_accuracy,
              "params": merged.num_parameters()}
    return save_model_run(merged, config, Path(runs[0]), out, record)


UPCYCLE_CONFIGS["dume"] = DumeConfig
