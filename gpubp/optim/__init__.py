"""Optimizers (SGD, Adam, AdamW, RMSprop, Adagrad, ...) and gradient-norm clipping.

One file per optimizer holds, in one place, the :class:`Optimizer` subclass
(hyper-parameters, checks, state buffers), its update maths as a
:class:`~gpubp.optim.rule.Rule` (NumPy spec, scalar body for the compiled backends,
host-side packing of the hyper-parameters) and its torch.optim twin (``torch_name``,
``torch_kwargs``). Importing the file registers the optimizer for :func:`get`, in the
order below.
"""

from __future__ import annotations

from gpubp.optim.base import OPTIMIZERS, Optimizer, clip_grad_norm, get

# isort: off
from gpubp.optim.sgd import SGD as SGD
from gpubp.optim.adam import Adam as Adam, AdamW as AdamW
from gpubp.optim.rmsprop import RMSprop as RMSprop
from gpubp.optim.adagrad import Adagrad as Adagrad
from gpubp.optim.adamax import Adamax as Adamax
# isort: on

__all__ = ["Optimizer", "OPTIMIZERS", "get", "clip_grad_norm", *(cls.__name__ for cls in OPTIMIZERS.values())]
