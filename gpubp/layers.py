"""Layers of a Sequential model, each a forward/backward pair: Dense and Dropout.

Dense: z = x @ W + b, a = f(z); shapes x (N, in), W (in, out), b (out,), z and a
(N, out). Dropout: y = x * keep / (1 - p) with a mask drawn from a counter-based
generator. The maths runs in the model's backend (gpubp.backends.base.Backend; the
NumPy reference on the CPU); a layer holds its parameters, what forward saves for
backward, and its initialisation. ``layer.precision`` (a gpubp.precision.Precision, or None)
is handed to the backend with every call: the rounding points of a mixed-precision layer.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from gpubp import activations, step_plan
from gpubp._random import dropout_key, offset_key
from gpubp._validate import positive_int
from gpubp.activations import Activation
from gpubp.parameter import Arena, Parameter
from gpubp.precision import Precision

INITS = ("he_uniform", "he_normal", "glorot_uniform", "glorot_normal")


class Layer:
    """What Sequential asks of a layer: widths, parameters, the forward/backward pair, a config.

    ``in_features`` / ``out_features`` are None for a layer that keeps the width it is
    given (Dropout). :meth:`prepare` is called by the model before each forward pass with
    what randomness the layer may need (the model's seed, epoch, step, whether the
    training-time behaviour is on, and the first row of the batch the input's rows are in).
    """

    in_features: int | None = None
    out_features: int | None = None
    num_parameters = 0
    #: the precision the layer's maths runs in (gpubp.precision; set by the model on every layer):
    #: None is float32 / float64 as the arrays are, with no rounding
    precision: Precision | None = None

    def bind(self, arena: Arena, index: int, backend: Any) -> None:
        self._backend = backend
        self._saved: tuple = ()

    def _precision(self) -> dict[str, Any]:
        """The backend calls' ``precision`` keyword: none at all while it is None (the calls as before)."""
        return {} if self.precision is None else {"precision": self.precision}

    def initial_weight(self, rng: np.random.Generator) -> np.ndarray | None:
        return None  # no weight to draw

    def parameters(self) -> list[Parameter]:
        return []

    def prepare(self, seed: int, epoch: int, step: int, index: int, active: bool, row0: int = 0) -> None:
        """Called before each forward pass; layers without randomness ignore it. ``row0``: the
        input's rows are rows row0.. of the step's batch (a rank's share, a micro-batch)."""

    def forward(self, x: Any, training: bool = True) -> Any:
        raise NotImplementedError

    def backward(self, da: Any, need_dx: bool = True) -> Any:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


class Dense(Layer):
    """A fully connected layer ``a = activation(x @ weight + bias)``.

    Args:
        in_features: width of x.
        out_features: width of a.
        activation: a name from ``gpubp.activations.NAMES``, an
            :class:`~gpubp.activations.Activation` (for parameters, e.g.
            ``Activation("leaky_relu", slope=0.1)``), or None for identity.
        init: weight initialisation; default ``"he_uniform"`` for the ReLU
            family (relu, leaky_relu, elu, gelu, gelu_tanh, silu, softplus) and
            ``"glorot_uniform"`` for identity, sigmoid and tanh. The bias starts at 0.

    Parameters (views into the model's arena once the layer is in a model):
    ``weight`` (in, out) and ``bias`` (out,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | Activation | None = None,
        init: str | None = None,
    ) -> None:
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.activation = activations.get(activation)
        default_init = "he_uniform" if self.activation.spec.init == "he" else "glorot_uniform"
        init = default_init if init is None else init
        if init not in INITS:
            raise ValueError(f"init: unknown initialisation {init!r}; expected one of {', '.join(INITS)}")
        self.init = init
        self.weight: Parameter | None = None
        self.bias: Parameter | None = None
        self._saved: tuple = ()  # what forward keeps for backward: (x, z or a), or ()
        self._backend: Any = None

    # -- set-up, done by the owning model --------------------------------------------------

    @property
    def num_parameters(self) -> int:
        return self.in_features * self.out_features + self.out_features

    def bind(self, arena: Arena, index: int, backend: Any) -> None:
        """Take this layer's parameters from ``arena`` (weight first, then bias).

        ``backend`` (a gpubp.backends.base.Backend, the model's) runs ``dense_forward`` /
        ``dense_backward``.
        """
        self.weight = arena.carve(f"{index}.weight", (self.in_features, self.out_features))
        self.bias = arena.carve(f"{index}.bias", (self.out_features,))
        self._backend = backend
        self._saved = ()

    def initial_weight(self, rng: np.random.Generator) -> np.ndarray | None:
        """Draw W (in, out) in float64 from ``rng``.

        He: std = gain / sqrt(fan_in), gain = sqrt(2 / (1 + slope^2)).
        Glorot: std = sqrt(2 / (fan_in + fan_out)).
        Uniform draws use the bound sqrt(3) * std (same variance).
        """
        fan_in, fan_out = self.in_features, self.out_features
        if self.init.startswith("he"):
            std = self.activation.gain() / math.sqrt(fan_in)
        else:
            std = math.sqrt(2.0 / (fan_in + fan_out))
        shape = (fan_in, fan_out)
        if self.init.endswith("uniform"):
            bound = math.sqrt(3.0) * std
            return rng.uniform(-bound, bound, size=shape)
        return rng.normal(0.0, std, size=shape)

    def parameters(self) -> list[Parameter]:
        if self.weight is None or self.bias is None:
            raise RuntimeError("Dense layer has no parameters until it is part of a Sequential model")
        return [self.weight, self.bias]

    # -- forward / backward pair -----------------------------------------------------------

    def forward(self, x: Any, training: bool = True) -> Any:
        """a = f(x @ W + b) for x (N, in); keeps (x, z or a) for backward when training."""
        w, b = self.parameters()
        a, saved = self._backend.dense_forward(x, w.data, b.data, self.activation, training, **self._precision())
        self._saved = saved
        return a

    def backward(self, da: Any, need_dx: bool = True) -> Any:
        """Given da (N, out): write dW and db into the parameters' grads; return dx (N, in) or None."""
        if not self._saved:
            raise RuntimeError("backward called without a training forward pass before it")
        w, b = self.parameters()
        dx = self._backend.dense_backward(da, self._saved, w.data, self.activation, w.grad, b.grad, need_dx,
                                          **self._precision())
        self._saved = ()
        return dx

    def config(self) -> dict[str, Any]:
        return {
            "type": "Dense",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "activation": self.activation.config(),
            "init": self.init,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Dense:
        if cfg.get("type") != "Dense":
            raise ValueError(f"layer config: expected type 'Dense', got {cfg.get('type')!r}")
        act = cfg["activation"]
        return cls(cfg["in_features"], cfg["out_features"], Activation(act["name"], **act["params"]), cfg["init"])

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.out_features}, activation={self.activation!r})"


class Dropout(Layer):
    """Inverted dropout: ``y = x * keep / (1 - p)``, each element kept with probability 1 - p.

    Active while training (in ``fit``, and in a forward pass with ``training=True`` while
    the model is in ``model.train()`` mode, the default); the identity in ``predict``,
    ``evaluate`` and ``model.eval()`` mode.

    The mask comes from a counter-based generator keyed by (model seed, epoch, step,
    layer index) and the element's index in the step's whole batch (gpubp._random): the same
    mask for a row whichever rank or micro-batch computes it, and the same
    mask on every backend, whatever the launch shape or thread count, so a run is
    reproducible and resumable bit for bit. Outside ``fit`` the step is the last one
    ``fit`` ran (0 before any), so repeated forward passes see one fixed mask (what a
    gradient check needs). Forward saves the mask for backward: dx = dy * keep / (1 - p).
    """

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"p: expected a number in [0, 1), got {type(p).__name__}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
        self.p = float(p)
        self._key = 0
        self._row0 = 0
        self._active = False
        self._backend: Any = None
        self._saved = ()

    def prepare(self, seed: int, epoch: int, step: int, index: int, active: bool, row0: int = 0) -> None:
        self._key = dropout_key(seed, epoch, step, index)
        self._row0 = int(row0)
        self._active = active and self.p > 0

    def key(self, features: int) -> int:
        """The mask's key for this step's rows (F = ``features``): rows row0.. of the step's batch
        take the batch's mask from element row0 x F on."""
        return offset_key(self._key, self._row0 * features) if self._row0 else self._key

    def forward(self, x: Any, training: bool = True) -> Any:
        """y (N, F) for x (N, F); keeps the mask for backward when training and active."""
        if not (training and self._active):
            self._saved = ("identity",) if training else ()
            return x
        key = step_plan.value(functools.partial(self.key, int(x.shape[1])), "dropout key")
        y, keep = self._backend.dropout_forward(x, key, self.p, **self._precision())
        self._saved = (keep,)
        return y

    def backward(self, da: Any, need_dx: bool = True) -> Any:
        """dx = da * keep / (1 - p) (N, F), or da itself when the forward pass was the identity."""
        if not self._saved:
            raise RuntimeError("backward called without a training forward pass before it")
        (keep,) = self._saved
        self._saved = ()
        if isinstance(keep, str):
            return da
        return self._backend.dropout_backward(da, keep, self.p, **self._precision())

    def config(self) -> dict[str, Any]:
        return {"type": "Dropout", "p": self.p}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Dropout:
        if cfg.get("type") != "Dropout":
            raise ValueError(f"layer config: expected type 'Dropout', got {cfg.get('type')!r}")
        return cls(cfg["p"])

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


LAYER_TYPES: dict[str, type[Layer]] = {"Dense": Dense, "Dropout": Dropout}


def from_config(cfg: dict[str, Any]) -> Layer:
    """The layer a :meth:`Layer.config` dict describes."""
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if kind not in LAYER_TYPES:
        raise ValueError(f"layer config: unknown layer type {kind!r}; expected one of {', '.join(LAYER_TYPES)}")
    return LAYER_TYPES[kind].from_config(cfg)
