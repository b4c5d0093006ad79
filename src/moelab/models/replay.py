"""Routing replay: record every MoE layer's routing decision in one forward, replay it in a later one.

Used in RL on MoE models (Megatron-LM's router replay, motivated by Megatron-LM issue #4168: 94% of
tokens differed in at least one layer between rollout and training; Hugging Face ``MoERouting``): the
experts chosen at rollout time are reused at training time, so the same experts compute every
token, while the combine weights are recomputed from the *current* router so the router still gets
its gradient. Works on any model the MoE-layer protocol covers (moelab's transformer, imported HF models).

- ``with record_routing(model) as rec: model(x)`` -> :class:`RoutingRecording` (per MoE layer the
  CSR slots ``token_S``, ``expert_S`` and ``keep_S`` of ``RoutingResult``); ``rec.save(path)``
  writes a safetensors file, ``RoutingRecording.load(path)`` reads it back.
- ``with replay_routing(model, rec): model(x)``: each router's forward still runs (logits and
  probabilities with gradient), then a forward hook replaces its decision by the recorded slots with
  weights recomputed by the router's own rule: softmax_topk (gather of the softmax, renormalised
  when the router renormalises; or softmax over the recorded logits for topk_then_softmax),
  sigmoid_topk (gather of the sigmoid scores, normalised, times ``route_scale``); any other router:
  the gather of its ``probs_TE``. For a fixed-k recording the ops are the router's own, in the same
  order, so replay with unchanged weights is bit-identical.
- Refused: a recording from a model of another shape (layer indices, expert counts, d_model), a
  forward over another number of tokens (sequence length or batch), routers that compute the
  layer themselves (``forward_layer`` seam: SMEAR, Chain-of-Experts, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.layers.routing import RoutingResult
from moelab.models.moe_protocol import calibration_hooks, require_moe

REPLAY_FORMAT = 1


@dataclass
class LayerRecord:
    """One MoE layer's recorded decision (CSR slots, sorted by token)."""

    layer: int
    num_experts: int
    num_tokens: int
    token_S: Tensor
    expert_S: Tensor
    keep_S: Tensor | None = None
    k: int | None = None


@dataclass
class RoutingRecording:
    """Every MoE layer's routing in one forward; ``signature`` identifies the model's shape."""

    signature: str
    layers: dict[int, LayerRecord] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        if not self.layers:
            raise MoelabError("the recording is empty: run one forward inside record_routing(model)")
        arrays, meta = {}, []
        for i, r in sorted(self.layers.items()):
            arrays[f"layer{i}.token_S"] = r.token_S.to(torch.int64).contiguous()
            arrays[f"layer{i}.expert_S"] = r.expert_S.to(torch.int64).contiguous()
            if r.keep_S is not None:
                arrays[f"layer{i}.keep_S"] = r.keep_S.to(torch.uint8).contiguous()
            meta.append({"layer": i, "num_experts": r.num_experts, "num_tokens": r.num_tokens, "k": r.k})
        header = {"format": REPLAY_FORMAT, "signature": self.signature, "layers": meta}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(path), metadata={"moelab_routing": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RoutingRecording":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MoelabError(f"recording path={str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
            h = json.loads(meta["moelab_routing"])
        except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
            raise MoelabError(f"recording path={str(path)!r} is not a moelab routing recording: {e}") from None
        if h.get("format") != REPLAY_FORMAT:
            raise MoelabError(f"recording format={h.get('format')!r} is not supported; expected {REPLAY_FORMAT}")
        rec = cls(signature=h["signature"])
        for m in h["layers"]:
            i = int(m["layer"])
            keep = arrays.get(f"layer{i}.keep_S")
            rec.layers[i] = LayerRecord(layer=i, num_experts=int(m["num_experts"]), num_tokens=int(m["num_tokens"]),
                                        token_S=arrays[f"layer{i}.token_S"], expert_S=arrays[f"layer{i}.expert_S"],
                                        keep_S=None if keep is None else keep.bool(), k=m.get("k"))
        return rec


def model_signature(model: nn.Module) -> str:
    """Hash of the model's MoE shape: (block index, num_experts, d_model) of every MoE layer."""
    shape = [(s.index, s.layer.cfg.num_experts, s.layer.cfg.d_model) for s in require_moe(model, "routing replay")]
    return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecording]:
    """Record every MoE layer's decision of the forward run inside the block (the last one wins)."""
    rec = RoutingRecording(signature=model_signature(model))

    def keep(site, _x, _y):
        r = site.layer.last_routing
        rec.layers[site.index] = LayerRecord(
            layer=site.index, num_experts=r.num_experts, num_tokens=r.num_tokens, token_S=r.token_S.clone(),
            expert_S=r.expert_S.clone(), keep_S=None if r.keep_S is None else r.keep_S.clone(),
            k=r.k if r.num_slots == r.num_tokens * (r.k or -1) else None)

    with calibration_hooks(model, keep):
        yield rec


def _replayed_weights(router: nn.Module, out: RoutingResult, rec: LayerRecord) -> Tensor:
    """The recorded slots' combine weights by the router's own rule (module docstring)."""
    name = type(router).__name__
    T = out.num_tokens
    src = out.logits_TE if getattr(router, "score_order", "") == "topk_then_softmax" else out.probs_TE
    if src is None:
        raise MoelabError(f"router {name} exposes no probs_TE/logits_TE; routing replay cannot recompute its weights")
    if rec.k is not None:  # fixed k: the router's own ops in the same order (bit-identical)
        idx_TK = rec.expert_S.view(T, rec.k).to(src.device)
        w_TK = src.gather(1, idx_TK)
        return _normalise(router, name, w_TK, dim=-1).reshape(-1)
    mask_TE = torch.zeros(T, out.num_experts, dtype=torch.bool, device=src.device)
    mask_TE[rec.token_S, rec.expert_S] = True
    if getattr(router, "score_order", "") == "topk_then_softmax":
        w_TE = torch.softmax(src.masked_fill(~mask_TE, float("-inf")), dim=-1)
    else:
        w_TE = _normalise(router, name, src * mask_TE, dim=-1)
    return w_TE[rec.token_S, rec.expert_S]


def _normalise(router: nn.Module, name: str, w: Tensor, dim: int) -> Tensor:
    if name == "SoftmaxTopKRouter":
        if router.score_order == "topk_then_softmax":
            return torch.softmax(w, dim=dim)
        return w / w.sum(dim, keepdim=True) if router.renormalize else w
    if name == "SigmoidTopKRouter":
        if router.renormalize:
            w = w / (w.sum(dim, keepdim=True) + 1e-20)
        return w * router.route_scale
    return w


@contextlib.contextmanager
def replay_routing(model: nn.Module, recording: RoutingRecording) -> Iterator[None]:
    """Inside the block every MoE layer uses the recorded experts (module docstring)."""
    sites = require_moe(model, "routing replay")
    sig = model_signature(model)
    if recording.signature != sig or sorted(recording.layers) != [s.index for s in sites]:
        raise MoelabError(f"the recording (signature {recording.signature}, layers {sorted(recording.layers)}) comes "
                          f"from another model (signature {sig}, layers {[s.index for s in sites]})")
    handles = []
    for s in sites:
        if getattr(s.layer.router, "forward_layer", None) is not None:
            raise MoelabError(f"router {s.layer.cfg.router!r} of layer {s.index} computes the layer itself; "
                              "routing replay supports routers that return a RoutingResult")
        rec = recording.layers[s.index]

        def hook(router, _args, out, rec=rec, index=s.index):
            if out.num_tokens != rec.num_tokens:
                raise MoelabError(f"layer {index}: the recording has {rec.num_tokens} tokens, this forward "
                                  f"{out.num_tokens} (another sequence length or batch size)")
            w_S = _replayed_weights(router, out, rec)
            dev = out.token_S.device
            return replace(out, token_S=rec.token_S.to(dev), expert_S=rec.expert_S.to(dev), weight_S=w_S,
                           keep_S=None if rec.keep_S is None else rec.keep_S.to(dev), k=rec.k)
        handles.append(s.layer.router.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
