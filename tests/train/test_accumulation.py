"""Gradient accumulation with MoE layers, end to end through ``train()``, in every balancing mode.

Two oracles, both independent of the layers' attached-loss mechanism (``aux_loss_scale``):

* the gradient of one optimizer step equals the gradient of an objective written out by hand
  here: ``1/A * sum over micro-batches of (lm loss + coef * balance loss + z_coef * z-loss)``, with
  the balance losses computed from the routers' probabilities by the formulas of the papers
  (Switch per micro-batch; DeepSeek-V3 per sequence; global-batch with the step's running counts;
  ST-MoE z-loss), on a model built without any balance loss;
* where the objective of the whole batch splits exactly into equal micro-batches (token-mean LM loss,
  sequence-wise loss, z-loss, aux-loss-free bias), ``A x B/A`` sequences equal ``1 x B`` sequences:
  same losses, weights and biases after several steps.
"""

from __future__ import annotations

import pytest
import torch

from moelab.data.loader import TrainStream
from moelab.data.pipeline import prepare_data
from moelab.models.transformer import MoETransformer
from moelab.train import trainer as trainer_mod
from moelab.train.metrics import read_jsonl
from moelab.train.run import load_run
from moelab.train.trainer import train

MODES = {  # name -> MoEConfig changes
    "switch": dict(aux_loss="switch", aux_loss_coef=0.5),
    "sequence": dict(aux_loss="sequence", aux_loss_coef=0.5),
    "global": dict(aux_loss="global", aux_loss_coef=0.5),
    "z_loss": dict(aux_loss="none", z_loss_coef=0.05),
}


def moe_cfg(micro, changes, **train_kw):
    cfg = micro(grad_clip=0.0, warmup_steps=0, **train_kw)
    for k, v in changes.items():
        setattr(cfg.model.moe, k, v)
    return cfg


def capture_step_grads(monkeypatch):
    """The parameter gradients the trainer hands to its first optimizer step."""
    grads: dict[str, torch.Tensor] = {}
    real = trainer_mod.build_optimizer

    def build(model, tcfg):
        opt = real(model, tcfg)
        names = {id(p): n for n, p in model.named_parameters()}

        def pre(o, args, kwargs):
            if not grads:
                for g in o.param_groups:
                    for p in g["params"]:
                        grads[names[id(p)]] = p.grad.detach().clone()

        opt.register_step_pre_hook(pre)
        return opt

    monkeypatch.setattr(trainer_mod, "build_optimizer", build)
    return grads


def hand_balance(mode, probs_TE, expert_S, token_S, running_E, B, L):
    """The balance loss of one layer and micro-batch, written out from the papers' formulas."""
    T, E = probs_TE.shape
    p_TE = probs_TE.float() / probs_TE.float().sum(-1, keepdim=True)
    counts = torch.zeros(E).index_add_(0, expert_S, torch.ones(len(expert_S)))
    if mode == "switch":  # Switch Transformer eq. 4 over the micro-batch
        return E * ((counts / counts.sum()) * p_TE.mean(0)).sum()
    if mode == "global":  # f from the slots of the step so far (this micro-batch included)
        running_E += counts
        return E * ((running_E / running_E.sum()) * p_TE.mean(0)).sum()
    per_seq = []
    for b in range(B):  # DeepSeek-V3 sequence-wise: the same per sequence, averaged
        mine = (token_S // L) == b
        c = torch.zeros(E).index_add_(0, expert_S[mine], torch.ones(int(mine.sum())))
        per_seq.append(E * ((c / c.sum()) * p_TE[b * L:(b + 1) * L].mean(0)).sum())
    return torch.stack(per_seq).mean()


def oracle_grads(cfg, mode, changes):
    """Gradient of the hand-written accumulated objective on a model with no balance loss of its own."""
    torch.manual_seed(cfg.train.seed)
    plain = cfg.model
    plain.moe.aux_loss, plain.moe.z_loss_coef = "none", 0.0
    model = MoETransformer(plain)
    model.train()
    seen = []
    for _, layer in model.moe_layers():
        layer.router.register_forward_hook(lambda m, i, out: seen.append(out))
    data = prepare_data(cfg.data)
    stream = TrainStream(data.tokens["train"], data.tokenizer, cfg.data.seq_len, cfg.train.batch_size,
                         cfg.data.seed, domains=data.splits.domains)
    A = cfg.train.grad_accum
    running = [torch.zeros(cfg.model.moe.num_experts) for _ in model.moe_layers()]
    total = 0.0
    for _ in range(A):
        b = stream.next_batch()
        seen.clear()
        out = model(b.input_ids_BL, labels_BL=b.labels_BL, valid_BL=b.valid_BL)
        B, L = b.input_ids_BL.shape
        obj = out.lm_loss
        for li, r in enumerate(seen):
            if mode in ("switch", "sequence", "global"):
                obj = obj + changes["aux_loss_coef"] * hand_balance(mode, r.probs_TE, r.expert_S, r.token_S,
                                                                     running[li], B, L)
            if mode == "z_loss":  # ST-MoE eq. 5
                obj = obj + changes["z_loss_coef"] * torch.logsumexp(r.logits_TE.float(), -1).square().mean()
        total = total + obj / A
    total.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode, accum, batch", [(m, 2, 2) for m in sorted(MODES)] + [("global", 4, 1)])
def test_accumulated_gradient_equals_hand_objective(micro, tmp_path, monkeypatch, mode, accum, batch):
    changes = MODES[mode]
    grads = capture_step_grads(monkeypatch)
    cfg = moe_cfg(micro, changes, steps=1, batch_size=batch, grad_accum=accum)
    train(cfg, tmp_path / "run", progress="off")
    want = oracle_grads(moe_cfg(micro, changes, steps=1, batch_size=batch, grad_accum=accum), mode, changes)
    assert set(grads) == set(want)
    gate = [n for n in want if "router" in n and want[n].abs().sum() > 0]
    assert gate, "the router must receive gradient"
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # the balance term matters: leaving it out of the oracle changes the router's gradient
    lm_only = oracle_grads(moe_cfg(micro, {}, steps=1, batch_size=batch, grad_accum=accum), "none", {})
    assert max(float((grads[n] - lm_only[n]).abs().max()) for n in gate) > 1e-3


def test_aux_loss_counted_once_per_step_not_per_micro_batch(micro, tmp_path, monkeypatch):
    """The router gradient of A=4 micro-batches matches the hand objective and NOT the one a missing
    1/grad_accum scale would give (aux counted 4 times)."""
    changes = MODES["switch"]
    grads = capture_step_grads(monkeypatch)
    train(moe_cfg(micro, changes, steps=1, batch_size=1, grad_accum=4), tmp_path / "run", progress="off")
    good = oracle_grads(moe_cfg(micro, changes, steps=1, batch_size=1, grad_accum=4), "switch", changes)
    x4 = dict(changes, aux_loss_coef=4 * changes["aux_loss_coef"])
    wrong = oracle_grads(moe_cfg(micro, x4, steps=1, batch_size=1, grad_accum=4), "switch", x4)
    gate = [n for n in good if "router" in n]
    for n in gate:
        torch.testing.assert_close(grads[n], good[n], rtol=1e-4, atol=1e-6)
    assert max(float((grads[n] - wrong[n]).abs().max()) for n in gate) > 1e-3


FULL_BATCH_MODES = {  # objectives that split exactly into equal micro-batches
    "lm_only": dict(aux_loss="none"),
    "sequence": dict(aux_loss="sequence", aux_loss_coef=0.5),
    "z_loss": dict(aux_loss="none", z_loss_coef=0.05),
    "aux_free_bias": dict(aux_loss="none", aux_free_bias=True, bias_update_rate=0.05),
}


@pytest.mark.parametrize("mode", sorted(FULL_BATCH_MODES))
def test_moe_accumulation_equals_full_batch(micro, tmp_path, mode):
    """MoE model, 3 steps: accum 2 x batch 2 == accum 1 x batch 4 (same sequences): losses, weights, biases."""
    changes = FULL_BATCH_MODES[mode]
    train(moe_cfg(micro, changes, steps=3, batch_size=4, grad_accum=1), tmp_path / "a", progress="off")
    train(moe_cfg(micro, changes, steps=3, batch_size=2, grad_accum=2), tmp_path / "b", progress="off")
    la = [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    wa, wb = load_run(tmp_path / "a").model.state_dict(), load_run(tmp_path / "b").model.state_dict()
    for k in wa:
        # atol: 1% of one Adam step (lr 1e-2); Adam's normalisation can amplify fp rounding of a near-zero
        # gradient element to ~1e-5, while a real accumulation bug moves weights by whole steps
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    if mode == "aux_free_bias":
        bias = [k for k in wa if "bias" in k and "router" in k]
        assert bias and any(float(wa[k].abs().max()) > 0 for k in bias)  # the bias did move
