import numpy as np
import pytest

from moelab.errors import MoelabError
from moelab.sweep.stats import compare, summarize


def test_summary_interval_covers_mean_and_matches_t_formula():
    s = summarize([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == pytest.approx(1.0)
    # t_{0.975, 2} = 4.3027
    assert s.half_width == pytest.approx(4.3027 / np.sqrt(3), rel=1e-4)


def test_identical_groups_are_equivalent_and_not_different():
    rng = np.random.default_rng(0)
    a = 3.0 + 0.01 * rng.standard_normal(5)
    c = compare(a, a.copy(), margin=0.1)
    assert c.diff == 0 and c.equivalent and not c.different


def test_shifted_groups_are_different_and_not_equivalent():
    rng = np.random.default_rng(1)
    a = 3.0 + 0.01 * rng.standard_normal(5)
    b = 3.5 + 0.01 * rng.standard_normal(5)
    c = compare(a, b, margin=0.1)
    assert c.different and not c.equivalent
    assert c.verdict(names=("A", "B")) == "A is better"  # lower loss is better
    assert c.ci_low < -0.5 < c.ci_high < -0.4  # the interval covers the true shift


def test_noisy_small_shift_is_inconclusive_not_equivalent():
    a = [3.0, 3.3, 2.7]
    b = [3.05, 3.35, 2.75]
    c = compare(a, b, margin=0.01)
    assert not c.equivalent and not c.different and c.verdict() == "inconclusive"


def test_bad_input():
    with pytest.raises(MoelabError, match=">= 2 seeds"):
        compare([1.0], [1.0, 2.0], margin=0.1)
    with pytest.raises(MoelabError, match="margin"):
        compare([1.0, 2.0], [1.0, 2.0], margin=0)
