"""scikit-learn estimators trained by gpubp: :class:`MLPClassifier` and :class:`MLPRegressor`.

    from gpubp.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(100,), random_state=0, device="cuda", dtype="float32")
    clf.fit(X, y).score(X_test, y_test)

They take scikit-learn's parameters (``sklearn.neural_network.MLPClassifier`` /
``MLPRegressor``) with their defaults and meanings, and add ``device`` and ``dtype``.
The network is a :class:`gpubp.Sequential` of Dense layers trained by ``Sequential.fit``
(stochastic solvers) or by ``scipy.optimize.minimize(method="L-BFGS-B")`` over gpubp's
gradients (``solver="lbfgs"``), so they run wherever gpubp runs, GPUs included. This module
imports scikit-learn; ``import gpubp`` does not import it.

The maths is scikit-learn's, step for step (``tests/test_sklearn.py`` checks it against
``sklearn.neural_network`` to rounding, in float64):

- initialisation: scikit-learn's Glorot-uniform draws (weights and biases in
  [-sqrt(6 / (fan_in + fan_out)), +...], factor 2 in place of 6 for ``"logistic"``), from
  the same ``random_state`` stream, in the same order;
- the loss of a batch B: the weighted mean sum_B w_i l_i / sum_B w_i of the per-sample
  losses (``fit(sample_weight=)``, handed to ``Sequential.fit``; w_i = 1 without it), plus
  the L2 penalty ``alpha / (2 sum_B w) * sum ||W||^2`` over the weights, not the biases. Its
  gradient adds ``alpha / sum_B w * W`` to each weight's: the ``weight_decay`` of a gpubp
  optimizer over the weights, set for each batch. Per sample: softmax cross-entropy
  (multi-class), binary cross-entropy summed over the outputs (binary and multi-label),
  half the squared error summed over the outputs (regression; ``loss_`` reports it averaged
  over the outputs, as scikit-learn does). ``loss_`` is the epoch's mean over the batches of
  (their loss + penalty) x rows;
- ``solver="sgd"``: scikit-learn's velocity ``v = momentum v - lr g`` (Nesterov: the update
  ``momentum v - lr g``), i.e. ``gpubp.optim.SGD`` with its momentum buffer rescaled
  whenever the learning rate changes; ``"adam"``: ``gpubp.optim.Adam`` with scikit-learn's
  epsilon, added to the square root of the second moment before its bias correction
  (torch's Adam adds it after);
- ``"lbfgs"``: scipy's L-BFGS-B on the whole data set's loss and gradient (``max_iter``,
  ``max_fun``, ``tol`` as gtol), evaluated by gpubp's forward and backward passes. For
  several regression outputs the objective sums their squared errors, as its gradient does
  (scikit-learn's L-BFGS objective averages them while its gradient sums them); ``loss_``
  still reports the average;
- ``learning_rate`` ("constant", "invscaling": ``learning_rate_init / (t_ + 1) ** power_t``
  after each epoch, "adaptive": divided by 5 when ``n_iter_no_change`` epochs did not
  improve by ``tol``), stopping (``tol``, ``n_iter_no_change``, ``early_stopping`` on a
  ``validation_fraction`` split scored by accuracy or R^2, the best parameters restored),
  ``ConvergenceWarning`` when ``max_iter`` ends training first.

Only the order of the mini-batches differs: an epoch's order is gpubp's (drawn from
``Generator([seed, epoch])``, the seed drawn from ``random_state``), not scikit-learn's.

Beyond scikit-learn: ``activation`` takes gpubp's activations too (``"leaky_relu"``,
``"elu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"softplus"``, ``"sigmoid"`` =
``"logistic"``); ``solver`` takes ``"adamw"`` (``alpha`` is then AdamW's decoupled decay of
the weights, ``W <- W (1 - lr alpha)`` per step), ``"rmsprop"`` and ``"adagrad"``
(``gpubp.optim`` with ``lr=learning_rate_init``, ``eps=epsilon`` and their other defaults);
``learning_rate`` applies to every solver but ``"adam"``/``"adamw"`` (scikit-learn: to
``"sgd"`` only). Sparse input is refused (densify it first).

Pickling (pickle, joblib): the state holds the parameters as NumPy arrays, the
architecture, the optimizer state and the device name, never device arrays. Unpickling
rebuilds the network on that device when this machine can use it, and otherwise on the
CPU with a :class:`DeviceFallbackWarning`: an estimator fitted on a GPU loads, and
predicts, on a machine without one. ``device_`` says where the network is;
:meth:`~MLPClassifier.to` moves it.
"""

from gpubp.sklearn._base import DeviceFallbackWarning
from gpubp.sklearn.classifier import MLPClassifier
from gpubp.sklearn.regressor import MLPRegressor

__all__ = ["DeviceFallbackWarning", "MLPClassifier", "MLPRegressor"]

# Pickles (pickle, joblib) name the classes by this package, whichever module defines them.
for _cls in (DeviceFallbackWarning, MLPClassifier, MLPRegressor):
    _cls.__module__ = __name__
del _cls
