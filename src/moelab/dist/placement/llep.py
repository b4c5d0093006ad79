"""LLEP: least-loaded expert parallelism (spill overflow tokens, with expert weights, to idle ranks).

Nguyen, Pandit, Xu, Xiong, Joty 2026, "Least-Loaded Expert Parallelism: Load Balancing An Imbalanced
Mixture-of-Experts" (arXiv 2601.17111; code SalesforceAIResearch/LeastLoadedEP,
``compute_llep_lpt_plan``). Routing is unchanged; only *where* each expert's tokens are computed is.

The plan (a longest-processing-time greedy, as the official code, re-implemented):
- capacity per rank ``cap = alpha * total / R`` (``max_tokens_factor``, alpha >= 1);
- experts in decreasing load order; an expert's *native* rank (``e // (E/R)``) takes as many of its
  tokens as fit under ``cap`` given its effective load (tokens already assigned plus its native
  experts not yet placed, so a helper is never chosen that its own experts will fill later);
- the rest spills, in chunks of at least ``min_chunk`` tokens (unless it is the last piece), to the
  other ranks in order of increasing effective load, each chunk costing one copy of the expert's
  weights to that rank; when no helper has room the remainder goes to the least-loaded helper.
- ``threshold`` (the paper's lambda): when plain EP's max/mean rank load is below it, plain EP is kept.

Documented choices: ranks' capacity and loads are in tokens (slots), equal per-token cost; ties in
the least-loaded order go to the lowest rank; the capacity is floored to an integer and at least 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moelab.errors import MoelabError


@dataclass
class LLEPPlan:
    """``chunks[e]`` = list of (rank, tokens) computing expert e; ``loads[r]`` tokens on rank r;
    ``transfers`` = (expert, from rank, to rank) weight copies."""

    chunks: dict[int, list[tuple[int, int]]]
    loads: list[int]
    transfers: list[tuple[int, int, int]] = field(default_factory=list)

    def max_over_mean(self) -> float:
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean else 1.0


def native_loads(counts_E: list[int], num_ranks: int) -> list[int]:
    """Tokens per rank under plain EP (expert e on rank ``e // (E/R)``)."""
    per = len(counts_E) // num_ranks
    loads = [0] * num_ranks
    for e, c in enumerate(counts_E):
        loads[e // per] += int(c)
    return loads


def llep_plan(counts_E: list[int], num_ranks: int, *, alpha: float = 1.1, min_chunk: int = 1,
              threshold: float = 1.0) -> LLEPPlan:
    """The LLEP assignment of each expert's tokens (see the module docstring)."""
    E = len(counts_E)
    if num_ranks < 1 or E % num_ranks:
        raise MoelabError(f"ranks={num_ranks} must divide the {E} experts for LLEP (experts are native to one rank)")
    if alpha < 1.0:
        raise MoelabError(f"alpha={alpha} is out of range; expected alpha >= 1")
    per = E // num_ranks
    plain = native_loads(counts_E, num_ranks)
    total = sum(plain)
    if total == 0 or max(plain) * num_ranks < threshold * total:
        return LLEPPlan({e: [(e // per, int(c))] for e, c in enumerate(counts_E) if c}, plain)
    cap = max(1, int(alpha * total / num_ranks))
    pending, assigned = list(plain), [0] * num_ranks
    plan = LLEPPlan({}, assigned)
    for e in sorted(range(E), key=lambda i: (-counts_E[i], i)):
        c = int(counts_E[e])
        if c == 0:
            continue
        home = e // per
        pending[home] -= c
        take = min(c, max(0, cap - assigned[home] - pending[home]))
        plan.chunks[e] = [(home, take)] if take else []
        assigned[home] += take
        _spill(plan, e, home, c - take, cap, assigned, pending, min_chunk)
    return plan


def _spill(plan: LLEPPlan, e: int, home: int, rest: int, cap: int, assigned: list[int], pending: list[int],
           min_chunk: int) -> None:
    R = len(assigned)
    while rest > 0:
        helpers = sorted((r for r in range(R) if r != home), key=lambda r: (assigned[r] + pending[r], r))
        if not helpers:  # one rank: everything stays home
            plan.chunks[e].append((home, rest))
            assigned[home] += rest
            return
        for r in helpers:
            room = cap - assigned[r] - pending[r]
            chunk = min(rest, room)
            if room > 0 and (chunk >= min_chunk or chunk == rest):
                break
        else:  # nobody has room: the least-loaded helper takes the rest
            r, chunk = helpers[0], rest
        plan.chunks[e].append((r, chunk))
        plan.transfers.append((e, home, r))
        assigned[r] += chunk
        rest -= chunk
