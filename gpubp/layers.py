"""Dense layer: z = x @ W + b, a = f(z), with its backward pass beside it.

Shapes: x (N, in), W (in, out), b (out,), z and a (N, out). The maths runs in the
model's backend (gpubp.backends.base.Backend; the NumPy reference on the CPU); this class holds the
parameters, what forward saves for backward, and the initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gpubp import activations
from gpubp._validate import positive_int
from gpubp.activations import Activation
from gpubp.parameter import Arena, Parameter

INITS = ("he_uniform", "he_normal", "glorot_uniform", "glorot_normal")


class Dense:
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

    def initial_weight(self, rng: np.random.Generator) -> np.ndarray:
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
        a, saved = self._backend.dense_forward(x, w.data, b.data, self.activation, training)
        self._saved = saved
        return a

    def backward(self, da: Any, need_dx: bool = True) -> Any:
        """Given da (N, out): write dW and db into the parameters' grads; return dx (N, in) or None."""
        if not self._saved:
            raise RuntimeError("backward called without a training forward pass before it")
        w, b = self.parameters()
        dx = self._backend.dense_backward(da, self._saved, w.data, self.activation, w.grad, b.grad, need_dx)
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
