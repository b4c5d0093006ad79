"""Issue 13: generation and evaluation know which routers are causal (moelab.models.causality)."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.causality import non_causal_layers, require_causal
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer


def model(router, **kw):
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, k=2, router=router, router_kwargs=kw)
    return MoETransformer(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=16,
                                      d_ff_dense=32, moe=moe, moe_layers=[1]))


@pytest.mark.parametrize("router,kw,train_ok,eval_ok", [
    ("softmax_topk", {}, True, True),
    ("expert_choice", {}, False, True),  # token-choice in eval: its causal inference mode
    ("expert_choice", {"eval_routing": "expert_choice"}, False, False),
    ("smear", {}, False, False),
    ("smear", {"merge": "token"}, True, True),
    ("sinkhorn", {}, False, True),
])
def test_generate_runs_only_causal_routing(router, kw, train_ok, eval_ok):
    m = model(router, **kw)
    ids = torch.randint(0, 32, (2, 4))
    for training, ok in ((True, train_ok), (False, eval_ok)):
        m.train(training)
        assert (non_causal_layers(m) == []) == ok
        if ok:
            assert m.generate(ids, 3, temperature=0).shape == (2, 7)
        else:
            with pytest.raises(MoelabError, match=f"generate needs causal routing.*block 1: router '{router}'"):
                m.generate(ids, 3, temperature=0)


def test_require_causal_names_every_non_causal_layer_and_the_mode():
    m = model("smear")
    with pytest.raises(MoelabError, match=r"per-token scoring.*block 1: router 'smear' \(eval mode\)"):
        require_causal(m.eval(), "per-token scoring")
    assert non_causal_layers(model("expert_choice"), training=True) == ["block 1: router 'expert_choice' (training mode)"]
    require_causal(model("expert_choice"), "x", training=False)  # eval mode is causal: no error


def test_evaluate_records_whether_the_number_is_causal(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from train_micro import micro_config

    from moelab.data.pipeline import prepare_data
    from moelab.train.trainer import evaluate

    cfg = micro_config(tmp_path)
    data = prepare_data(cfg.data)
    for kw, causal in (({}, True), ({"eval_routing": "expert_choice"}, False)):
        mcfg = replace(cfg.model, moe=replace(cfg.model.moe, router="expert_choice", router_kwargs=kw))
        m = MoETransformer(mcfg)
        out = evaluate(m, data.tokens["val"], data.tokenizer, data.splits.domains, seq_len=16, batch_size=4,
                       max_batches=1)
        assert out["causal"] is causal and bool(out["non_causal_layers"]) is not causal
        assert out["val_loss"] == out["val_loss"]  # a number either way (the sweep's expert-choice runs work)
