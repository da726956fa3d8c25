"""SecAgg+'s neighbourhood (common/secagg_graph.py): the degree and threshold its analysis admits."""

import math

import pytest
from scipy.stats import hypergeom

from common.errors import ConfigError
from common.secagg_graph import (
    CORRECTNESS_BITS,
    SECURITY_BITS,
    flower_share_count,
    neighbourhood,
    shares_and_threshold,
    threshold_for,
)

AUTO = {"num_shares": "auto", "reconstruction_threshold": "auto", "corrupt_fraction": 0.1, "dropout_fraction": 0.1}


@pytest.mark.parametrize(
    "n, corrupt, dropout, degree, threshold",
    [(10, 0.05, 0.05, 4, 4), (100, 0.05, 0.05, 12, 8), (1000, 0.05, 0.05, 28, 17)]
    + [(10, 0.1, 0.1, 4, 4), (100, 0.1, 0.1, 20, 11), (1000, 0.1, 0.1, 46, 27)],
)
def test_the_documented_graphs(n, corrupt, dropout, degree, threshold):
    # conf/config.yaml, README and BENCHMARKS.md state these (the defaults, 0.05, and 0.1); a
    # change to the analysis must change them there too.
    graph = neighbourhood(n, corrupt, dropout)
    assert (graph.degree, graph.threshold, graph.num_shares, graph.complete) == (degree, threshold, degree + 1, False)


@pytest.mark.parametrize("n, corrupt, dropout", [(10, 0.1, 0.1), (100, 0.1, 0.1), (100, 0.2, 0.1), (1000, 0.05, 0.2)])
def test_the_chosen_graph_meets_every_condition_and_a_smaller_one_does_not(n, corrupt, dropout):
    """Checked with scipy's hypergeometric, independently of the module's own log-space sums."""
    bad, gone = math.ceil(corrupt * n), math.ceil(dropout * n)

    def secure(k, t):  # no client has t corrupt neighbours among its k (of the n - 1 others)
        return hypergeom(n - 1, bad, k).sf(t - 1) <= 2.0 ** -(SECURITY_BITS + 1) / n

    def correct(k, t):  # a dropped client keeps t surviving neighbours
        return hypergeom(n - 1, n - gone, k).cdf(t - 1) <= 2.0**-CORRECTNESS_BITS / n

    def connected(k):  # two runs of k/2 removed clients on the ring
        if k > bad + gone:
            return True
        log_p = math.log(n * (n - k - 1) / 2) + sum(math.log((bad + gone - i) / (n - i)) for i in range(k))
        return log_p < -(SECURITY_BITS + 1) * math.log(2)

    graph = neighbourhood(n, corrupt, dropout)
    k, t = graph.degree, graph.threshold
    assert not graph.complete and k % 2 == 0 and 2 <= t <= k + 1
    assert secure(k, t) and correct(k, t) and connected(k)
    assert not correct(k, t + 1)  # the largest threshold the dropouts allow: the most colluders tolerated
    smaller = k - 2
    assert not (connected(smaller) and any(secure(smaller, s) and correct(smaller, s) for s in range(2, smaller + 2)))


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_a_small_federation_gets_the_complete_graph(n):
    graph = neighbourhood(n, 0.1, 0.1)
    assert graph.complete and graph.num_shares == n
    assert graph.threshold >= 2  # one colluder (a tenth of n, rounded up) never holds enough shares
    assert graph.threshold <= max(2, n - 1)  # one dropout is survived where the colluder bound allows it


def test_the_threshold_grows_with_the_colluders_assumed():
    assert neighbourhood(100, 0.2, 0.1).threshold > neighbourhood(100, 0.1, 0.1).threshold
    assert neighbourhood(100, 0.1, 0.2).degree > neighbourhood(100, 0.1, 0.1).degree


@pytest.mark.parametrize(
    "value, n, count",
    [(1.0, 100, 100), (0.5, 100, 51), (0.2, 100, 21), (0.21, 100, 21), (0.01, 100, 100), (1, 10, 10), (5, 10, 5)],
)
def test_share_counts_follow_flowers_setup_stage(value, n, count):
    # round(fraction * n), bumped to odd below n, the whole federation when <= 2; an int as it is (1: all).
    assert flower_share_count(value, n) == count


@pytest.mark.parametrize("n", [2, 3, 10, 31, 100, 1000])
def test_auto_shares_come_back_exactly_from_the_fraction_flower_is_handed(n):
    shares, threshold = shares_and_threshold(AUTO, n)
    graph = neighbourhood(n, 0.1, 0.1)
    assert (shares, threshold) == (graph.num_shares, graph.threshold)
    assert flower_share_count(shares / n, n) == shares


def test_explicit_shares_and_thresholds_are_kept():
    assert shares_and_threshold({**AUTO, "num_shares": 1.0, "reconstruction_threshold": 0.67}, 100) == (100, 0.67)
    assert shares_and_threshold({**AUTO, "num_shares": 7, "reconstruction_threshold": 4}, 100) == (7, 4)
    assert shares_and_threshold({**AUTO, "num_shares": 0.3, "reconstruction_threshold": 5}, 100) == (31, 5)
    # auto threshold for explicit shares: the analysis' threshold for that many neighbours
    shares, threshold = shares_and_threshold({**AUTO, "num_shares": 1.0}, 100)
    assert shares == 100 and threshold == threshold_for(100, 100, 0.1, 0.1) == 90  # 10 may drop, 89 may collude
    # an int above the round's shares could never be gathered: refused, naming the setting
    with pytest.raises(ConfigError) as err:
        shares_and_threshold({**AUTO, "reconstruction_threshold": 30}, 100)
    assert err.value.setting == "secaggplus.reconstruction_threshold"
