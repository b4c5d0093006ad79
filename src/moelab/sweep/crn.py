"""Common random numbers for sweeps: every configuration of a seed starts from the same weights
wherever the configurations share a parameter.

Without it, ``torch.manual_seed(seed)`` followed by building two different MoE configurations
draws different embeddings and attention weights (the MoE layers consume the generator in between),
so two configurations of the same seed differ in every weight and the seed-to-seed noise of
initialisation swamps the configurations' difference. With it, the sweep builds one *reference*
model per seed (the sweep's first configuration) and every run of that seed copies from it each
parameter whose name, shape and owning module class match (embeddings, attention, norms, dense
blocks; experts and routers where the layer types and shapes agree). Everything else keeps the run's
own initialisation, so no parameter is drawn from another method's init distribution. The data
order is already common: it depends on ``data.seed``, which sweeps do not vary.

The reference of a seed is the run config of the sweep's first configuration with that seed
(``SWEEP/configs/<first group>__seed<N>.json``); the worker rebuilds it in-process (a fraction of a
second) and applies it through ``train(..., init_hook=...)``, which logs how many tensors were shared.
A resumed run loads its checkpoint instead (the hook only runs at step 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn



def param_owners(model: nn.Module) -> dict[str, str]:
    """Parameter (and persistent buffer) name -> qualified class name of the module holding it."""
    owners = {}
    for mod_name, mod in model.named_modules():
        cls = f"{type(mod).__module__}.{type(mod).__qualname__}"
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for n, _ in tensors:
            owners[f"{mod_name}.{n}" if mod_name else n] = cls
    return owners


def build_reference(model_cfg, seed: int, vocab_size: int | None = None) -> nn.Module:
    """The reference model of ``seed``, built exactly as the trainer builds a run's model (with the
    run's ``vocab_size``, which the trainer takes from the tokenizer). The global RNG is left as it was."""
    from dataclasses import replace

    from moelab.models.transformer import MoETransformer

    if vocab_size is not None:
        model_cfg = replace(model_cfg, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MoETransformer(model_cfg)


@torch.no_grad()
def apply_common_init(model: nn.Module, ref_state: dict[str, torch.Tensor], ref_owners: dict[str, str]) -> list[str]:
    """Copy into ``model`` every reference tensor whose name, shape, dtype and owner class match;
    returns the names copied."""
    owners = param_owners(model)
    copied = []
    for name, t in model.state_dict(keep_vars=True).items():
        ref = ref_state.get(name)
        if ref is None or ref.shape != t.shape or ref.dtype != t.dtype or ref_owners.get(name) != owners.get(name):
            continue
        t.copy_(ref.to(t.device))
        copied.append(name)
    return copied


def make_init_hook(reference_config: str | Path):
    """An ``init_hook(model) -> dict`` for :func:`moelab.train.trainer.train`: builds the reference
    from the run config file ``reference_config`` (its model section and ``train.seed``) and copies
    the shared tensors into ``model``; returns what it shared (logged by the trainer)."""
    from moelab.train.config import RunConfig

    ref_cfg = RunConfig.from_dict(json.loads(Path(reference_config).read_text()))

    def hook(model: nn.Module) -> dict[str, Any]:
        ref = build_reference(ref_cfg.model, ref_cfg.train.seed, vocab_size=model.cfg.vocab_size)
        copied = apply_common_init(model, ref.state_dict(), param_owners(ref))
        return {"crn_reference": str(reference_config), "crn_shared_tensors": len(copied),
                "crn_total_tensors": len(model.state_dict())}

    return hook
