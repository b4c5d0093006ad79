"""Synthetic routing datasets for tests and examples (no files needed).

``topic_dataset``: each prompt has a topic word (and filler words); model m is good on topic
m mod T and mediocre elsewhere, so the best model depends on a feature of the text. Costs rise
with the model index. ``equal=True`` makes every model identical (same scores and costs).
"""

from __future__ import annotations

import numpy as np

from moelab.route.data import RoutingDataset

TOPICS = ["algebra", "poetry", "history", "chemistry", "football", "cooking"]
FILLER = "the a of question please explain about why how what which some many this that".split()


def topic_dataset(n: int = 600, n_models: int = 3, n_topics: int = 3, seed: int = 0, equal: bool = False,
                  good: float = 0.9, bad: float = 0.3) -> RoutingDataset:
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, n_topics, n)
    texts = []
    for i in range(n):
        words = list(rng.choice(FILLER, 8)) + [TOPICS[topic[i]]] * 2 + [f"w{rng.integers(0, 50)}"]
        rng.shuffle(words)
        texts.append(" ".join(words) + f" #{i}")
    p_NM = np.where(topic[:, None] == (np.arange(n_models)[None] % n_topics), good, bad)
    cost_M = 1e-3 * (1.0 + np.arange(n_models))
    if equal:
        p_NM = np.full((n, n_models), 0.6)
        cost_M = np.full(n_models, 1e-3)
    u = rng.random((n, 1 if equal else n_models))
    scores = (u < p_NM).astype(float)
    costs = np.broadcast_to(cost_M, (n, n_models)).copy()
    return RoutingDataset("synthetic-topics", [f"s{i}" for i in range(n)], texts,
                          ["synthetic"] * n, [TOPICS[t] for t in topic],
                          [f"model{j}" for j in range(n_models)], scores, costs)
