"""Carving a dense FFN into experts by clustering its neurons' activations on calibration data.

LaDiMo (layer-wise distillation MoEfier, seed catalog #71) and Read-ME (Cai et al. 2024,
"Read-ME: Refactorizing LLMs as Router-Decoupled MoE", #59) turn a dense FFN into experts by
partitioning its hidden units by activation pattern, then train a router to predict which partition a
token needs, then fine-tune. MoEfication (Zhang et al. 2022) is the common ancestor of both steps.

What this implements, and the choices we made:

- Activations: ``h = silu(W_gate x) * (W_up x)`` of each chosen FFN on the calibration tokens; neuron j's
  profile is ``|h[:, j]|`` over tokens, L2-normalised.
- Clustering: balanced spherical k-means (every expert gets exactly F / E neurons; greedy assignment of
  the most similar neuron-centroid pairs first), ``cluster_iters`` rounds, seeded.
- Experts: the neuron groups (rows of gate/up, columns of down); ``routed_scale = k`` so that with
  equal weights the layer sums its k selected partial FFNs (the dense FFN restricted to those neurons).
  With k = E and a zero router the layer is exactly the dense FFN (a permutation of its neurons; tested).
- Router: trained by distillation to predict the clusters: cross-entropy between its softmax and the
  target distribution ``||h[t, group_e]|| / sum_e'`` (the share of token t's activation mass in each
  expert), Adam, ``router_steps`` full-batch steps on the calibration tokens. Then continue with
  ``moelab train --init-from``. LaDiMo's layer-output distillation of the experts is left to that run.
- Not implemented: Read-ME's pre-gating router (one router, decoupled from the backbone, deciding every
  layer's experts up front); it needs a router that reads only token ids across layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError, check_range
from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.ops.upcycle.common import check_preserving_router, router_matrix
from moelab.ops.upcycle.dense import DenseWeights, ffn_weights, get_dense_site, replace_dense_ffn
from moelab.ops.upcycle.registry import UPCYCLE_CONFIGS, UPCYCLERS
from moelab.ops.upcycle.sparse import DenseUpcycleConfig, chosen_blocks


@dataclass(kw_only=True)
class CarveConfig(DenseUpcycleConfig):
    cluster_iters: int = 10
    router_steps: int = 200
    router_lr: float = 1e-2

    def validate(self, granularity: int = 1) -> None:
        super().validate()
        check_range("cluster_iters", self.cluster_iters, low=1)
        check_range("router_steps", self.router_steps, low=0)
        if self.num_shared_experts or self.drop_ratio:
            raise MoelabError("method='carve' takes no --shared / --noise (the experts partition the FFN)")


def balanced_kmeans(P_FT: Tensor, E: int, iters: int, generator: torch.Generator) -> Tensor:
    """Cluster id ``[F]`` of each row of ``P_FT`` (unit rows), exactly F / E rows per cluster."""
    Fn = P_FT.shape[0]
    C_ET = P_FT[torch.randperm(Fn, generator=generator)[:E]].clone()
    for _ in range(iters):
        assign_F = _balanced_assign(P_FT @ C_ET.T, Fn // E)
        C_ET = torch.stack([P_FT[assign_F == e].mean(0) for e in range(E)])
        C_ET = F.normalize(C_ET, dim=1)
    return assign_F


def _balanced_assign(sim_FE: Tensor, size: int) -> Tensor:
    Fn, E = sim_FE.shape
    assign_F = torch.full((Fn,), -1, dtype=torch.long)
    room_E = [size] * E
    for flat in torch.argsort(sim_FE.flatten(), descending=True).tolist():
        f, e = divmod(flat, E)
        if assign_F[f] < 0 and room_E[e] > 0:
            assign_F[f], room_E[e] = e, room_E[e] - 1
    return assign_F


def carve_layer(w: DenseWeights, x_TD: Tensor, template: MoEConfig, cfg: CarveConfig, gen: torch.Generator) -> MoELayer:
    E, Fh = cfg.num_experts, w.d_ff
    if Fh % E:
        raise MoelabError(f"num_experts={E} must divide the dense FFN width d_ff={Fh} (equal-size experts)")
    with torch.no_grad():
        h_TF = F.silu(x_TD @ w.w_gate_FD.T) * (x_TD @ w.w_up_FD.T)
        assign_F = balanced_kmeans(F.normalize(h_TF.abs().T, dim=1), E, cfg.cluster_iters, gen)
    groups = [torch.nonzero(assign_F == e).squeeze(1) for e in range(E)]
    from dataclasses import replace

    mcfg = replace(template, d_model=w.d_model, d_ff=Fh // E, num_experts=E, k=cfg.k, num_shared_experts=0,
                   shared_d_ff=None, routed_scale=float(cfg.k), init_std=cfg.router_init_std or template.init_std)
    check_preserving_router(mcfg, "carving")
    layer = MoELayer(mcfg)
    with torch.no_grad():
        for e, idx in enumerate(groups):
            layer.experts.w_gate_EFD[e].copy_(w.w_gate_FD[idx])
            layer.experts.w_up_EFD[e].copy_(w.w_up_FD[idx])
            layer.experts.w_down_EDF[e].copy_(w.w_down_DF[:, idx])
        gate_ED = router_matrix(layer.router, E, w.d_model)
        gate_ED.copy_(torch.randn(gate_ED.shape, generator=gen) * cfg.router_init_std)
        mass_TE = torch.stack([h_TF[:, idx].norm(dim=1) for idx in groups], dim=1)
        target_TE = mass_TE / mass_TE.sum(1, keepdim=True).clamp_min(1e-12)
    fit_router(gate_ED, x_TD, target_TE, cfg.router_steps, cfg.router_lr)
    layer.carve_groups = groups
    return layer


def fit_router(gate_ED: nn.Parameter, x_TD: Tensor, target_TE: Tensor, steps: int, lr: float) -> None:
    """Distil the cluster targets into the router: cross-entropy(softmax(x W^T), target), Adam."""
    if steps == 0:
        return
    w = gate_ED.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        loss = -(target_TE * torch.log_softmax(x_TD @ w.T, dim=1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gate_ED.copy_(w)


def ffn_inputs(model: nn.Module, blocks: list[int], calibration: list[Tensor]) -> dict[int, Tensor]:
    """The inputs ``[T, D]`` of the dense FFNs of ``blocks`` over the calibration batches."""
    got: dict[int, list[Tensor]] = {b: [] for b in blocks}
    handles = [get_dense_site(model, b).module.register_forward_hook(
        lambda m, a, o, b=b: got[b].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for b in blocks]
    try:
        with torch.no_grad():
            for ids in calibration:
                model(ids)
    finally:
        for h in handles:
            h.remove()
    return {b: torch.cat(v) for b, v in got.items()}


@UPCYCLERS.register("carve", description="cluster FFN neurons by activation into experts; distil a router",
                    paper="LaDiMo; Read-ME (Cai et al. 2024); MoEfication (Zhang et al. 2022)")
def carve_upcycle(model: nn.Module, cfg: CarveConfig, *, calibration: list[Tensor] | None = None,
                  template: MoEConfig | None = None, **_: object) -> nn.Module:
    cfg.validate()
    if not calibration:
        raise MoelabError("method='carve' needs calibration batches (token ids) to cluster activations")
    blocks = chosen_blocks(model, cfg, "carve")
    inputs = ffn_inputs(model, blocks, calibration)
    gen = torch.Generator().manual_seed(cfg.seed)
    for b in blocks:
        w = ffn_weights(get_dense_site(model, b).module)
        layer = carve_layer(w, inputs[b].to(w.w_up_FD), template or MoEConfig(), cfg, gen)
        replace_dense_ffn(model, b, layer.to(w.w_up_FD))
    return model


UPCYCLE_CONFIGS["carve"] = CarveConfig
