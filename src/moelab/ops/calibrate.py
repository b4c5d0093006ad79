"""Calibration: one streamed pass over a token sample, collecting per MoE layer and expert what every
pruning, merging and skipping method needs.

Shape legend: N sampled tokens, T tokens of one forward, D model dim, E experts, G domains.

``calibration_windows(run_cfg, prepared, cfg)`` draws the default sample: a seeded, domain-balanced
set of ``seq_len`` windows from the run's own training split (``moelab.data.prepare_data``; the same
tokenizer and documents the run was trained on), ``cfg.tokens`` tokens in all, the same number per
domain. ``calibrate(model, windows, cfg)`` runs the model once over them (a tqdm bar; no gradient) with
:func:`moelab.models.moe_protocol.calibration_hooks` and returns ``{block: LayerStats}``.

Memory is bounded by the sample: running sums are ``[E]`` or ``[E, E]``; the merging inputs (router
logits, inputs and every expert's outputs) are kept only for the first ``cfg.sample_tokens`` tokens.
Every statistic counts real tokens only (``valid_T``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from moelab.errors import MoelabError, check_choice, check_range
from moelab.layers.experts import expert_forward
from moelab.models.moe_protocol import MoESite, calibration_hooks, require_moe


@dataclass(kw_only=True)
class CalibrationConfig:
    """``tokens`` in the sample (split evenly over domains), windows of ``seq_len`` (None: the run's),
    ``batch_size`` windows per forward, ``seed``, ``split`` of the run's corpus, ``sample_tokens`` kept
    for merging, ``tcess_threshold`` r of PreMoe's TCESS (None: 1/E, 'above uniform'; our choice),
    ``domain``: sample only this domain (EASY-EP's domain-specific calibration; None: all, balanced)."""

    tokens: int = 16384
    seq_len: int | None = None
    batch_size: int = 8
    seed: int = 0
    split: str = "train"
    sample_tokens: int = 512
    tcess_threshold: float | None = None
    domain: str | None = None
    progress: bool = True

    def validate(self) -> "CalibrationConfig":
        check_range("calibration.tokens", self.tokens, low=1)
        check_range("calibration.batch_size", self.batch_size, low=1)
        check_range("calibration.sample_tokens", self.sample_tokens, low=1)
        if self.seq_len is not None:
            check_range("calibration.seq_len", self.seq_len, low=2)
        if self.tcess_threshold is not None:
            check_range("calibration.tcess_threshold", self.tcess_threshold, low=0.0, high=1.0)
        return self


@dataclass
class CalibrationWindows:
    """``ids_NL`` (long) token windows and ``domain_N`` (index into ``domains``)."""

    ids_NL: Tensor
    domain_N: Tensor
    domains: list[str]

    @property
    def tokens(self) -> int:
        return int(self.ids_NL.numel())


@dataclass
class LayerStats:
    """What calibration collected for one MoE layer (float64 numpy arrays, sums over real tokens).

    ``count_E`` routed slots; ``gate_sum_E`` summed combine weights; ``prob_sum_E`` summed router
    probabilities; ``ean_sum_E`` summed ||f_e(x)|| over routed tokens; ``reap_sum_E`` summed
    g_e(x) ||f_e(x)||; ``easy_sum_E`` summed g_e(x) ||f_e(x)|| (1 - cos(x, x + y)); ``max_act_E``
    max |f_e(x)| (down-projection output) over routed tokens; ``coact_EE`` tokens routed to both;
    ``tcess_sum_GE`` per domain summed p_e(x) 1[p_e(x) >= r]; ``tokens_G``; sample tensors
    ``x_ND``, ``logits_NE``, ``out_END`` (every expert's output on the sample), ``slot_prob`` (the
    probabilities of the routed slots of the sample, for skip thresholds).
    """

    index: int
    num_experts: int
    k: int
    tokens: int = 0
    count_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    gate_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    prob_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    ean_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    reap_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    easy_sum_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    max_act_E: np.ndarray = field(default=None)  # type: ignore[assignment]
    coact_EE: np.ndarray = field(default=None)  # type: ignore[assignment]
    tcess_sum_GE: np.ndarray = field(default=None)  # type: ignore[assignment]
    tokens_G: np.ndarray = field(default=None)  # type: ignore[assignment]
    x_ND: Tensor | None = None
    logits_NE: Tensor | None = None
    out_END: Tensor | None = None

    def __post_init__(self) -> None:
        E = self.num_experts
        for name in ("count_E", "gate_sum_E", "prob_sum_E", "ean_sum_E", "reap_sum_E", "easy_sum_E", "max_act_E"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(E))
        if self.coact_EE is None:
            self.coact_EE = np.zeros((E, E))


# --------------------------------------------------------------------------- the sample
def domain_balanced_windows(docs, eos_id: int, seq_len: int, tokens: int, seed: int,
                            domains: list[str]) -> CalibrationWindows:
    """Seeded random ``seq_len`` windows, ``ceil(tokens / (G * seq_len))`` per domain, from ``docs``
    (a ``TokenizedDocs``; documents joined with EOS per domain). Raises when a domain is too small."""
    present = [d for d in domains if d in set(docs.domains)]
    if not present:
        raise MoelabError("the calibration source has no documents")
    per = -(-int(tokens) // (len(present) * seq_len))
    rng = np.random.default_rng(seed)
    ids, dom = [], []
    for g, d in enumerate(domains):
        idx = [i for i in range(len(docs)) if docs.domains[i] == d]
        if not idx:
            continue
        stream = np.concatenate([np.append(docs.doc(i).astype(np.int64), eos_id) for i in idx])
        n_win = len(stream) // seq_len
        if n_win < per:
            raise MoelabError(
                f"calibration tokens={tokens} needs {per * seq_len} tokens of domain {d!r}; the source has "
                f"{len(stream)} (choose fewer calibration tokens)")
        starts = rng.choice(n_win, size=per, replace=False) * seq_len
        ids.extend(stream[s:s + seq_len] for s in starts)
        dom.extend([g] * per)
    return CalibrationWindows(torch.from_numpy(np.stack(ids)), torch.tensor(dom), list(domains))


def calibration_windows(run_cfg, prepared, cfg: CalibrationConfig) -> CalibrationWindows:
    """The default sample of a run (``run_cfg``: its RunConfig; ``prepared``: ``prepare_data(run_cfg.data)``)."""
    cfg.validate()
    if cfg.split not in prepared.tokens:
        raise MoelabError(f"calibration.split={cfg.split!r} is not valid; choose one of: {sorted(prepared.tokens)}")
    L = cfg.seq_len or run_cfg.data.seq_len
    domains = list(prepared.splits.domains)
    if cfg.domain is not None:
        check_choice("calibration.domain", cfg.domain, domains)
        domains = [cfg.domain]
    return domain_balanced_windows(prepared.tokens[cfg.split], prepared.tokenizer.eos_id, L, cfg.tokens,
                                   cfg.seed, domains)


def text_windows(texts: list[str], tokenizer, seq_len: int, tokens: int) -> CalibrationWindows:
    """Windows from any texts (one domain, ``"text"``), in order; raises when there are too few tokens."""
    stream = np.concatenate([np.append(np.asarray(tokenizer.encode(t), np.int64), tokenizer.eos_id)
                             for t in texts]) if texts else np.zeros(0, np.int64)
    need = -(-int(tokens) // seq_len)
    if len(stream) // seq_len < need:
        raise MoelabError(f"calibration tokens={tokens} is more than the source has ({len(stream)} tokens "
                          f"in windows of {seq_len}); choose fewer calibration tokens")
    ids = torch.from_numpy(stream[: need * seq_len].reshape(need, seq_len).copy())
    return CalibrationWindows(ids, torch.zeros(need, dtype=torch.long), ["text"])


# --------------------------------------------------------------------------- the pass
class _Collector:
    def __init__(self, sites: list[MoESite], cfg: CalibrationConfig, n_domains: int) -> None:
        self.cfg, self.G = cfg, n_domains
        self.stats = {s.index: LayerStats(index=s.index, num_experts=s.layer.cfg.num_experts, k=s.layer.cfg.k)
                      for s in sites}
        for st in self.stats.values():
            st.tcess_sum_GE, st.tokens_G = np.zeros((n_domains, st.num_experts)), np.zeros(n_domains)
        self.domain_T: Tensor | None = None

    @torch.no_grad()
    def __call__(self, site: MoESite, x_TD: Tensor, y_TD: Tensor) -> None:
        r, st = site.layer.last_routing.kept(), self.stats[site.index]
        valid_T = r.valid_T if r.valid_T is not None else torch.ones(r.num_tokens, dtype=torch.bool)
        x_TD, y_TD = x_TD.float(), y_TD.float()
        self._router_stats(st, r, valid_T)
        self._expert_stats(st, site.layer.experts, r, x_TD, y_TD, valid_T)
        self._sample(st, site.layer.experts, r, x_TD[valid_T])

    def _router_stats(self, st: LayerStats, r, valid_T: Tensor) -> None:
        E = st.num_experts
        real_S = valid_T[r.token_S]
        tok, exp, w = r.token_S[real_S], r.expert_S[real_S], r.weight_S[real_S].double()
        st.tokens += int(valid_T.sum())
        st.count_E += torch.bincount(exp, minlength=E).double().numpy()
        st.gate_sum_E += torch.zeros(E, dtype=torch.float64).index_add_(0, exp, w).numpy()
        sel_TE = torch.zeros(r.num_tokens, E, dtype=torch.float64)
        sel_TE[tok, exp] = 1.0
        st.coact_EE += (sel_TE.T @ sel_TE).numpy()
        if r.probs_TE is not None:
            p_TE = r.probs_TE.double()[valid_T]
            p_TE = p_TE / p_TE.sum(-1, keepdim=True).clamp_min(1e-300)
            st.prob_sum_E += p_TE.sum(0).numpy()
            thr = self.cfg.tcess_threshold if self.cfg.tcess_threshold is not None else 1.0 / E
            dom_T = self.domain_T[valid_T]
            st.tcess_sum_GE += torch.zeros(self.G, E, dtype=torch.float64).index_add_(
                0, dom_T, p_TE * (p_TE >= thr)).numpy()
            st.tokens_G += torch.bincount(dom_T, minlength=self.G).double().numpy()

    def _expert_stats(self, st: LayerStats, experts: nn.Module, r, x_TD: Tensor, y_TD: Tensor,
                      valid_T: Tensor) -> None:
        contrib_T = 1.0 - torch.cosine_similarity(x_TD, x_TD + y_TD, dim=-1).double()  # EASY-EP token weight
        for e in range(st.num_experts):
            sel = ((r.expert_S == e) & valid_T[r.token_S]).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            tok = r.token_S[sel]
            out_ND = expert_forward(experts, x_TD[tok].to(experts.w_up_EFD.dtype), e).float()
            norm_N, g_N = out_ND.norm(dim=-1).double(), r.weight_S[sel].double()
            st.ean_sum_E[e] += float(norm_N.sum())
            st.reap_sum_E[e] += float((g_N * norm_N).sum())
            st.easy_sum_E[e] += float((g_N * norm_N * contrib_T[tok]).sum())
            st.max_act_E[e] = max(st.max_act_E[e], float(out_ND.abs().max()))

    def _sample(self, st: LayerStats, experts: nn.Module, r, x_ND: Tensor) -> None:
        have = 0 if st.x_ND is None else st.x_ND.shape[0]
        take = min(self.cfg.sample_tokens - have, x_ND.shape[0])
        if take <= 0:
            return
        x_ND = x_ND[:take]
        logits = r.logits_TE if r.logits_TE is not None else r.probs_TE
        valid_T = r.valid_T if r.valid_T is not None else torch.ones(r.num_tokens, dtype=torch.bool)
        lg_NE = logits[valid_T][:take].float() if logits is not None else torch.zeros(take, st.num_experts)
        out_END = torch.stack([expert_forward(experts, x_ND.to(experts.w_up_EFD.dtype), e).float()
                               for e in range(st.num_experts)])
        cat = (lambda a, b: b if a is None else torch.cat([a, b], dim=-2 if b.dim() == 3 else 0))
        st.x_ND, st.logits_NE, st.out_END = cat(st.x_ND, x_ND), cat(st.logits_NE, lg_NE), cat(st.out_END, out_END)


@torch.no_grad()
def calibrate(model: nn.Module, windows: CalibrationWindows, cfg: CalibrationConfig | None = None
              ) -> dict[int, LayerStats]:
    """One streamed pass of ``model`` (on the CPU) over ``windows``; ``{block index: LayerStats}``."""
    cfg = (cfg or CalibrationConfig()).validate()
    sites = require_moe(model, "calibration")
    col = _Collector(sites, cfg, len(windows.domains))
    was_training = model.training
    model.eval()
    starts = range(0, windows.ids_NL.shape[0], cfg.batch_size)
    try:
        with calibration_hooks(model, col):
            for s in _bar(starts, cfg.progress, "calibrate"):
                ids = windows.ids_NL[s:s + cfg.batch_size]
                col.domain_T = windows.domain_N[s:s + cfg.batch_size, None].expand_as(ids).reshape(-1)
                model(ids)
    finally:
        model.train(was_training)
    return col.stats


def _bar(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="batch", leave=False)
