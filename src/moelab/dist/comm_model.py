"""The all-to-all traffic model of expert parallelism: bytes per token = f(k, D, dtype, placement).

One MoE layer, forward pass. A token on rank s routed to expert e travels to a rank holding e
(dispatch) and its output travels back (combine): ``2 * D * bytes(dtype)`` per slot whose expert is
not on rank s, nothing for a slot computed locally. So, per token and layer,

    bytes/token = 2 * D * b * sum over the token's kept slots of P(remote | expert),

    P(remote | e) = 1 - n_e / R   (tokens spread evenly over R ranks; e has copies on n_e ranks and
                                   a token uses the copy on its own rank when there is one)

Plain EP (n_e = 1): ``2 * kbar * D * b * (1 - 1/R)`` with kbar the mean kept experts per token.
The backward pass moves the same bytes again (the gradients of both all-to-alls): training = 2x.
Counts and metadata (E integers per rank pair) are ignored. :func:`slot_bytes` evaluates the same
rule on an actual routing; the gloo EP dispatcher's measured bytes equal it exactly (tested), which
is how the model is checked against a real run.
"""

from __future__ import annotations

import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


def bytes_per_token(kbar: float, d_model: int, dtype: str, num_ranks: int, copies_E: list[int] | None = None,
                    load_E: list[float] | None = None) -> float:
    """Expected forward all-to-all bytes per token and layer (see the module docstring).

    ``copies_E``: ranks holding each expert (None = plain EP, one each); ``load_E``: the share of
    slots of each expert (needed with ``copies_E``; default uniform).
    """
    b = DTYPE_BYTES[dtype]
    if copies_E is None:
        return 2.0 * kbar * d_model * b * (1.0 - 1.0 / num_ranks)
    E = len(copies_E)
    load = load_E if load_E is not None else [1.0] * E
    total = sum(load) or 1.0
    p_remote = sum(w / total * (1.0 - min(n, num_ranks) / num_ranks) for w, n in zip(load, copies_E))
    return 2.0 * kbar * d_model * b * p_remote


def slot_bytes(expert_S: torch.Tensor, owner_E: torch.Tensor, rank: int, d_model: int, elem_bytes: int) -> int:
    """Bytes a rank sends (dispatch) and receives back (combine) for its slots ``expert_S``."""
    remote = int((owner_E[expert_S] != rank).sum())
    return 2 * remote * d_model * elem_bytes
