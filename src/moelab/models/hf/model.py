"""An imported Hugging Face causal LM whose sparse MoE blocks are moelab ``MoELayer``s.

Design (documented choice): attention, norms, embeddings, rotary tables, dense MLPs and the LM head
stay the HF model's own modules (so every attention variant -- GQA, MLA, sliding windows, sinks --
is exactly HF's); only each sparse block (``decoder_layer.mlp``) is replaced by an
:class:`HFMoEBlock` adapter holding a ``MoELayer`` (``adapter.moe``) with the same weights.

:class:`HFMoEModel` wraps the HF model (``model.hf``) behind moelab's model interface
(INTERFACES.md, models): ``forward(input_ids_BL, labels_BL=None, valid_BL=None) -> ModelOutput``,
``moe_layers()`` yielding ``(block index, MoELayer)`` (so ``moelab.models.moe_protocol`` and every
operation written against it work), ``generate`` and ``num_parameters``. Each forward builds one
``RoutingContext`` (valid mask, batch shape, token ids, shared state) that the adapters pass to
their layer with its ``layer_index``; the adapters are called by HF's decoder layers in depth order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routing import RoutingContext
from moelab.models.hf.families import Family


class _ContextHolder:
    """The routing context of the forward in progress (shared by the wrapper and its adapters)."""

    def __init__(self) -> None:
        self.ctx: RoutingContext | None = None

    def for_layer(self, index: int, T: int) -> RoutingContext:
        c = self.ctx
        if c is None or (c.valid_T is not None and c.valid_T.numel() != T) or (
                c.token_ids_T is not None and c.token_ids_T.numel() != T):
            return RoutingContext(layer_index=index)  # the HF model called directly (HF generate, caches)
        return replace(c, layer_index=index)


class HFMoEBlock(nn.Module):
    """Stands where the HF sparse block was: ``y = moe(x, ctx)`` (a tuple ``(y, None)`` for GPT-OSS)."""

    def __init__(self, moe: nn.Module, layer_index: int, holder: _ContextHolder, returns_tuple: bool) -> None:
        super().__init__()
        self.moe = moe
        self.moe.layer_index = layer_index
        self.layer_index = layer_index
        self.returns_tuple = returns_tuple
        object.__setattr__(self, "_holder", holder)  # not a submodule

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        D = hidden_states.shape[-1]
        x_TD = hidden_states.reshape(-1, D)
        y = self.moe(x_TD, self._holder.for_layer(self.layer_index, x_TD.shape[0])).reshape(hidden_states.shape)
        return (y, None) if self.returns_tuple else y


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    base = getattr(hf_model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise MoelabError(f"{type(hf_model).__name__} has no model.layers (not a decoder-only causal LM)")
    return layers


class HFMoEModel(nn.Module):
    """See the module docstring. ``family``: the :class:`Family`; ``layer_specs``: block index ->
    ``{"moe": MoEConfig dict, "experts": experts spec}`` (what the run directory stores)."""

    def __init__(self, hf_model: nn.Module, family: Family, layer_specs: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.hf = hf_model
        self.family = family
        self.layer_specs = layer_specs
        self.max_seq_len = int(getattr(hf_model.config, "max_position_embeddings", 1 << 30))
        object.__setattr__(self, "_holder", _ContextHolder())

    @property
    def config(self) -> Any:
        return self.hf.config

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As ``nn.Module.state_dict``, with tied tensors (embeddings = LM head) cloned so the dict
        can be written to safetensors (which refuses shared storage); loading writes both copies."""
        sd = super().state_dict(*args, **kwargs)
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for k, v in sd.items():
            if isinstance(v, Tensor) and v.numel():
                key = (v.untyped_storage().data_ptr(), tuple(v.shape))
                if key in seen:
                    sd[k] = v.clone()
                seen.add(key)
        return sd

    def install(self, index: int, moe: nn.Module) -> None:
        """Put ``moe`` (a MoELayer) behind an adapter at block ``index``'s ``mlp``."""
        decoder_layers(self.hf)[index].mlp = HFMoEBlock(moe, index, self._holder, self.family.returns_tuple)

    # ------------------------------------------------------------------ structure
    def moe_layers(self) -> Iterator[tuple[int, nn.Module]]:
        for i, block in enumerate(decoder_layers(self.hf)):
            if isinstance(block.mlp, HFMoEBlock):
                yield i, block.mlp.moe

    def num_parameters(self) -> dict[str, int]:
        from moelab.layers.pool import routed_param_counts

        total = sum(p.numel() for p in self.parameters())
        routed = routed_param_counts([layer for _, layer in self.moe_layers()])
        emb = self.hf.get_input_embeddings().weight.numel()
        return {"total": total, "active": total - (routed["total"] - routed["active"]), "embedding": emb}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids_BL: Tensor, labels_BL: Tensor | None = None, valid_BL: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Any:
        """Logits ``[B, L, V]`` (and the loss as ``MoETransformer``: ``labels_BL`` already shifted).

        ``attention_mask`` (HF's: 1 = attend) defaults to ``valid_BL`` when that has padding; the
        routing context marks ``valid_BL`` (else the attention mask) as the real tokens."""
        from moelab.models.transformer import ModelOutput, lm_cross_entropy

        B, L = input_ids_BL.shape
        if attention_mask is None and valid_BL is not None and not bool(valid_BL.all()):
            attention_mask = valid_BL.long()
        valid = valid_BL if valid_BL is not None else (None if attention_mask is None else attention_mask.bool())
        self._holder.ctx = RoutingContext(valid_T=None if valid is None else valid.reshape(-1).bool(),
                                          batch_shape=(B, L), token_ids_T=input_ids_BL.reshape(-1), state={})
        try:
            out = self.hf(input_ids=input_ids_BL, attention_mask=attention_mask, use_cache=False)
        finally:
            self._holder.ctx = None
        logits_BLV = out.logits
        if labels_BL is None:
            return ModelOutput(logits=logits_BLV)
        targets = labels_BL if valid_BL is None else labels_BL.masked_fill(~valid_BL.bool(), -100)
        lm_loss = lm_cross_entropy(logits_BLV.reshape(B * L, -1).float(), targets.reshape(-1))
        aux = torch.zeros((), device=lm_loss.device)
        for _, layer in self.moe_layers():
            for v in (layer.last_aux or {}).values():
                aux = aux + v.detach().float()
        return ModelOutput(logits=logits_BLV, loss=lm_loss + aux, lm_loss=lm_loss, aux_loss=aux)

    @torch.no_grad()
    def generate(self, input_ids_BL: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_id: int | None = None, use_cache: bool = False, sliding_window: bool = False) -> Tensor:
        """Sampling as ``MoETransformer.generate`` (no KV cache: the context is re-run each step;
        ``use_cache`` is accepted and ignored)."""
        from moelab.models.transformer import MoETransformer

        return MoETransformer.generate(_GenerateView(self), input_ids_BL, max_new_tokens, temperature=temperature,
                                       top_k=top_k, generator=generator, eos_id=eos_id, use_cache=False,
                                       sliding_window=sliding_window)


class _GenerateView:
    """What ``MoETransformer.generate`` reads of ``self``: ``cfg.max_seq_len`` and ``__call__``."""

    def __init__(self, model: HFMoEModel) -> None:
        self._model = model
        self.cfg = type("Cfg", (), {"max_seq_len": model.max_seq_len, "vocab_size": model.hf.get_input_embeddings().num_embeddings})()

    def __call__(self, ids: Tensor, kv_cache: Any = None) -> Any:
        return self._model(ids)

    def _decode(self, *args: Any) -> Tensor:
        from moelab.models.transformer import MoETransformer

        return MoETransformer._decode(self, *args)

    def __getattr__(self, name: str) -> Any:  # moe_layers, modules, eval, ... (the causality check reads them)
        return getattr(self._model, name)


def build_layer(cfg: MoEConfig, spec: dict[str, Any]) -> nn.Module:
    """A ``MoELayer`` for ``cfg`` with the experts of ``spec`` (see ``families.layer_config``)."""
    from moelab.layers.moe import MoELayer

    if spec.get("kind") == "biased":
        from moelab.layers.experts_ext import BiasedExpertBank

        bank = BiasedExpertBank(cfg, alpha=spec["alpha"], limit=spec["limit"], up_shift=spec["up_shift"])
        return MoELayer(cfg, experts=bank)
    return MoELayer(cfg)
