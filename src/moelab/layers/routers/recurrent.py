"""Layerwise Recurrent Router (RMoE): a GRU carries routing state across MoE layers.

Qiu et al. 2024, "Layerwise Recurrent Router for Mixture-of-Experts" (arXiv:2408.06793, ICLR
2025; code qiuzh20/RMoE). Routers of different layers normally decide independently; RMoE makes
layer l's decision depend on the earlier layers' routing state through a GRU run over *depth*
(parallel over tokens):

    r_l = GRU(x_l W_proj^l, r_{l-1}),      logits_l = r_l W_r^l,      top-k softmax gating,

with ``r_{-1} = 0``. Gradients flow through the recurrence into earlier layers' routers.

The state travels in ``ctx.state["recurrent_router"]`` (a dict holding the last hidden state
``r_TH`` and the layer index that wrote it). The model builds a fresh ``state`` dict per forward
and calls the MoE layers in depth order, so layer l sees layer l-1's state; the first layer (or a
call without a context) starts from zeros. Only a state written by a *shallower* layer
(``layer_index`` smaller than ``ctx.layer_index``) with the same token count is used, so a context
reused across forwards never feeds a layer its own previous output.

As in the released code (qiuzh20/RMoE, ``llama_moe_modeling.py``): each layer owns its bias-free
projection ``W_proj`` (``d_model -> hidden_dim``) and output matrix ``W_r``, while *one GRU cell
is shared by all layers* (the model passes the same ``rnn`` to every MoE block); the first layer
starts from a zero state; gating is softmax, top-k, renormalised. moelab routers are separate
modules, so sharing is done through the context: with ``share_gru=True`` (default) the first
layer of a forward puts its GRU cell into ``ctx.state`` and every later layer uses that one (the
later layers' own cells stay unused and get no gradient). ``share_gru=False`` gives each layer its
own cell. The GRU equations are torch's ``nn.GRUCell`` (same as the code's ``CustomGRUCell``).
Choice: ``hidden_dim`` defaults to ``min(128, d_model)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import check_range
from moelab.layers.config import MoEConfig
from moelab.layers.routers._zoo2_common import softmax_topk
from moelab.layers.routers.base import ROUTERS, GateLinear, Router, check_finite_logits
from moelab.layers.routing import RoutingContext, RoutingResult

STATE_KEY = "recurrent_router"


@ROUTERS.register(
    "recurrent",
    description="RMoE: a GRU over depth feeds each layer's router the previous layers' routing state (ctx.state)",
    paper="Qiu et al. 2024, Layerwise Recurrent Router for Mixture-of-Experts",
)
class RecurrentRouter(Router):
    causal = True

    def __init__(self, cfg: MoEConfig, *, hidden_dim: int | None = None, share_gru: bool = True) -> None:
        super().__init__(cfg)
        H = min(128, cfg.d_model) if hidden_dim is None else hidden_dim
        self.hidden_dim = int(check_range("router_kwargs.hidden_dim", H, low=1))
        self.share_gru = bool(share_gru)
        self.proj = GateLinear(cfg.d_model, self.hidden_dim, cfg.init_std)  # W_proj (fp32)
        self.gru = nn.GRUCell(self.hidden_dim, self.hidden_dim)
        self.out = GateLinear(self.hidden_dim, cfg.num_experts, cfg.init_std)  # W_r

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingResult:
        x_TD = self.check_input(x_TD)
        T = x_TD.shape[0]
        prev = None if ctx is None else ctx.state.get(STATE_KEY)
        h_prev_TH = None
        gru = self.gru
        layer = 0 if ctx is None else ctx.layer_index
        if prev is not None and prev["r_TH"].shape[0] == T and prev["layer_index"] < layer:
            h_prev_TH = prev["r_TH"]
            if self.share_gru and prev.get("gru") is not None and prev["gru"].hidden_size == self.hidden_dim:
                gru = prev["gru"]
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            u_TH = self.proj(x_TD)
            if h_prev_TH is None:
                h_prev_TH = u_TH.new_zeros(T, self.hidden_dim)
            r_TH = gru(u_TH, h_prev_TH.float())
            logits_TE = check_finite_logits(self.out(r_TH), "recurrent")
        if ctx is not None:
            ctx.state[STATE_KEY] = {"r_TH": r_TH, "layer_index": ctx.layer_index, "gru": gru}
        idx_TK, w_TK, probs_TE = softmax_topk(logits_TE, self.k, self.selection_bias())
        return RoutingResult.from_topk(idx_TK, w_TK, self.num_experts, logits_TE=logits_TE, probs_TE=probs_TE)
