"""``loop``: the obvious per-expert reference dispatch (the oracle every backend is tested against).

For each expert: select its kept slots, run the expert on their tokens, scale by the combine
weights and add into the output (Hugging Face's eager ``MixtralExperts`` loop, written for
clarity, not speed). Plain autograd provides every gradient.
"""

from __future__ import annotations

from torch import Tensor

from moelab.layers.experts import ExpertBank, expert_forward
from moelab.layers.routing import RoutingResult


def loop_dispatch(x_TD: Tensor, routing: RoutingResult, experts: ExpertBank) -> Tensor:
    r = routing.kept()
    y_TD = x_TD.new_zeros(r.num_tokens, x_TD.shape[1])
    for e in range(r.num_experts):
        sel = (r.expert_S == e).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        tok = r.token_S[sel]
        out = expert_forward(experts, x_TD[tok], e) * r.weight_S[sel].to(x_TD.dtype).unsqueeze(1)
        y_TD = y_TD.index_add(0, tok, out)
    return y_TD
