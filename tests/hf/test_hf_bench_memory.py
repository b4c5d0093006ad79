"""benchmarks/hf_interop.py's memory guard: the estimate of the expert weights HF's ``batched_mm``
gathers (one copy of ``gate_up_proj[e]`` and ``down_proj[e]`` per (token, expert) slot) against an
independent count from the config, and the skip decision it drives."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import hf_interop  # noqa: E402
from hf_helpers import random_model  # noqa: E402


def test_gathered_weight_bytes_counts_one_weight_copy_per_slot():
    m = random_model("mixtral")  # D=32, F=48, k=2, 2 MoE layers
    T, D, Fh, k, layers = 10, 32, 48, 2, 2
    per_layer = T * k * (2 * Fh * D + D * Fh) * 4
    assert hf_interop.gathered_weight_bytes(m, T, backward=False) == per_layer
    assert hf_interop.gathered_weight_bytes(m, T, backward=True) == 2 * layers * per_layer


def test_deepseek_counts_only_its_sparse_layers():
    m = random_model("deepseek_v3")  # 3 layers, the first dense; D=32, F=24, k=2
    T = 7
    per_layer = T * 2 * (2 * 24 * 32 + 32 * 24) * 4
    assert hf_interop.gathered_weight_bytes(m, T, backward=True) == 2 * 2 * per_layer


def test_too_big_skips_only_batched_mm_over_the_cap():
    m = random_model("mixtral")
    assert hf_interop.too_big("grouped_mm", m, 10**6, 0.0) is None
    assert hf_interop.too_big("batched_mm", m, 10, 1.0) is None
    why = hf_interop.too_big("batched_mm", m, 10**5, 1.0)
    assert why is not None and "batched_mm" in why and "--mem-cap-gib 1" in why
