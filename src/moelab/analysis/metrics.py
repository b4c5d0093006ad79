"""Routing metrics as pure functions over numpy arrays.

Every function here takes plain arrays (no torch, no run directory), so each is testable on a
routing constructed by hand. Routings are given in the CSR form of
:class:`moelab.layers.routing.RoutingResult`: slot arrays ``token_S`` (sorted), ``expert_S`` and
optionally ``weight_S`` / ``keep_S``, plus ``num_tokens`` and ``num_experts``; dropped slots
(``keep_S`` False) are removed by the caller with :func:`kept_slots` where a metric is about
what was computed.

Shape legend: T tokens, E experts, S routed slots, D model dim, L layers, N domains.

Papers followed (named again in each function):
- OLMoE (Muennighoff et al., 2024): router saturation and expert co-activation.
- "Not All Models Suit Expert Offloading: On Local Routing Consistency of MoE Models"
  (Liang et al., 2025): segment routing best performance (SRP), segment cache best hit rate (SCH).
- "Routers Learn the Geometry of Their Experts": router-direction / routed-hidden-state coupling.
- "Three Phases of Expert Routing" (Mouzouni): balance tracked over training checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moelab.errors import MoelabError, check_range

_EPS = 1e-12


# --------------------------------------------------------------------------- input checks
def _as_int(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise MoelabError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise MoelabError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_slots(token_S, expert_S, num_tokens: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    token_S = _as_int(token_S, "token_S")
    expert_S = _as_int(expert_S, "expert_S")
    if token_S.shape != expert_S.shape:
        raise MoelabError(f"token_S {token_S.shape} and expert_S {expert_S.shape} must have the same shape")
    if token_S.size:
        if token_S.min() < 0 or token_S.max() >= num_tokens:
            raise MoelabError(f"token_S out of range [0, num_tokens={num_tokens})")
        if expert_S.min() < 0 or expert_S.max() >= num_experts:
            raise MoelabError(f"expert_S out of range [0, num_experts={num_experts})")
    return token_S, expert_S


def kept_slots(token_S, expert_S, weight_S=None, keep_S=None):
    """Drop the slots capacity dropped (``keep_S`` False); returns ``(token_S, expert_S, weight_S)``."""
    token_S, expert_S = np.asarray(token_S), np.asarray(expert_S)
    w = None if weight_S is None else np.asarray(weight_S)
    if keep_S is None:
        return token_S, expert_S, w
    m = np.asarray(keep_S, dtype=bool)
    return token_S[m], expert_S[m], None if w is None else w[m]


def choice_mask(token_S, expert_S, num_tokens: int, num_experts: int) -> np.ndarray:
    """Boolean ``[T, E]``: True where token t is routed to expert e (any number per token)."""
    token_S, expert_S = _check_slots(token_S, expert_S, num_tokens, num_experts)
    mask_TE = np.zeros((num_tokens, num_experts), dtype=bool)
    mask_TE[token_S, expert_S] = True
    return mask_TE


def dense_weights(token_S, expert_S, weight_S, num_tokens: int, num_experts: int) -> np.ndarray:
    """Combine weights as a dense ``[T, E]`` float matrix (0 where not routed)."""
    token_S, expert_S = _check_slots(token_S, expert_S, num_tokens, num_experts)
    w_TE = np.zeros((num_tokens, num_experts), dtype=np.float64)
    np.add.at(w_TE, (token_S, expert_S), np.asarray(weight_S, dtype=np.float64))
    return w_TE


def top1_expert(token_S, expert_S, weight_S, num_tokens: int, num_experts: int) -> np.ndarray:
    """Each token's highest-weight expert (long ``[T]``; -1 for a token with no slot)."""
    w_TE = dense_weights(token_S, expert_S, weight_S, num_tokens, num_experts)
    mask_TE = choice_mask(token_S, expert_S, num_tokens, num_experts)
    w_TE = np.where(mask_TE, w_TE, -np.inf)
    top_T = w_TE.argmax(axis=1)
    top_T[~mask_TE.any(axis=1)] = -1
    return top_T


# --------------------------------------------------------------------------- load balance
def expert_counts(expert_S, num_experts: int) -> np.ndarray:
    """Slots per expert (long ``[E]``)."""
    expert_S = _as_int(expert_S, "expert_S")
    if expert_S.size and (expert_S.min() < 0 or expert_S.max() >= num_experts):
        raise MoelabError(f"expert_S out of range [0, num_experts={num_experts})")
    return np.bincount(expert_S, minlength=num_experts)


def load_balance(counts_E) -> dict[str, float]:
    """Balance of one layer's expert loads.

    ``max_over_mean`` (1 at perfect balance, E when one expert takes everything), ``cv``
    (population std / mean: 0 at perfect balance, sqrt(E-1) when one expert takes all),
    ``unused`` (experts with zero load), ``min_over_mean``. All-zero counts give NaN ratios.
    """
    c = np.asarray(counts_E, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise MoelabError(f"counts_E must be a non-empty 1-D array, got shape {c.shape}")
    if (c < 0).any():
        raise MoelabError("counts_E must be non-negative")
    mean = c.mean()
    nan = float("nan")
    return {
        "max_over_mean": float(c.max() / mean) if mean > 0 else nan,
        "min_over_mean": float(c.min() / mean) if mean > 0 else nan,
        "cv": float(c.std() / mean) if mean > 0 else nan,
        "unused": int((c == 0).sum()),
    }


def load_fractions(counts_SE) -> np.ndarray:
    """Rows normalised to sum 1 (e.g. ``[steps, E]`` counts -> load shares for a heatmap)."""
    c = np.asarray(counts_SE, dtype=np.float64)
    tot = c.sum(axis=-1, keepdims=True)
    return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)


def router_entropy(probs_TE, valid_T=None) -> float:
    """Mean over (real) tokens of the entropy, in nats, of each row normalised to sum 1.

    The same definition as ``routing_stats``' ``router_entropy`` (INTERFACES.md): 0 for a
    one-hot router, log(E) for a uniform one.
    """
    p = np.asarray(probs_TE, dtype=np.float64)
    if p.ndim != 2:
        raise MoelabError(f"probs_TE must be 2-D [T, E], got shape {p.shape}")
    if valid_T is not None:
        p = p[np.asarray(valid_T, dtype=bool)]
    if p.shape[0] == 0:
        return float("nan")
    p = np.clip(p, 0.0, None)
    p = p / np.clip(p.sum(axis=1, keepdims=True), _EPS, None)
    h = -(p * np.log(np.clip(p, _EPS, None))).sum(axis=1)
    return float(h.mean())


def experts_per_token(token_S, num_tokens: int) -> np.ndarray:
    """Number of slots of each token (long ``[T]``); variable-k routers give varying values."""
    token_S = _as_int(token_S, "token_S")
    return np.bincount(token_S, minlength=num_tokens)[:num_tokens]


# --------------------------------------------------------------------------- entropy / MI
def entropy_bits(p) -> float:
    """Shannon entropy in bits of a (not necessarily normalised) non-negative vector."""
    p = np.asarray(p, dtype=np.float64).ravel()
    s = p.sum()
    if s <= 0:
        return 0.0
    p = p[p > 0] / s
    return float(-(p * np.log2(p)).sum())


def mutual_information_bits(joint_XY) -> float:
    """Mutual information in bits of the joint distribution given by a count (or mass) matrix."""
    j = np.asarray(joint_XY, dtype=np.float64)
    if j.ndim != 2 or (j < 0).any():
        raise MoelabError(f"joint_XY must be a non-negative 2-D matrix, got shape {j.shape}")
    tot = j.sum()
    if tot <= 0:
        return 0.0
    return max(0.0, entropy_bits(j.sum(1)) + entropy_bits(j.sum(0)) - entropy_bits(j))


# --------------------------------------------------------------------------- specialisation
def expert_domain_counts(token_S, expert_S, domain_T, num_tokens: int, num_experts: int, num_domains: int,
                         weight_S=None) -> np.ndarray:
    """Routed slots (or routed weight mass, given ``weight_S``) per expert and domain: ``[E, N]``."""
    token_S, expert_S = _check_slots(token_S, expert_S, num_tokens, num_experts)
    domain_T = _as_int(domain_T, "domain_T")
    if domain_T.shape != (num_tokens,):
        raise MoelabError(f"domain_T has shape {domain_T.shape}, expected ({num_tokens},)")
    if domain_T.size and (domain_T.min() < 0 or domain_T.max() >= num_domains):
        raise MoelabError(f"domain_T out of range [0, num_domains={num_domains})")
    out_EN = np.zeros((num_experts, num_domains), dtype=np.float64)
    w = np.ones(token_S.shape, dtype=np.float64) if weight_S is None else np.asarray(weight_S, np.float64)
    np.add.at(out_EN, (expert_S, domain_T[token_S]), w)
    return out_EN


def specialisation_score(counts_EN) -> float:
    """Domain specialisation of one layer: I(expert; domain) / H(domain), in [0, 1].

    Each routed slot is one sample of (expert, domain of its token). The score is the share of
    the domain's uncertainty that the expert choice removes: 1 when every expert serves a single
    domain (domains routed to disjoint experts), 0 when expert choice is independent of the domain
    (e.g. every domain spread the same way). Choice: we normalise by H(domain) rather than by
    sqrt(H(E) H(N)) so that fine-grained layers (many experts per domain) can still reach 1.
    NaN with fewer than two domains present (specialisation is then undefined).

    Cf. the domain-specialisation analyses of OLMoE (Muennighoff et al., 2024) and
    "Not All Models Suit Expert Offloading" (domain- vs vocabulary-specialised experts).
    """
    c = np.asarray(counts_EN, dtype=np.float64)
    h_dom = entropy_bits(c.sum(axis=0))
    if h_dom <= 0:
        return float("nan")
    return float(min(1.0, mutual_information_bits(c) / h_dom))


def domain_distribution(counts_EN) -> np.ndarray:
    """For each domain, the share of its slots that went to each expert (``[E, N]``, columns sum 1)."""
    c = np.asarray(counts_EN, dtype=np.float64)
    tot = c.sum(axis=0, keepdims=True)
    return np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)


def top_tokens_per_expert(token_ids_T, token_S, expert_S, num_experts: int, n: int = 10,
                          min_count: int = 1) -> list[list[tuple[int, int, float]]]:
    """Per expert, its ``n`` most frequent token ids as ``(token_id, count, share)``.

    ``share`` is the fraction of that token id's occurrences (in the traced tokens) routed to the
    expert, which separates tokens an expert *owns* from merely frequent ones. Ties: lower id first.
    """
    token_ids_T = _as_int(token_ids_T, "token_ids_T")
    token_S, expert_S = _check_slots(token_S, expert_S, token_ids_T.size, num_experts)
    ids_S = token_ids_T[token_S]
    occ = np.bincount(token_ids_T) if token_ids_T.size else np.zeros(0, np.int64)
    out: list[list[tuple[int, int, float]]] = []
    for e in range(num_experts):
        ids = ids_S[expert_S == e]
        if ids.size == 0:
            out.append([])
            continue
        uniq, cnt = np.unique(ids, return_counts=True)
        order = np.lexsort((uniq, -cnt))[:n]
        out.append([(int(uniq[i]), int(cnt[i]), float(cnt[i] / occ[uniq[i]]))
                    for i in order if cnt[i] >= min_count])
    return out


# --------------------------------------------------------------------------- co-activation
def coactivation(token_S, expert_S, num_tokens: int, num_experts: int, conditional: bool = True) -> np.ndarray:
    """Expert co-activation matrix ``[E, E]`` (OLMoE, Muennighoff et al., 2024, sec. on co-activation).

    Raw: ``C[i, j]`` = number of tokens routed to both i and j (diagonal: tokens routed to i).
    ``conditional=True`` (OLMoE's plot): ``C[i, j] / C[i, i]``, the probability that a token sent
    to expert i is also sent to j; the diagonal is then set to 0 and rows of unused experts are 0.
    """
    m = choice_mask(token_S, expert_S, num_tokens, num_experts).astype(np.float64)
    c = m.T @ m
    if not conditional:
        return c
    d = np.diag(c).copy()
    out = np.divide(c, d[:, None], out=np.zeros_like(c), where=d[:, None] > 0)
    np.fill_diagonal(out, 0.0)
    return out


# --------------------------------------------------------------------------- stability
def _check_same_tokens(a_TE: np.ndarray, b_TE: np.ndarray) -> None:
    if a_TE.shape != b_TE.shape:
        raise MoelabError(
            f"routings cover different token sets/experts: shapes {a_TE.shape} vs {b_TE.shape}; "
            "trace both checkpoints on the same tokens"
        )


def routing_change_fraction(mask_a_TE, mask_b_TE, valid_T=None) -> float:
    """Fraction of tokens whose set of chosen experts differs between two routings of the same tokens."""
    a, b = np.asarray(mask_a_TE, bool), np.asarray(mask_b_TE, bool)
    _check_same_tokens(a, b)
    changed = (a != b).any(axis=1)
    if valid_T is not None:
        changed = changed[np.asarray(valid_T, bool)]
    return float(changed.mean()) if changed.size else float("nan")


def router_saturation(mask_TE, mask_final_TE, valid_T=None) -> float:
    """OLMoE's router saturation (Muennighoff et al., 2024, "Router saturation").

    The share of the experts a token activates at the final (reference) checkpoint that it also
    activates at this checkpoint, averaged over tokens: ``mean_t |A_t ∩ F_t| / |F_t|``. 1 for
    identical routings, 0 when every token's expert set is replaced. Tokens with no expert at the
    reference are skipped (this also handles variable k).
    """
    a, f = np.asarray(mask_TE, bool), np.asarray(mask_final_TE, bool)
    _check_same_tokens(a, f)
    n_f = f.sum(axis=1)
    keep = n_f > 0
    if valid_T is not None:
        keep &= np.asarray(valid_T, bool)
    if not keep.any():
        return float("nan")
    return float(((a & f).sum(axis=1)[keep] / n_f[keep]).mean())


# --------------------------------------------------------------------------- geometric coupling
def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > _EPS)


def geometric_coupling(router_w_ED, hidden_TD, token_S, expert_S) -> dict[str, np.ndarray | float]:
    """Router-expert geometric coupling ("Routers Learn the Geometry of Their Experts").

    The paper shows a routed token's gradient on its expert's router row points along the token's
    hidden state, so each router row accumulates the history of the tokens routed to that expert.
    We measure it directly:

    - ``router_hidden_cos_E``: cosine between router row e and the mean hidden state routed to e
      (NaN for experts that received no token);
    - ``router_router_cos_EE``: cosine similarity between router rows (the paper reports that
      auxiliary balance losses make router directions more similar to one another);
    - ``mean_router_hidden_cos`` and ``mean_offdiag_router_cos`` summarise both.

    Choice: the hidden state is the MoE layer's input (what the router sees), unnormalised.
    """
    w = np.asarray(router_w_ED, dtype=np.float64)
    h = np.asarray(hidden_TD, dtype=np.float64)
    if w.ndim != 2 or h.ndim != 2 or w.shape[1] != h.shape[1]:
        raise MoelabError(f"router_w_ED {w.shape} and hidden_TD {h.shape} must be 2-D with the same D")
    E = w.shape[0]
    token_S, expert_S = _check_slots(token_S, expert_S, h.shape[0], E)
    sums_ED = np.zeros_like(w)
    np.add.at(sums_ED, expert_S, h[token_S])
    n_E = np.bincount(expert_S, minlength=E).astype(np.float64)
    mean_ED = np.divide(sums_ED, n_E[:, None], out=np.zeros_like(sums_ED), where=n_E[:, None] > 0)
    wu, mu = _unit_rows(w), _unit_rows(mean_ED)
    cos_E = (wu * mu).sum(axis=1)
    cos_E[n_E == 0] = np.nan
    rr_EE = wu @ wu.T
    off = rr_EE[~np.eye(E, dtype=bool)]
    return {
        "router_hidden_cos_E": cos_E,
        "router_router_cos_EE": rr_EE,
        "mean_router_hidden_cos": float(np.nanmean(cos_E)) if np.isfinite(cos_E).any() else float("nan"),
        "mean_offdiag_router_cos": float(off.mean()) if off.size else float("nan"),
    }


# --------------------------------------------------------------------------- local consistency
def _segments(seq_T: np.ndarray) -> list[np.ndarray]:
    """Token index arrays of each sequence (tokens of a sequence are contiguous and in order)."""
    seq_T = _as_int(seq_T, "seq_T")
    if seq_T.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(seq_T) != 0) + 1
    return np.split(np.arange(seq_T.size), cuts)


def consecutive_token_overlap(mask_TE, seq_T) -> float:
    """Mean Jaccard overlap of the expert sets of consecutive tokens of the same sequence.

    1 when every token reuses its predecessor's experts, ~k/E-ish for independent random top-k.
    Cf. "Not All Models Suit Expert Offloading" (local routing consistency).
    """
    m = np.asarray(mask_TE, bool)
    vals = []
    for idx in _segments(seq_T):
        if idx.size < 2:
            continue
        a, b = m[idx[:-1]], m[idx[1:]]
        inter, union = (a & b).sum(1), (a | b).sum(1)
        vals.append(np.divide(inter, union, out=np.ones(inter.shape), where=union > 0))
    return float(np.concatenate(vals).mean()) if vals else float("nan")


def segment_routing_best_performance(mask_TE, seq_T, seg_len: int, group_size: int) -> float:
    """SRP of Liang et al., 2025 ("Not All Models Suit Expert Offloading", local routing consistency).

    For every window of ``seg_len`` consecutive tokens of one sequence, the best fixed group of
    ``group_size`` experts is the one covering most of the window's routed slots (the experts with
    the highest counts in the window); SRP is the covered share of slots, averaged over windows.
    1 when each window uses at most ``group_size`` distinct experts. Choice: we score the coverage
    (recall) of the best group; the paper's code also derives precision-style counts from the same
    per-window expert counts.
    """
    check_range("seg_len", seg_len, low=1)
    m = np.asarray(mask_TE, bool)
    check_range("group_size", group_size, low=1, high=m.shape[1])
    scores = []
    for idx in _segments(seq_T):
        if idx.size < seg_len:
            continue
        c = np.cumsum(np.vstack([np.zeros((1, m.shape[1]), np.int64), m[idx].astype(np.int64)]), axis=0)
        win_NE = c[seg_len:] - c[:-seg_len]  # counts per window and expert
        tot = win_NE.sum(1)
        best = -np.sort(-win_NE, axis=1)[:, :group_size].sum(1)
        ok = tot > 0
        scores.append(best[ok] / tot[ok])
    return float(np.concatenate(scores).mean()) if scores and np.concatenate(scores).size else float("nan")


def segment_cache_best_hit_rate(mask_TE, seq_T, cache_size: int, lookahead: int | None = None) -> float:
    """SCH of Liang et al., 2025: hit rate of an expert cache with optimal (Belady) eviction.

    Tokens of each sequence request their experts in order; a cache holds ``cache_size`` experts
    (empty at the start of every sequence). On a miss with a full cache, evict the cached expert
    whose next use is farthest in the future (Belady's optimal policy), looking at most
    ``lookahead`` tokens ahead (None: the whole sequence; experts not requested within the
    horizon are evicted first, lowest id first). A token's own experts are never evicted for each
    other. Returns hits / requests.
    """
    m = np.asarray(mask_TE, bool)
    check_range("cache_size", cache_size, low=1, high=m.shape[1])
    hits = reqs = 0
    for idx in _segments(seq_T):
        sets = [np.flatnonzero(m[t]) for t in idx]
        cache: set[int] = set()
        for i, req in enumerate(sets):
            horizon = len(sets) if lookahead is None else min(len(sets), i + 1 + lookahead)
            for e in req:
                reqs += 1
                if e in cache:
                    hits += 1
                    continue
                if len(cache) >= cache_size:
                    protected = set(req.tolist())

                    def next_use(x: int) -> int:
                        for j in range(i + 1, horizon):
                            if m[idx[j], x]:
                                return j
                        return horizon + 1 + (m.shape[1] - x)  # never: farthest; ties -> lowest id

                    cand = [x for x in cache if x not in protected] or list(cache)
                    cache.discard(max(cand, key=next_use))
                cache.add(int(e))
    return hits / reqs if reqs else float("nan")


def adjacent_layer_consistency(top1_LT) -> np.ndarray:
    """Predictability of layer l+1's expert from layer l's, per adjacent pair: ``[L-1]``.

    For each token, take its top-1 expert at each MoE layer; the score is the normalised mutual
    information I(e_l; e_{l+1}) / H(e_{l+1}) in [0, 1]: 1 when layer l's choice determines the
    next layer's (perfect for prefetching experts of the next layer), 0 when independent.
    Cf. "Not All Models Suit Expert Offloading" (consistency used for offloading/prefetching).
    Tokens with no expert (-1) at either layer are skipped. NaN when layer l+1 sends every token
    to the same expert (nothing to predict; a collapsed layer should not read as "consistent").
    The plug-in MI estimate is biased upwards on few tokens (about (E-1)^2 / (2 T ln 2) bits).
    """
    t = np.asarray(top1_LT)
    if t.ndim != 2:
        raise MoelabError(f"top1_LT must be 2-D [layers, tokens], got shape {t.shape}")
    out = np.full(max(t.shape[0] - 1, 0), np.nan)
    for l in range(t.shape[0] - 1):
        a, b = t[l], t[l + 1]
        ok = (a >= 0) & (b >= 0)
        if not ok.any():
            continue
        ea, eb = int(a[ok].max()) + 1, int(b[ok].max()) + 1
        joint = np.zeros((ea, eb))
        np.add.at(joint, (a[ok], b[ok]), 1.0)
        hb = entropy_bits(joint.sum(0))
        out[l] = np.nan if hb <= 0 else min(1.0, mutual_information_bits(joint) / hb)
    return out


# --------------------------------------------------------------------------- variable k
def experts_vs_loss(experts_per_token_T, loss_T, valid_T=None) -> dict[str, object]:
    """For variable-k routers: mean token loss per number of experts, and their correlations.

    Cf. "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (top-p routing), which
    reports that harder inputs get more experts. Returns ``k_values``, ``mean_loss``, ``count``
    (per k), ``pearson`` and ``spearman`` (NaN when either side is constant).
    """
    k = np.asarray(experts_per_token_T, dtype=np.float64)
    loss = np.asarray(loss_T, dtype=np.float64)
    if k.shape != loss.shape or k.ndim != 1:
        raise MoelabError(f"experts_per_token_T {k.shape} and loss_T {loss.shape} must be equal 1-D shapes")
    if valid_T is not None:
        v = np.asarray(valid_T, bool)
        k, loss = k[v], loss[v]
    ks = np.unique(k)
    mean = [float(loss[k == v].mean()) for v in ks]
    cnt = [int((k == v).sum()) for v in ks]

    def corr(x, y):
        if x.size < 2 or x.std() == 0 or y.std() == 0:
            return float("nan")
        return float(np.corrcoef(x, y)[0, 1])

    def ranks(x):  # average ranks of ties (as scipy.stats.rankdata), in numpy
        order = np.argsort(x, kind="mergesort")
        r = np.empty(x.size)
        r[order] = np.arange(1, x.size + 1)
        _, inv = np.unique(x, return_inverse=True)
        sums = np.bincount(inv, weights=r)
        return (sums / np.bincount(inv))[inv]

    return {
        "k_values": [float(v) for v in ks], "mean_loss": mean, "count": cnt,
        "pearson": corr(k, loss), "spearman": corr(ranks(k), ranks(loss)) if k.size else float("nan"),
    }


# --------------------------------------------------------------------------- trajectories
def balance_trajectory(records: Sequence[dict], key: str = "load_cv") -> tuple[np.ndarray, np.ndarray]:
    """From metrics.jsonl records: ``(steps [S], values [S, L])`` of one per-layer stat over training.

    Cf. "Three Phases of Expert Routing" (Mouzouni), which tracks balance across checkpoints
    (surge, stabilisation, relaxation). Missing values are NaN.
    """
    rows = [r for r in records if r.get("layers")]
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0))
    layer_ids = sorted({int(x["layer"]) for r in rows for x in r["layers"]})
    col = {l: i for i, l in enumerate(layer_ids)}
    steps = np.array([int(r["step"]) for r in rows])
    vals = np.full((len(rows), len(layer_ids)), np.nan)
    for i, r in enumerate(rows):
        for x in r["layers"]:
            v = x.get(key)
            if isinstance(v, (int, float)):
                vals[i, col[int(x["layer"])]] = float(v)
    return steps, vals


def load_history(records: Sequence[dict], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [S], load shares [S, E])`` of one layer from metrics.jsonl ``counts``."""
    steps, rows = [], []
    for r in records:
        for x in r.get("layers") or []:
            if int(x["layer"]) == layer and x.get("counts") is not None:
                steps.append(int(r["step"]))
                rows.append(np.asarray(x["counts"], dtype=np.float64))
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0))
    E = max(len(c) for c in rows)
    mat = np.zeros((len(rows), E))
    for i, c in enumerate(rows):
        mat[i, : len(c)] = c
    return np.array(steps), load_fractions(mat)
