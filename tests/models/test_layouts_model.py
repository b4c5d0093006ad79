"""Expert layouts inside the transformer: UniPool pools, schedules, interleaving, overrides, checkpoints."""

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.layouts import LayoutConfig, expert_params
from moelab.layers.moe import MoELayer
from moelab.layers.pool import PoolMoELayer
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer

V, D, F = 64, 32, 48


def micro(layout: LayoutConfig | None = None, **kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=D, n_layers=4, n_heads=2, max_seq_len=16, d_ff_dense=64,
                moe=MoEConfig(d_model=D, d_ff=F, num_experts=4, k=2), layout=layout or LayoutConfig())
    base.update(kw)
    return ModelConfig(**base)


def batch(B=2, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g)


def non_moe_params(cfg: ModelConfig) -> int:
    """Embedding, attention, norms and dense FFNs: the closed form of everything but the MoE layers."""
    moe_idx = cfg.moe_layer_indices()
    attn = 4 * D * D + 2 * D
    dense = 3 * D * cfg.d_ff_dense
    return V * D + cfg.n_layers * attn + (cfg.n_layers - len(moe_idx)) * dense + D


@pytest.mark.parametrize("layout,moe_layers,first_k_dense,routed_experts", [
    (LayoutConfig(), "all", 0, 16),
    (LayoutConfig(kind="shared_pool"), "all", 0, 16),
    (LayoutConfig(kind="shared_pool", pool_fraction=0.5), "all", 0, 8),
    (LayoutConfig(kind="shared_pool", pool_fraction=2 / 3), 2, 0, 5),          # MoE every 2nd block: 2 layers
    (LayoutConfig(kind="shared_pool", pool_size=3, private_experts=1), "all", 1, 3 + 3),  # first block dense
    (LayoutConfig(kind="per_layer", schedule="ascending"), "all", 0, 16),
    (LayoutConfig(kind="rexmoe"), 2, 0, 8),
])
def test_model_parameter_counts_match_the_closed_form(layout, moe_layers, first_k_dense, routed_experts):
    cfg = micro(layout, moe_layers=moe_layers, first_k_dense=first_k_dense)
    model = MoETransformer(cfg)
    n_moe = len(cfg.moe_layer_indices())
    router = sum(layer.cfg.num_experts for _, layer in model.moe_layers()) * D
    ep = expert_params(D, F)
    counts = model.num_parameters()
    assert counts["total"] == non_moe_params(cfg) + routed_experts * ep + router
    assert counts["active"] == counts["total"] - routed_experts * ep + n_moe * 2 * ep
    assert [i for i, _ in model.moe_layers()] == cfg.moe_layer_indices()


def test_interleaved_and_first_k_dense_layers_share_one_pool():
    cfg = micro(LayoutConfig(kind="shared_pool", pool_size=6), n_layers=6, moe_layers=2, first_k_dense=2)
    model = MoETransformer(cfg)
    assert cfg.moe_layer_indices() == [3, 5]
    layers = [layer for _, layer in model.moe_layers()]
    assert all(isinstance(l, PoolMoELayer) for l in layers)
    assert layers[0].experts.w_up_EFD is layers[1].experts.w_up_EFD is model.expert_layout.banks[0].w_up_EFD
    assert model.expert_layout.balances[0].members == [3, 5]
    ids, labels = batch()
    out = model(ids, labels_BL=labels)
    out.loss.backward()
    assert model.expert_layout.banks[0].w_up_EFD.grad.abs().sum() > 0
    assert not any(isinstance(b.ffn, MoELayer) for b in model.blocks[:2])


def test_dynamoe_schedule_gives_each_layer_its_experts():
    cfg = micro(LayoutConfig(kind="per_layer", schedule="descending", expert_budget=20))
    model = MoETransformer(cfg)
    sizes = [layer.cfg.num_experts for _, layer in model.moe_layers()]
    assert sum(sizes) == 20 and sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert model.expert_layout is None


def test_vanilla_layout_keeps_the_vanilla_model_bit_for_bit():
    torch.manual_seed(0)
    a = MoETransformer(micro())
    torch.manual_seed(0)
    b = MoETransformer(micro(LayoutConfig(kind="per_layer", schedule="uniform")))
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k])


def test_exact_pool_loss_reaches_the_model_aux_loss():
    torch.manual_seed(1)
    model = MoETransformer(micro(LayoutConfig(kind="shared_pool", pool_loss_mode="exact", pool_loss_coef=0.1)))
    ids, labels = batch()
    out = model(ids, labels_BL=labels)
    last = [layer for _, layer in model.moe_layers()][-1]
    assert "pool_loss" in last.last_aux and last.last_aux["pool_loss"] > 0
    total = sum(float(v) for _, layer in model.moe_layers() for v in layer.last_aux.values())
    assert float(out.aux_loss) == pytest.approx(total, rel=1e-5)


def test_invalid_layout_is_rejected_when_the_model_config_validates():
    with pytest.raises(MoelabError, match="smaller than moe.k=2"):
        micro(LayoutConfig(kind="shared_pool", pool_size=1)).validate()
    with pytest.raises(MoelabError, match="layout.expert_budget=3"):
        micro(LayoutConfig(schedule="pyramid", expert_budget=3)).validate()


def test_layout_round_trips_through_model_config_dicts():
    cfg = micro(LayoutConfig(kind="shared_pool", pool_fraction=0.5, n_pools=2))
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back.layout == cfg.layout and isinstance(back.layout, LayoutConfig)


def test_layout_keys_are_settable_by_dotted_overrides():
    from moelab.train.config import RunConfig, apply_overrides, config_keys

    cfg = apply_overrides(RunConfig(), ["--layout.kind", "shared_pool", "--layout.pool_fraction", "0.5",
                                        "model.layout.n_pools=2", "--layout.pool_size", "none"])
    assert cfg.model.layout == LayoutConfig(kind="shared_pool", pool_fraction=0.5, n_pools=2)
    assert "layout.pool_fraction" in config_keys()
    back = RunConfig.from_dict(cfg.to_dict())
    assert back.model.layout == cfg.model.layout
    with pytest.raises(MoelabError, match="layout.kind='pool'"):
        apply_overrides(RunConfig(), ["--layout.kind", "pool"]).validate()


def test_pool_model_checkpoint_round_trip(tmp_path):
    from moelab.train import checkpoint as ckpt

    torch.manual_seed(2)
    cfg = micro(LayoutConfig(kind="shared_pool", pool_fraction=0.5, private_experts=1), moe=MoEConfig(
        d_model=D, d_ff=F, num_experts=4, k=2, router="norm", aux_loss="none"))
    model = MoETransformer(cfg)
    model.expert_layout.balances[0].prev_count_N.fill_(3.0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, None)
    state, _, _ = ckpt.read_checkpoint(path, with_optimizer=False)
    torch.manual_seed(3)
    fresh = MoETransformer(cfg)
    fresh.load_state_dict(state)
    ids, _ = batch()
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits)
    assert float(fresh.expert_layout.balances[0].prev_count_N.sum()) == 3.0 * fresh.expert_layout.balances[0].num_experts


def test_layout_report_compares_with_the_vanilla_budget():
    from moelab.layers.pool import layout_report

    cfg = micro(LayoutConfig(kind="shared_pool", pool_fraction=0.5))
    rep = layout_report(cfg.layout, cfg.moe, cfg.moe_layer_indices(), cfg.d_model)
    assert rep["routed_experts"] == 8 and rep["vanilla_experts"] == 16 and rep["fraction"] == 0.5


def test_vanilla_model_expressed_as_slices_of_one_bank_matches_outputs_and_gradients():
    """The oracle: a bank of L*E experts with layer l restricted to its slice (ReXMoE radius 0)
    is vanilla MoE once the weights are copied."""
    torch.manual_seed(4)
    vanilla = MoETransformer(micro(moe_layers=2))
    sliced = MoETransformer(micro(LayoutConfig(kind="rexmoe", rexmoe_radius=0), moe_layers=2))
    E = 4
    sd = vanilla.state_dict()
    bank_sd = {}
    for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
        bank_sd[f"expert_layout.banks.0.{name}"] = torch.cat(
            [sd.pop(f"blocks.{i}.ffn.experts.{name}") for i in vanilla.cfg.moe_layer_indices()])
    missing = sliced.load_state_dict({**sd, **bank_sd}, strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys
    ids, labels = batch()
    a, b = vanilla(ids, labels_BL=labels), sliced(ids, labels_BL=labels)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.loss, b.loss)
    a.loss.backward()
    b.loss.backward()
    grads = dict(sliced.named_parameters())
    for name, p in vanilla.named_parameters():
        if ".ffn.experts." in name:
            i, w = int(name.split(".")[1]), name.rsplit(".", 1)[1]
            j = vanilla.cfg.moe_layer_indices().index(i)
            torch.testing.assert_close(p.grad, grads[f"expert_layout.banks.0.{w}"].grad[j * E:(j + 1) * E])
        else:
            torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_custom_moe_factory_refuses_a_layout_it_cannot_build():
    with pytest.raises(MoelabError, match="moe_factory cannot build model.layout.kind='shared_pool'"):
        MoETransformer(micro(LayoutConfig(kind="shared_pool")), moe_factory=lambda c: MoELayer(c))


def test_unipool_training_resumes_exactly_with_the_lagged_pool_loss(tmp_path):
    """The lagged loss's previous-step counts are checkpointed: 3 + resume + 3 steps = 6 steps."""
    import json
    import random

    from moelab.data.corpus import DataConfig
    from moelab.train.config import RunConfig, TrainConfig
    from moelab.train.trainer import train

    rng = random.Random(0)
    for dom, ws in {"alpha": ["ab", "cd", "efg", "hij"], "beta": ["12", "345", "6", "78"]}.items():
        (tmp_path / "corpus" / dom).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "corpus" / dom / f"d{i}.txt").write_text(" ".join(rng.choice(ws) for _ in range(100)))

    def cfg():
        return RunConfig(
            model=ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff_dense=64,
                              moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, k=2, router="norm", aux_loss="none"),
                              layout=LayoutConfig(kind="shared_pool", pool_fraction=0.5, pool_loss_coef=0.1)),
            data=DataConfig(source=str(tmp_path / "corpus"), tokenizer="byte", seq_len=16, val_fraction=0.25,
                            test_fraction=0.1, cache_dir=str(tmp_path / "cache")),
            train=TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, eval_max_batches=1, grad_accum=2),
        )

    def losses(run):
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]

    train(cfg(), tmp_path / "straight", progress="off")
    train(cfg(), tmp_path / "split", progress="off", until_step=3)
    train(cfg(), tmp_path / "split", resume=True, progress="off")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-6)
    recs = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all("pool_counts" in lay and len(lay["pool_counts"]) == 4 for r in recs for lay in r["layers"])
