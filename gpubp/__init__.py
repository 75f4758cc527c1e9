"""gpubp: backpropagation for dense neural networks, with a NumPy reference path.

    import gpubp as gp
    model = gp.Sequential(gp.Dense(40, 256, activation="relu"), gp.Dense(256, 10), seed=0)
    loss_value, dlogits = gp.losses.CrossEntropy()(model(x), y)
    model.backward(dlogits)
"""

from gpubp import (
    accuracy,
    activations,
    callbacks,
    datasets,
    diagnostics,
    distributed,
    export,
    gradcheck,
    losses,
    metrics,
    optim,
    plot,
    schedules,
    threads,
)
from gpubp._resources import kernel_dir
from gpubp.activations import Activation
from gpubp.diagnostics import GradientWarning
from gpubp.io import load, save
from gpubp.layers import Dense, Dropout
from gpubp.lr_find import LRFindResult, lr_find
from gpubp.model import NonFiniteError, Sequential
from gpubp.optim import clip_grad_norm
from gpubp.parameter import Parameter
from gpubp.torch_interop import from_torch, to_torch

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "accuracy",
    "callbacks",
    "diagnostics",
    "distributed",
    "export",
    "from_torch",
    "to_torch",
    "Dense",
    "Dropout",
    "GradientWarning",
    "NonFiniteError",
    "Parameter",
    "Sequential",
    "__version__",
    "activations",
    "clip_grad_norm",
    "datasets",
    "gradcheck",
    "kernel_dir",
    "load",
    "losses",
    "lr_find",
    "LRFindResult",
    "metrics",
    "optim",
    "plot",
    "save",
    "schedules",
    "threads",
]
