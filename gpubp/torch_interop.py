"""PyTorch in and out: a ``torch.nn.Sequential`` of Linear layers as a gpubp model, and back.

    import gpubp as gp
    from gpubp.torch_interop import from_torch, to_torch, optimizer_from_torch, optimizer_to_torch

    model = from_torch(net)                      # net: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), ...)
    net2 = to_torch(model)                       # nn.Sequential(Linear, ReLU, ..., Dropout)
    adam = optimizer_from_torch(torch_adam, model)
    torch_adam2 = optimizer_to_torch(adam, net2.parameters())

torch is imported when one of these functions is called, never by ``import gpubp``.

Layout. torch's ``Linear`` keeps ``weight`` as (out, in) and computes ``y = x @ weight.T + bias``;
gpubp's ``Dense`` keeps ``W`` as (in, out) and computes ``z = x @ W + b``. So ``W = weight.T``
and ``b = bias``, copied exactly (a float64 value stays the same bits both ways).

Structure. A torch Sequential converts when it is flat and holds only these modules, in a
shape gpubp's layers can express (``Dense`` is a Linear with its activation inside it):

| torch module                              | gpubp                                              |
|-------------------------------------------|----------------------------------------------------|
| ``Linear(in, out)``                       | ``Dense(in, out)`` (identity unless an activation follows) |
| ``ReLU``                                  | ``activation="relu"`` of the Linear just before    |
| ``LeakyReLU(negative_slope)``             | ``Activation("leaky_relu", slope=negative_slope)`` |
| ``ELU(alpha)``                            | ``Activation("elu", alpha=alpha)``, alpha >= 0     |
| ``Sigmoid``, ``Tanh``, ``SiLU``           | ``"sigmoid"``, ``"tanh"``, ``"silu"``              |
| ``GELU(approximate="none")``              | ``"gelu"`` (z Phi(z), with erf)                    |
| ``GELU(approximate="tanh")``              | ``"gelu_tanh"``                                    |
| ``Softplus(beta, threshold)``             | ``Activation("softplus", beta=beta, threshold=threshold)``, beta > 0 |
| ``Dropout(p)``                            | ``Dropout(p)``, p < 1                              |
| ``Identity``                              | nothing (it changes no value, wherever it stands)  |

The formulas agree term for term (gpubp.activations states gpubp's): ``LeakyReLU`` is
``x if x > 0 else slope x``; ``ELU`` is ``x if x > 0 else alpha (e^x - 1)``; ``Softplus`` is
``x where beta x > threshold`` (strictly greater, as in gpubp), else ``log(1 + e^(beta x)) / beta``;
the tanh GELU is ``x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``. What gpubp cannot express is
refused, never approximated: ELU with alpha < 0, Softplus with beta <= 0 or an infinite or NaN
parameter, Dropout(p=1).

An activation must follow its Linear directly (Identity modules between them are skipped);
in-place flags (``ReLU(inplace=True)``, ``Dropout(inplace=True)``) are accepted: inside a
Sequential the module works on the Linear's fresh output, so the values are the same.
Everything else is refused with ValueError (TypeError for what is not a Sequential) naming
the module as ``module[i] 'name' (Type)``: other layer types (Conv, BatchNorm, Flatten, PReLU,
AlphaDropout, subclasses of the supported types), nested containers, an activation first or
after another activation or after Dropout, the same Linear object twice (tied weights),
widths that do not chain, modules with forward hooks, Dropout modules whose train/eval mode
differs from the Sequential's.

A Linear without a bias (``bias=False``) is refused by default, since gpubp's Dense always
has one; ``missing_bias="zero"`` converts it with a zero bias instead. Predictions are then
the same, but the bias is a trainable parameter of the gpubp model (training moves it away
from 0) and ``to_torch`` gives back a Linear with a bias.

Mode: the model is in ``eval()`` mode when the torch Sequential is (``module.training`` is
False), and the torch Sequential ``to_torch`` returns is in the model's mode. Dropout masks
come from each library's own generator, so training-mode outputs differ; predictions do not.

Optimizer state (:func:`optimizer_to_torch`, :func:`optimizer_from_torch`): every gpubp optimizer
with a ``torch_name`` (SGD, Adam, AdamW, RMSprop, Adagrad, ...) has the same hyper-parameters, update
equations and state buffers in both libraries (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, ``square_avg``, ``grad_avg``, ``sum``, ...), the weight buffers transposed like the weights. torch keeps a step count
per parameter (``state[p]["step"]``), gpubp one per optimizer: they must all be equal. torch's SGD
keeps no step count: its momentum buffer existing is what "not the first step" means, and gpubp's
``step_count >= 1`` means the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp import optim
from gpubp.activations import Activation
from gpubp.layers import Dense, Dropout
from gpubp.model import Sequential, _dtype
from gpubp.parameter import Parameter

if TYPE_CHECKING:  # torch is optional: imported when a function here is called
    import torch

__all__ = ["from_torch", "to_torch", "optimizer_from_torch", "optimizer_to_torch", "MISSING_BIAS"]

MISSING_BIAS = ("refuse", "zero")

# torch.optim class name -> the gpubp optimizer with the same maths (each optimizer's ``torch_name``;
# the same class names, hyper-parameters and state buffer names).
_OPTIMIZERS: dict[str, type[optim.Optimizer]] = {c.torch_name: c for c in optim.OPTIMIZERS.values() if c.torch_name}


def _names() -> str:
    """"SGD, Adam, ... or Adagrad": the optimizer classes mapped."""
    names = list(_OPTIMIZERS)
    return ", ".join(names[:-1]) + " or " + names[-1]


def _torch() -> Any:
    """The torch module, or ImportError saying how to get it."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("gpubp.torch_interop needs PyTorch: pip install torch") from e
    return torch


# --- activations ----------------------------------------------------------------------------


def _activation_from(m: Any, where: str, nn: Any) -> Activation:
    """The gpubp activation of the torch activation module ``m`` (an exact type of ACTIVATION_TYPES)."""
    kind = type(m)
    try:
        if kind is nn.ReLU:
            return Activation("relu")
        if kind is nn.LeakyReLU:
            return Activation("leaky_relu", slope=float(m.negative_slope))
        if kind is nn.ELU:
            alpha = float(m.alpha)
            if not alpha >= 0:
                raise ValueError(f"alpha={m.alpha!r}: gpubp's elu needs alpha >= 0")
            return Activation("elu", alpha=alpha)
        if kind is nn.Sigmoid:
            return Activation("sigmoid")
        if kind is nn.Tanh:
            return Activation("tanh")
        if kind is nn.SiLU:
            return Activation("silu")
        if kind is nn.GELU:
            if m.approximate == "none":
                return Activation("gelu")
            if m.approximate == "tanh":
                return Activation("gelu_tanh")
            raise ValueError(f"approximate={m.approximate!r}: expected 'none' or 'tanh'")
        if kind is nn.Softplus:
            beta, threshold = float(m.beta), float(m.threshold)
            if not (math.isfinite(beta) and math.isfinite(threshold)):
                raise ValueError(f"beta={m.beta!r}, threshold={m.threshold!r}: gpubp's softplus needs finite values")
            if not beta > 0:
                raise ValueError(f"beta={m.beta!r}: gpubp's softplus needs beta > 0")
            return Activation("softplus", beta=beta, threshold=threshold)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot be expressed as a gpubp activation: {e}") from None
    raise AssertionError(f"{where}: not an activation type")  # callers check the type first


def _activation_to(act: Activation, nn: Any) -> Any:
    """The torch module of gpubp activation ``act`` (its row's PyTorch twin); None for the identity."""
    return act.to_torch(nn)


def _activation_types(nn: Any) -> tuple[type, ...]:
    return (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU, nn.Softplus)


# --- torch -> gpubp --------------------------------------------------------------------------


def _torch_dtype_name(dtype: Any, torch: Any) -> str | None:
    return {torch.float32: "float32", torch.float64: "float64"}.get(dtype)


def _want_dtype(dtype: Any, torch: Any) -> str | None:
    """The dtype argument as "float32"/"float64" (a torch.dtype is accepted too), or None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name = _torch_dtype_name(dtype, torch)
        if name is None:
            raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
        return name
    return _dtype(dtype).name


def _refusal(kind: type, nn: Any) -> str:
    """Why a module type is not converted (the tail of the ValueError)."""
    supported = ("Linear, ReLU, LeakyReLU, ELU, Sigmoid, Tanh, GELU, SiLU, Softplus, Dropout, Identity "
                 "(exactly these types, not subclasses)")
    if issubclass(kind, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return f"nested containers are not flattened; pass one flat nn.Sequential of {supported}"
    if kind is nn.Flatten or kind is nn.Unflatten:
        return "gpubp takes inputs of shape (N, features): reshape the data and convert the modules after it"
    return f"gpubp converts only {supported}"


def from_torch(
    module: torch.nn.Sequential,
    *,
    dtype: Any = None,
    device: str = "cpu",
    seed: int = 0,
    missing_bias: str = "refuse",
) -> Sequential:
    """The gpubp model computing what ``module``, a flat ``torch.nn.Sequential``, computes.

    Args:
        module: e.g. ``nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))``;
            the supported modules and arrangements are in the module docstring.
        dtype: ``"float32"`` or ``"float64"`` (or the torch dtype); None: that of the module's
            parameters, which must then all be float32 or all float64. Given, the parameters are
            cast to it (float16 or bfloat16 modules convert only this way).
        device: the gpubp model's device (``"cpu"``, ``"cuda"``, ...), wherever the module's
            parameters live.
        seed: the model's seed (its Dropout masks and fit's shuffling).
        missing_bias: a Linear with ``bias=False``: ``"refuse"`` (ValueError, the default) or
            ``"zero"`` (a Dense with a zero bias; see the module docstring).

    Returns:
        A :class:`gpubp.Sequential`: each Linear's ``weight`` (out, in) becomes its Dense's W
        (in, out) = weight.T, its ``bias`` (out,) b; in eval mode when ``module`` is.

    Raises:
        TypeError: ``module`` is not a torch.nn.Sequential (subclasses neither, as they may
            change forward).
        ValueError: a module gpubp cannot express, named ``module[i] 'name' (Type)``.
    """
    torch = _torch()
    nn = torch.nn
    if not isinstance(module, nn.Module) or type(module) is not nn.Sequential:
        raise TypeError(f"module: expected a torch.nn.Sequential, got {type(module).__name__}")
    if missing_bias not in MISSING_BIAS:
        raise ValueError(f"missing_bias: expected one of {', '.join(map(repr, MISSING_BIAS))}, got {missing_bias!r}")
    target = _want_dtype(dtype, torch)
    if module._forward_hooks or module._forward_pre_hooks:
        raise ValueError("module: has forward hooks, which may change its output; remove them to convert")
    activations = _activation_types(nn)

    names = list(module._modules)  # Sequential's own order; iterating it repeats shared modules, as forward does
    children = list(module)
    # (torch index, "linear" | "dropout", payload) before conversion; linear payload [m, Activation | None]
    plan: list[tuple[str, Any]] = []
    prev: tuple[str, str] | None = None  # (kind of the last non-Identity module, its description)
    seen_linear: dict[int, str] = {}
    width: tuple[int, str] | None = None
    source_dtype: tuple[Any, str] | None = None
    for i, (name, m) in enumerate(zip(names, children, strict=True)):
        where = f"module[{i}]" + (f" {name!r}" if name != str(i) else "") + f" ({type(m).__name__})"
        if m is not None and (m._forward_hooks or m._forward_pre_hooks):
            raise ValueError(f"{where}: has forward hooks, which may change its output; remove them to convert")
        kind = type(m)
        if kind is nn.Identity:
            continue
        if kind is nn.Linear:
            if id(m) in seen_linear:
                raise ValueError(f"{where}: the same Linear object is also {seen_linear[id(m)]}; gpubp layers do not "
                                 "share parameters (tied weights)")
            seen_linear[id(m)] = where
            w, b = m.weight, m.bias
            if tuple(w.shape) != (m.out_features, m.in_features):
                raise ValueError(f"{where}: weight has shape {tuple(w.shape)}, expected (out_features, in_features) = "
                                 f"{(m.out_features, m.in_features)}")
            if b is None and missing_bias == "refuse":
                raise ValueError(f"{where}: has no bias (bias=False) and gpubp's Dense always has one; pass "
                                 "missing_bias='zero' to convert it with a zero bias")
            if b is not None and tuple(b.shape) != (m.out_features,):
                raise ValueError(f"{where}: bias has shape {tuple(b.shape)}, expected ({m.out_features},)")
            for t in (w, b):
                if t is None:
                    continue
                if t.is_meta:
                    raise ValueError(f"{where}: its parameters are on the meta device (no values to copy)")
                if not t.is_floating_point():
                    raise ValueError(f"{where}: parameters of dtype {t.dtype}; expected floating point")
                if target is None:
                    if _torch_dtype_name(t.dtype, torch) is None:
                        raise ValueError(f"{where}: parameters of dtype {t.dtype}; gpubp keeps float32 or float64: "
                                         "pass dtype='float32' or 'float64' to convert them")
                    if source_dtype is not None and t.dtype != source_dtype[0]:
                        raise ValueError(f"{where}: parameters of dtype {t.dtype} but {source_dtype[1]} has "
                                         f"{source_dtype[0]}; pass dtype= to convert them all to one")
                    source_dtype = source_dtype or (t.dtype, where)
            if width is not None and m.in_features != width[0]:
                raise ValueError(f"{where}: in_features={m.in_features} does not match out_features={width[0]} of "
                                 f"{width[1]}")
            width = (m.out_features, where)
            plan.append(("linear", [m, None]))
            prev = ("linear", where)
        elif kind in activations:
            if prev is None:
                raise ValueError(f"{where}: an activation first; gpubp applies each activation inside the Dense "
                                 "layer of the Linear before it")
            if prev[0] != "linear":
                what = "another activation" if prev[0] == "activation" else "a Dropout"
                raise ValueError(f"{where}: follows {what} ({prev[1]}); gpubp applies one activation inside the "
                                 "Dense layer of a Linear, right after it")
            plan[-1][1][1] = _activation_from(m, where, nn)
            prev = ("activation", where)
        elif kind is nn.Dropout:
            p = float(m.p)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{where}: p={m.p!r}; gpubp's Dropout needs 0 <= p < 1")
            if p > 0 and m.training != module.training:
                raise ValueError(f"{where}: in {'train' if m.training else 'eval'} mode while the Sequential is "
                                 f"not; gpubp has one mode per model: call .train() or .eval() on the Sequential")
            plan.append(("dropout", p))
            prev = ("dropout", where)
        else:
            raise ValueError(f"{where}: not supported; {_refusal(kind, nn) if m is not None else 'an empty slot'}")
    if not seen_linear:
        raise ValueError("module: holds no Linear layer; gpubp's Sequential needs at least one")

    dt = target or _torch_dtype_name(source_dtype[0], torch)
    tdt = torch.float64 if dt == "float64" else torch.float32
    layers: list[Dense | Dropout] = []
    arrays: list[np.ndarray] = []
    with torch.no_grad():
        for kind, payload in plan:
            if kind == "dropout":
                layers.append(Dropout(payload))
                continue
            m, act = payload
            layers.append(Dense(m.in_features, m.out_features, activation=act))
            w = m.weight.detach().to(device="cpu", dtype=tdt).numpy()
            arrays.append(np.ascontiguousarray(w.T))  # (out, in) -> (in, out)
            if m.bias is None:
                arrays.append(np.zeros(m.out_features, dtype=dt))
            else:
                arrays.append(m.bias.detach().to(device="cpu", dtype=tdt).numpy())
    cfg = {"layers": [layer.config() for layer in layers], "dtype": dt, "seed": seed, "check_finite": False,
           "dense_impl": "auto"}
    model = Sequential.from_config(cfg, device=device, initialise=False)
    host = np.empty(model.num_parameters, dtype=model.dtype)
    for p, a in zip(model.parameters(), arrays, strict=True):
        host[p.offset : p.offset + p.size] = a.ravel()
    model.arena.backend.assign_(model.arena.data, host)
    return model.train() if module.training else model.eval()


# --- gpubp -> torch --------------------------------------------------------------------------


def _host_parameters(model: Sequential) -> dict[str, np.ndarray]:
    """Host copies of every parameter by name, (in, out) weights as gpubp keeps them."""
    flat = model.arena.backend.to_numpy(model.arena.data)  # a host copy, wherever the parameters live
    return {p.name: flat[p.offset : p.offset + p.size].reshape(p.shape) for p in model.parameters()}


def to_torch(model: Sequential, *, device: Any = "cpu") -> torch.nn.Sequential:
    """A ``torch.nn.Sequential`` computing what ``model`` computes.

    Each Dense(in, out, activation) becomes ``nn.Linear(in, out)`` with ``weight`` (out, in) =
    W.T and ``bias`` = b, followed by the activation's module (none for the identity; the
    table is in the module docstring); each Dropout(p) becomes ``nn.Dropout(p)``. Parameters
    are of the model's dtype (torch.float32 / torch.float64), on torch ``device``, copied to
    the host through the model's backend first when the model is on a GPU; the torch global
    random state is left untouched (the Linear layers are not initialised before the copy).
    The Sequential is in the model's mode (``train()`` / ``eval()``).

    Raises:
        TypeError: ``model`` is not a gpubp.Sequential, or holds a layer other than Dense or Dropout.
    """
    torch = _torch()
    nn = torch.nn
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    tdt = torch.float64 if model.dtype.name == "float64" else torch.float32
    host = _host_parameters(model)
    modules: list[Any] = []
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            where = f"model.layers[{i}] ({type(layer).__name__})"
            if type(layer) is Dense:
                w, b = (host[p.name] for p in layer.parameters())
                lin = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=True,
                                         device=device, dtype=tdt)
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
                lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
                modules.append(lin)
                act = _activation_to(layer.activation, nn)
                if act is not None:
                    modules.append(act)
            elif type(layer) is Dropout:
                modules.append(nn.Dropout(layer.p))
            else:
                raise TypeError(f"{where}: expected Dense or Dropout")
    return nn.Sequential(*modules).train(model.training)


# --- optimizer state -------------------------------------------------------------------------


def _check_pairs(gp_params: list[Parameter], torch_params: list[Any], what: str) -> None:
    """Same count, and each torch tensor shaped as the transpose of its gpubp parameter."""
    if len(gp_params) != len(torch_params):
        raise ValueError(f"{what}: {len(torch_params)} torch parameters for {len(gp_params)} gpubp parameters")
    for i, (p, t) in enumerate(zip(gp_params, torch_params, strict=True)):
        if tuple(t.shape) != p.shape[::-1]:
            raise ValueError(f"{what}[{i}]: torch shape {tuple(t.shape)} does not match gpubp parameter {p.name!r} "
                             f"{p.shape} (torch keeps a Linear weight as (out, in), gpubp as (in, out))")


def _scalar_dtype(torch: Any) -> Any:
    """The dtype torch.optim gives a fresh ``step`` tensor (float64 only under that default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def optimizer_to_torch(optimizer: optim.Optimizer, params: Any) -> torch.optim.Optimizer:
    """The torch.optim optimizer of the same class, hyper-parameters and state, over ``params``.

    Args:
        optimizer: a gpubp SGD, Adam, AdamW, RMSprop or Adagrad.
        params: the torch parameters in the order of ``optimizer.params``: e.g.
            ``to_torch(model).parameters()`` for an optimizer over ``model.parameters()``
            (a torch.nn.Module is taken as its ``parameters()``). Each is shaped as the transpose
            of its gpubp parameter: (out, in) weights, (out,) biases.

    Returns:
        ``torch.optim.<Name>(params, **hyper-parameters)`` holding, once ``optimizer`` has stepped,
        each parameter's buffers (transposed like the weights) and ``step`` (a tensor, for all but
        SGD); its next ``step()`` with the same gradients gives the same parameters.

    Raises:
        TypeError: an optimizer class gpubp does not map to torch.optim.
        ValueError: ``params`` do not pair with the optimizer's parameters.
    """
    torch = _torch()
    name = type(optimizer).__name__
    if _OPTIMIZERS.get(name) is not type(optimizer):
        raise TypeError(f"optimizer: expected a gpubp {_names()}, got {name}")
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    tparams = list(params)
    _check_pairs(optimizer.params, tparams, "params")
    sd = optimizer.state_dict()
    meta, tensors = sd["meta"], sd["state"]
    topt = getattr(torch.optim, optimizer.torch_name)(tparams, **optimizer.torch_kwargs(meta))
    step = int(meta["step"])
    if step == 0:
        return topt  # torch's fresh state is gpubp's fresh state (Adagrad's sum included)
    tsd = topt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for i, (p, t) in enumerate(zip(optimizer.params, tparams, strict=True)):
        entry: dict[str, Any] = {}
        for key, arr in tensors.items():
            if key.startswith(p.name + "."):
                entry[key[len(p.name) + 1 :]] = torch.from_numpy(np.ascontiguousarray(arr.T)).to(t.device)
        if name != "SGD":
            entry["step"] = torch.tensor(float(step), dtype=_scalar_dtype(torch))
        state[i] = entry
    tsd["state"] = state
    topt.load_state_dict(tsd)
    return topt


def optimizer_from_torch(optimizer: torch.optim.Optimizer, params: Sequential | Iterable[Parameter], *,
                         step: int | None = None) -> optim.Optimizer:
    """The gpubp optimizer of the same class, hyper-parameters and state, over ``params``.

    Args:
        optimizer: a torch.optim SGD, Adam, AdamW, RMSprop or Adagrad with one parameter group
            (torch's Adam with ``decoupled_weight_decay=True`` is gpubp's AdamW); ``maximize``
            must be False. ``foreach``, ``fused``, ``capturable``, ``differentiable`` and
            scheduler keys such as ``initial_lr`` are not read.
        params: a gpubp.Sequential (its ``parameters()``) or gpubp parameters, in the order of
            the group's torch parameters, each shaped as the transpose of its torch tensor.
        step: SGD only (torch's keeps no count): the gpubp ``step_count``; default 1 when the
            momentum buffers exist (any count >= 1 steps alike), else 0.

    Returns:
        The gpubp optimizer; its next ``step()`` with the same gradients gives the same parameters
        as torch's. State buffers are cast to the parameters' dtype.

    Raises:
        TypeError: an optimizer class without a gpubp twin.
        ValueError: several parameter groups, ``maximize``, state only some parameters have or
            step counts that differ between parameters, params that do not pair.
    """
    torch = _torch()
    kind = type(optimizer)
    name = kind.__name__
    if name not in _OPTIMIZERS or getattr(torch.optim, name, None) is not kind:
        raise TypeError(f"optimizer: expected a torch.optim {_names()}, got {name}")
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"optimizer: has {len(optimizer.param_groups)} parameter groups; a gpubp optimizer has one "
                         "set of hyper-parameters")
    group = optimizer.param_groups[0]
    if group.get("maximize", False):
        raise ValueError("optimizer: maximize=True; gpubp's optimizers minimise")
    if name in ("Adam", "AdamW") and group.get("decoupled_weight_decay", name == "AdamW"):
        name = "AdamW"
    cls = _OPTIMIZERS[name]
    gp_params = params.parameters() if isinstance(params, Sequential) else list(params)
    tparams = list(group["params"])
    _check_pairs(gp_params, tparams, "optimizer.param_groups[0]['params']")

    def number(v: Any) -> Any:
        return float(v) if isinstance(v, torch.Tensor) else v

    hp = {k: number(group[k]) for k in cls._hparam_names}
    if "betas" in hp:
        hp["betas"] = tuple(number(b) for b in hp["betas"])
    gopt = cls(gp_params, **hp)
    fresh = gopt.state_dict()
    buffers = sorted({k[len(p.name) + 1 :] for p in gp_params for k in fresh["state"] if k.startswith(p.name + ".")})

    states = [{k: v for k, v in optimizer.state.get(t, {}).items() if v is not None} for t in tparams]
    has = [bool(s) for s in states]
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
        raise ValueError(f"step: expected an integer >= 0 or None, got {step!r}")
    if any(has) and not all(has):
        missing = [i for i, h in enumerate(has) if not h]
        raise ValueError(f"optimizer: state for some parameters only (none for indices {missing}); gpubp keeps one "
                         "state for all")
    if name == "SGD":
        if step is not None and any(has) and step == 0:
            raise ValueError("step: 0 means no step taken, but the momentum buffers exist; pass step >= 1")
        if step is not None and not any(has) and step > 0 and hp["momentum"] != 0:
            raise ValueError(f"step: {step} steps taken, but torch holds no momentum buffers; pass step=0 or None")
        count = (1 if any(has) else 0) if step is None else int(step)
    else:
        steps = sorted({float(s["step"]) for s in states if "step" in s})
        if len(steps) > 1:
            raise ValueError(f"optimizer: per-parameter step counts differ ({steps}); gpubp keeps one per optimizer")
        count = int(steps[0]) if steps else 0
        if steps and steps[0] != count:
            raise ValueError(f"optimizer: step count {steps[0]} is not an integer")
        if step is not None and step != count:
            raise ValueError(f"step: {name} keeps its step count ({count}) in its state; pass step only for SGD")
    if count == 0:
        return gopt
    tensors: dict[str, np.ndarray] = {}
    for i, (p, s) in enumerate(zip(gp_params, states, strict=True)):
        for buf in buffers:
            if buf not in s:
                raise ValueError(f"optimizer.state[param {i}]: no {buf!r} (has {sorted(s)})")
            arr = s[buf].detach().to("cpu").numpy().T
            tensors[f"{p.name}.{buf}"] = np.ascontiguousarray(arr, dtype=p.arena.dtype)
    meta = dict(fresh["meta"], step=count)
    gopt.load_state_dict({"meta": meta, "state": tensors})
    return gopt
