"""The row types the backend interface runs: an optimizer's :class:`Rule` (with its packed
:class:`Hyper` parameters) for ``Backend.update``, a loss's :class:`LossRule` for ``Backend.loss``.

They are plain bundles of functions, defined here, under the interface, so that the backends
need nothing from above them. Each row makes one in its own file (``gpubp/optim/<name>.py``,
``gpubp/losses/<name>.py``); what each function of a bundle does is written in
``gpubp/optim/rule.py``'s and ``gpubp/losses/base.py``'s docstrings, which re-export them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["MAX_STATE", "Hyper", "Rule", "FAMILIES", "LossRule"]


# --- optimizer updates -------------------------------------------------------------------------

#: The most state buffers one rule keeps (the generic kernels take this many).
MAX_STATE = 3


class Hyper(NamedTuple):
    """Packed hyper-parameters of one step: ``flags`` (ints, compile-time constants of a compiled
    update) and ``scalars`` (numbers in the data dtype)."""

    flags: tuple[int, ...]
    scalars: tuple[Any, ...]


@dataclass(frozen=True)
class Rule:
    """One optimizer's update maths (see the module docstring)."""

    name: str
    state: tuple[str, ...]
    pack: Callable[[Mapping[str, Any], int, Any], Hyper]
    uses: Callable[[tuple[int, ...]], tuple[bool, ...]]
    spec: Callable[..., None]
    scalar: Callable[[Any], Callable]
    #: hyper-parameter sets that cover every branch (tests, PTX checks); keys as ``pack`` reads them
    examples: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if len(self.state) > MAX_STATE:
            raise ValueError(f"state: at most {MAX_STATE} buffers, got {self.state}")

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"

    def live(self, state: tuple, hp: Hyper) -> tuple[bool, ...]:
        """Which state buffers the update writes (``uses``), after checking ``state``: one entry per
        buffer of the rule, an array wherever one is used. ValueError naming a missing buffer."""
        if len(state) != len(self.state):
            raise ValueError(f"state: expected {len(self.state)} buffers {self.state}, got {len(state)}")
        used = tuple(bool(u) for u in self.uses(hp.flags))
        for name, a, u in zip(self.state, state, used, strict=True):
            if u and a is None:
                raise ValueError(f"{name}: required by this {self.name} update")
        return used

    def slots(self, state: tuple, hp: Hyper, filler: Any) -> tuple[tuple, tuple[bool, ...]]:
        """The :data:`MAX_STATE` arrays a generic kernel takes (``filler``, never written, for the
        absent ones) and which of them it writes back."""
        live = self.live(state, hp)
        arrays = tuple(a if u else filler for a, u in zip(state, live, strict=True))
        pad = MAX_STATE - len(arrays)
        return arrays + (filler,) * pad, live + (False,) * pad


# --- losses ------------------------------------------------------------------------------------

#: The kernel families a compiled backend has: one generic element-wise kernel, the softmax rows.
FAMILIES = ("elementwise", "softmax")


@dataclass(frozen=True)
class LossRule:
    """One loss's maths as the backends run it (see the module docstring)."""

    name: str
    family: str
    spec: Callable[..., tuple[float, Any]]
    #: element-wise rows: ``scalar(ops) -> term(p, t, g) -> (gradient element, float64 value term)``
    scalar: Callable[[Any], Callable] | None = None
    #: the gradient's factor is dtype(grad_factor x scale [x w_i]) (2 for the square's derivative)
    grad_factor: float = 1.0
    #: the PyTorch twin: a torch.nn.functional name and its keyword arguments
    torch: tuple[str, Mapping[str, Any]] = field(default=("", {}), compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")
        if (self.family == "elementwise") != (self.scalar is not None):
            raise ValueError(f"{self.name}: an element-wise loss has a scalar term, and only it")

    def __repr__(self) -> str:
        return f"LossRule({self.name!r})"

    def torch_loss(self, reduction: str = "mean") -> Callable:
        """``fn(input, target)``: the PyTorch twin (torch.nn.functional) with ``reduction``."""
        import torch.nn.functional as F  # noqa: N812

        name, kwargs = self.torch
        fn = getattr(F, name)

        def twin(input: Any, target: Any) -> Any:  # noqa: A002 - torch's name
            return fn(input, target, reduction=reduction, **kwargs)

        twin.__name__ = twin.__qualname__ = name
        return twin
