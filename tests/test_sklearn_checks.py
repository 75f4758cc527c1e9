"""scikit-learn's estimator checks (sklearn.utils.estimator_checks) on gpubp's MLPClassifier and MLPRegressor.

Small networks and few epochs keep the run short; every check is expected to pass. Their
ConvergenceWarnings (100 epochs end most of these fits) are silenced, as scikit-learn's own
tests of its MLPs do.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from gpubp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

ESTIMATORS = [
    MLPClassifier(hidden_layer_sizes=(8,), max_iter=100, learning_rate_init=0.01, random_state=0),
    MLPRegressor(hidden_layer_sizes=(8,), max_iter=100, learning_rate_init=0.01, random_state=0),
]


def expected_failed_checks(estimator):
    """Checks known to fail, with why: none."""
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
