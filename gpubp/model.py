"""Sequential: a chain of layers (Dense, Dropout) with one flat parameter arena.

Forward runs the layers in order, keeping what each backward needs; backward
runs them in reverse and writes every parameter's gradient (=, not +=) into the
gradient arena. ``fit`` / ``evaluate`` / ``predict`` are the training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubp import losses as losses_mod
from gpubp import metrics as metrics_mod
from gpubp import precision as precision_mod
from gpubp import step_plan
from gpubp._lazy import LazyRows, is_array_like
from gpubp._validate import as_float_array, boolean, check_2d, check_finite, positive_int, sample_weights, weight_sum
from gpubp.backends import DENSE_IMPLS, Backend, get_backend
from gpubp.device import Device, parse_device
from gpubp.diagnostics import NonFiniteError
from gpubp.layers import Dense, Layer
from gpubp.layers import from_config as layer_from_config
from gpubp.loss_scale import LossScaler
from gpubp.parameter import Arena, Parameter
from gpubp.training import fit as _fit

if TYPE_CHECKING:
    from gpubp.progress import EpochProgress

DTYPES = ("float32", "float64")


def _dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return dt


class Sequential:
    """A dense network: ``Sequential(Dense(40, 256, "relu"), Dense(256, 10), dtype="float32", seed=0)``.

    Args:
        *layers: Dense and Dropout layers; each Dense layer's in_features must equal the
            previous Dense layer's out_features (Dropout keeps the width).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (the GPU when there is one).
        dtype: ``"float32"`` or ``"float64"``, for parameters, gradients and activations.
        seed: seeds initialisation (numpy.random.Generator) and the shuffling in ``fit``.
        check_finite: when True, every layer's output and gradient and the loss are
            checked, and the first non-finite one raises :class:`NonFiniteError`
            naming the layer. Off by default: it costs a pass over each array.
        dense_impl: how dense layers run on a GPU: ``"unfused"`` (cuBLAS GEMMs and
            separate Numba kernels), ``"fused"`` (the CUDA C kernels of kernels/,
            float32 only), or ``"auto"``: unfused, until the fused kernels have been
            verified on GPU hardware. On the CPU: ``"auto"`` (the fast CPU backend:
            BLAS GEMMs, fused Numba kernels) or ``"reference"`` (the NumPy spec, for
            every operation).
        precision: ``"fp32"`` (the default), ``"tf32"`` (GEMM inputs rounded to TF32, as
            torch's allow_tf32), ``"bf16-mixed"`` or ``"fp16-mixed"`` (float32 master parameters,
            gradients and optimizer state; GEMM inputs, activations and saved tensors in 16
            bits; float32 accumulation; the loss in float32: torch.autocast for dense networks;
            fp16 with dynamic loss scaling, :mod:`gpubp.loss_scale`). The rounding points are
            :mod:`gpubp.precision`'s spec. float32 models only. Without a GPU the 16-bit and
            TF32 arithmetic is emulated in float32 (slower than fp32: it defines the semantics).
            ``fit(precision=...)`` overrides it for one fit.
    """

    def __init__(
        self,
        *layers: Layer,
        device: str = "cpu",
        dtype: Any = "float32",
        seed: int = 0,
        check_finite: bool = False,
        dense_impl: str = "auto",
        precision: str = "fp32",
    ) -> None:
        self._construct(layers, device, dtype, seed, check_finite, dense_impl, precision)
        self._initialise()

    def _construct(self, layers: Any, device: Any, dtype: Any, seed: Any, check_finite: Any, dense_impl: Any,
                   precision: Any = "fp32") -> None:
        """Check the arguments, pick the backend and carve a zeroed arena (no initialisation)."""
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("layers: expected at least one Dense layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}]: expected a Dense or Dropout layer, got {type(layer).__name__}")
            if any(layer is other for other in layers[:i]):
                raise ValueError(f"layers[{i}]: the same {type(layer).__name__} object appears twice; create a new layer")
        if not any(isinstance(layer, Dense) for layer in layers):
            raise ValueError("layers: expected at least one Dense layer")
        width, width_from = None, None
        for i, layer in enumerate(layers):
            if layer.in_features is not None:
                if width is not None and layer.in_features != width:
                    raise ValueError(
                        f"layers[{i}]: in_features={layer.in_features} does not match the previous "
                        f"layer's out_features={width} (layers[{width_from}])"
                    )
                width, width_from = layer.out_features, i
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.layers: list[Layer] = list(layers)
        self.training = True  # train() / eval(): whether forward(training=True) applies dropout
        #: the step of epoch ``epoch + 1`` whose dropout masks training forward passes draw, keyed
        #: by (seed, epoch, dropout_step, layer); fit sets it before each optimizer step
        self.dropout_step = 0
        self.dtype = _dtype(dtype)
        self.seed = int(seed)
        self.check_finite = bool(check_finite)
        if dense_impl not in DENSE_IMPLS:
            raise ValueError(f"dense_impl: expected one of {', '.join(DENSE_IMPLS)}, got {dense_impl!r}")
        self.dense_impl = dense_impl
        self.device: Device = parse_device(device)
        self.epoch = 0  # epochs trained by fit so far (drives the per-epoch shuffle)
        #: a progress.EpochProgress while fit runs an epoch and when it stopped inside one, else None
        #: (its JSON form is progress(); fit sets and clears it)
        self.epoch_progress: EpochProgress | None = None
        self.optimizer: Any = None  # the optimizer fit last used
        self.loss_name: str | None = None  # the loss fit last used (predict_proba's default; in config())
        self._out_shape: tuple[int, ...] | None = None  # output shape of the last training forward
        self._bind(get_backend(self.device, self.dense_impl, self.dtype))
        #: fp16-mixed's dynamic loss scale (made by the first fp16-mixed fit; kept in config())
        self.loss_scaler: LossScaler | None = None
        self.precision = precision

    @property
    def precision(self) -> str:
        """The precision forward, backward and fit run in (see the class docstring)."""
        return self._precision.name

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = precision_mod.check_dtype(value, self.dtype)
        self.use_precision(self._precision)

    def use_precision(self, value: Any) -> None:
        """Run the layers in precision ``value`` (a name or Precision) without changing
        :attr:`precision` (fit's ``precision=`` for the duration of one fit)."""
        p = precision_mod.active(precision_mod.check_dtype(value, self.dtype))
        for layer in self.layers:
            layer.precision = p

    def _bind(self, backend: Backend) -> None:
        """Allocate a zeroed arena on ``backend`` and carve every layer's parameters from it."""
        self._backend = backend
        self.arena = Arena(sum(layer.num_parameters for layer in self.layers), self.dtype, backend)
        for i, layer in enumerate(self.layers):
            layer.bind(self.arena, i, backend)

    def _initialise(self) -> None:
        """Weights from one Generator(seed) in layer order, drawn in float64 then cast; biases 0.

        Drawn on the host and copied once, so every device starts from the same values.
        """
        rng = np.random.default_rng(self.seed)
        host = np.zeros(self.arena.size, dtype=self.dtype)
        offset = 0
        for layer in self.layers:
            w = layer.initial_weight(rng)
            if w is not None:
                host[offset : offset + w.size] = w.ravel()
            offset += layer.num_parameters  # the bias that follows stays 0
        self._backend.assign_(self.arena.data, host)

    # -- structure -------------------------------------------------------------------------

    @property
    def in_features(self) -> int:
        return next(layer.in_features for layer in self.layers if layer.in_features is not None)

    @property
    def out_features(self) -> int:
        return next(layer.out_features for layer in reversed(self.layers) if layer.out_features is not None)

    def train(self) -> Sequential:
        """Training mode (the default): forward passes with training=True apply dropout. Returns self."""
        self.training = True
        return self

    def eval(self) -> Sequential:
        """Evaluation mode: dropout is the identity in every forward pass. Returns self."""
        self.training = False
        return self

    def summary(self, file: Any = None) -> str:
        """A table of the layers (output shape, activation, parameters) and the total, printed
        (to ``file``, default stdout) and returned, as Keras's summary."""
        rows = [("layer", "output shape", "activation", "parameters")]
        width = self.in_features
        for i, layer in enumerate(self.layers):
            width = layer.out_features if layer.out_features is not None else width
            act = layer.activation.name if isinstance(layer, Dense) else "-"
            rows.append((f"{i} {layer!r}", f"(N, {width})", act, f"{layer.num_parameters:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        line = "-" * (sum(widths) + 6)
        fmt = lambda r: "  ".join(v.ljust(w) if c < 3 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
        text = "\n".join([fmt(rows[0]), line, *map(fmt, rows[1:]), line,
                          f"total parameters: {self.num_parameters:,} ({self.dtype.name}, "
                          f"{self.num_parameters * self.dtype.itemsize / 2**20:.2f} MiB), device {self.device}"])
        print(text, file=file)
        return text

    def parameters(self) -> list[Parameter]:
        """Every parameter in layer order: "0.weight", "0.bias", "1.weight", ..."""
        return [p for layer in self.layers for p in layer.parameters()]

    @property
    def num_parameters(self) -> int:
        return self.arena.size

    def zero_grad(self) -> None:
        self.arena.grad[...] = 0

    def progress(self) -> dict[str, Any] | None:
        """Where training stands inside epoch ``epoch + 1``, JSON-serialisable (checkpoints store it);
        None at an epoch boundary.

        Set while ``fit`` runs an epoch and kept when it stops inside one (Ctrl-C, an error
        other than NonFiniteError, after which the epoch starts again):
        ``{"epoch": epochs done, "step": steps of the next epoch already in the parameters,
        "steps", "samples", "batch_size", "shuffle", "world": processes, "optimizer_steps": the
        optimizer's step count, "applied": rows trained so far, "skipped", "sums": [[loss sum,
        correct, counted]] per process}``. The next ``fit`` (with the same batch_size, data and
        shuffle, and an optimizer at that step count) first takes the rest of that epoch, as an
        uninterrupted run would, bit for bit.
        """
        if self.epoch_progress is None or self.epoch_progress.step == 0:
            return None
        return self.epoch_progress.to_dict()

    def load_progress(self, progress: dict[str, Any] | None) -> None:
        """Set where the next ``fit`` starts: a dict from :meth:`progress` (e.g. read back from a
        checkpoint written mid-epoch, whose ``"epoch"`` must equal ``self.epoch``), or None: at
        the first step of epoch ``epoch + 1`` (the steps of a partial epoch are then run again)."""
        from gpubp.progress import EpochProgress

        if progress is None:
            self.epoch_progress = None
            return
        pos = EpochProgress.from_dict(progress)
        if pos.epoch != self.epoch:
            raise ValueError(f"progress['epoch']: the position is inside epoch {pos.epoch + 1}, but this model has "
                             f"trained {self.epoch} epochs (set model.epoch first, as gp.load does)")
        self.epoch_progress = pos if pos.step else None

    def config(self) -> dict[str, Any]:
        """The architecture and settings, JSON-serialisable (saved in checkpoints); ``"loss"``: the
        name of the loss of the last fit, once there was one."""
        cfg = {
            "layers": [layer.config() for layer in self.layers],
            "dtype": self.dtype.name,
            "seed": self.seed,
            "check_finite": self.check_finite,
            "dense_impl": self.dense_impl,
        }
        if self.precision != "fp32":
            cfg["precision"] = self.precision
        if self.loss_scaler is not None:
            cfg["loss_scale"] = self.loss_scaler.state()
        if self.loss_name is not None:
            cfg["loss"] = self.loss_name
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device: str = "cpu", initialise: bool = True) -> Sequential:
        """A model of the architecture ``cfg`` (from :meth:`config`); its parameters are
        initialised from its seed, or left at 0 with ``initialise=False`` (to be loaded)."""
        model = cls.__new__(cls)
        model._construct([layer_from_config(c) for c in cfg["layers"]], device, cfg["dtype"], cfg["seed"],
                         cfg["check_finite"], cfg.get("dense_impl", "auto"), cfg.get("precision", "fp32"))
        scale = cfg.get("loss_scale")
        if scale is not None:
            if not isinstance(scale, dict) or set(scale) != {"scale", "clean"}:
                raise ValueError(f"config['loss_scale']: expected {{'scale': S, 'clean': n}}, got {scale!r}")
            model.loss_scaler = LossScaler(model._backend, scale["scale"], scale["clean"])
        loss = cfg.get("loss")
        model.loss_name = loss if isinstance(loss, str) and loss in losses_mod.NAMES else None
        if initialise:
            model._initialise()
        return model

    def clone(self, dtype: Any = None, device: str | Device | None = None) -> Sequential:
        """A new model of the same architecture with these parameter values (cast to ``dtype``, on ``device``)."""
        cfg = self.config()
        if dtype is not None:
            cfg["dtype"] = _dtype(dtype).name
        twin = Sequential.from_config(cfg, device=self.device if device is None else device, initialise=False)
        twin._backend.assign_(twin.arena.data, self._backend.to_numpy(self.arena.data).astype(twin.dtype))
        twin.epoch, twin.dropout_step, twin.training = self.epoch, self.dropout_step, self.training
        twin.load_progress(self.progress())
        return twin

    def to(self, device: str | Device) -> Sequential:
        """Move parameters and gradients to ``device`` (``"cpu"``, ``"cuda:N"``, ...); returns self.

        Parameters become new objects on the new device: build the optimizer
        after moving (an optimizer of the old parameters is refused by ``fit``).
        """
        target = parse_device(device)
        if target == self.device:
            return self
        data = self._backend.to_numpy(self.arena.data)
        grad = self._backend.to_numpy(self.arena.grad)
        scaler = None if self.loss_scaler is None else self.loss_scaler.state()
        self._bind(get_backend(target, self.dense_impl, self.dtype))
        if scaler is not None:
            self.loss_scaler = LossScaler(self._backend, scaler["scale"], scaler["clean"])
        self._backend.assign_(self.arena.data, data)
        self._backend.assign_(self.arena.grad, grad)
        self.device = target
        self._out_shape = None
        self.optimizer = None
        return self

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return (
            f"Sequential(\n{inner},\n  device={str(self.device)!r}, dtype={self.dtype.name!r}, "
            f"seed={self.seed})  # {self.num_parameters} parameters"
        )

    # -- forward / backward pair -----------------------------------------------------------
    #
    # The public surface the training code (gpubp.training, train_step, lr_find) uses:
    # prepare_input / prepare_data validate once, rows() takes a batch of validated data onto
    # the device, forward_batch / backward_batch run the pair on such a batch without checks,
    # dropout_step and epoch_progress (attributes, above) say where training stands.

    def prepare_input(self, x: Any, name: str = "x", *, check_finite: bool | None = None) -> Any:
        """x (N, in) validated, as a C-contiguous array of the model's dtype on the model's device.

        Host data is validated on the host, then copied to the device; an array already on the
        device (CuPy, or anything exposing __cuda_array_interface__ or DLPack) is taken without a
        copy when its dtype and layout allow; an array-like (np.memmap, h5py, zarr) stays where
        it is, read batch by batch by :meth:`rows`. ``name`` names x in errors;
        ``check_finite``: refuse NaN/Inf (None: the model's ``check_finite``).
        """
        finite = self.check_finite if check_finite is None else check_finite
        x = self._checked(x, name, self.in_features, finite)
        return x if isinstance(x, LazyRows) else self._backend.asarray(x, self.dtype)

    def _checked(self, x: Any, name: str, features: int | None, finite: bool) -> Any:
        """x validated where it lives: a host array (converted to the model's dtype) is checked
        on the host; an array already on the backend's device is checked there. ``features``
        None: no shape check (the caller compares the whole shape)."""
        backend = self._backend
        if isinstance(x, LazyRows):  # validation rows held out of an array-like x: already wrapped
            return x
        if is_array_like(x):  # np.memmap, h5py, zarr: read, converted and checked batch by batch
            lazy = LazyRows(x, name, self.dtype, finite)
            if features is not None:
                check_2d(lazy, name, features)  # type: ignore[arg-type]  # has ndim and shape
            return lazy
        device_side = backend.is_device_array(x)
        x = backend.asarray(x, self.dtype) if device_side else as_float_array(x, name, self.dtype)
        if features is not None:
            check_2d(x, name, features)
        if finite and device_side and not backend.all_finite(x):
            raise ValueError(f"{name}: contains NaN or Inf")
        if finite and not device_side:
            check_finite(x, name)
        return x

    def _check_layer(self, i: int, arr: Any, what: str) -> None:
        if self.check_finite and not self._backend.all_finite(arr):
            raise NonFiniteError(f"layer {i} ({self.layers[i]!r}): {what} contains NaN or Inf")

    def forward(self, x: Any, training: bool = True) -> Any:
        """Logits (N, out) for x (N, in). With training=True each layer keeps what backward needs."""
        return self.forward_batch(self.prepare_input(x), training)

    __call__ = forward

    def forward_batch(self, xb: Any, training: bool = True, *, dropout: bool | None = None,
                      outputs: list | None = None, row0: int = 0) -> Any:
        """Outputs (N, out) for a batch xb (N, in) already validated and on the device (from
        :meth:`prepare_input` or :meth:`rows`; not checked again): the forward pass of ``fit``.

        ``training``: each layer keeps what :meth:`backward_batch` needs; ``dropout``: whether
        Dropout layers drop (None: ``training`` in train() mode), with the masks of
        (seed, epoch, ``dropout_step``, layer); ``outputs``: a list that receives every layer's
        output, (N, width) each (gradient statistics); ``row0``: xb holds rows row0.. of the
        step's batch (a rank's share, a micro-batch), whose dropout masks it takes.
        """
        active = training and (self.training if dropout is None else dropout)
        step_plan.host(self._prepare_layers, active, row0)  # a recorded step prepares them per replay
        h = xb
        for i, layer in enumerate(self.layers):
            h = layer.forward(h, training)
            if outputs is not None:
                outputs.append(h)
            self._check_layer(i, h, "forward output")
        self._out_shape = tuple(h.shape) if training else None
        return h

    def _prepare_layers(self, active: bool, row0: int) -> None:
        """Each layer's per-step state (dropout keys of (seed, epoch, ``dropout_step``, layer))."""
        for i, layer in enumerate(self.layers):
            layer.prepare(self.seed, self.epoch, self.dropout_step, i, active, row0)

    def backward(self, dout: Any, input_grad: bool = False) -> Any:
        """Back-propagate dL/d(output) (N, out) through every layer, writing each ``p.grad``.

        Gradients are overwritten, not accumulated. Returns dL/dx (N, in) when
        ``input_grad`` (otherwise the first layer skips computing it) else None.
        """
        if self._out_shape is None:
            raise RuntimeError("backward called without a training forward pass before it")
        g = self._backend.asarray(self._checked(dout, "dout", None, False), self.dtype)
        return self.backward_batch(g, input_grad)

    def backward_batch(self, g: Any, input_grad: bool = False, *, after_layer: Callable[[int], Any] | None = None
                       ) -> Any:
        """:meth:`backward` from dL/d(output) g (N, out) already on the device in the model's dtype
        (not converted; its shape must be the last training forward's): the backward pass of ``fit``.

        Writes every ``p.grad`` (=); returns dL/dx (N, in) when ``input_grad``, else None.
        ``after_layer(i)`` is called once layer i's gradients are written, last layer first
        (data-parallel gradient buckets, gradient accumulation, the replay of a diverged step).
        """
        if self._out_shape is None:
            raise RuntimeError("backward called without a training forward pass before it")
        if tuple(g.shape) != self._out_shape:
            raise ValueError(f"dout: expected shape {self._out_shape} (the last forward's output), got {g.shape}")
        self._out_shape = None
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            g = layer.backward(g, need_dx=(i > 0 or input_grad))
            for p in layer.parameters():
                self._check_layer(i, p.grad, f"{p.name.split('.')[1]} gradient")
            if after_layer is not None:
                after_layer(i)
        return g

    # -- training loop ---------------------------------------------------------------------

    def prepare_data(self, x: Any, y: Any, loss: losses_mod.Loss, *, prefix: str = "",
                     check_finite: bool = True) -> tuple[Any, Any]:
        """Validate a whole data set (x (N, in), y: N targets for ``loss``) once, for :meth:`rows`:
        shapes, lengths, finiteness of x (unless ``check_finite`` is False), targets.

        Returns ``(x, y)``: x stays where it is (host arrays are copied to the device batch by
        batch; an array-like is wrapped to be read batch by batch); y is validated and kept on
        the host as ``loss.check_target`` makes it, as labels are small. ``prefix`` starts the
        names in errors (``"validation_data "``: "validation_data x: ...").
        """
        x = self._checked(x, f"{prefix}x", self.in_features, finite=check_finite)
        if self._backend.is_device_array(y):
            y = self._backend.to_numpy(y)  # labels and targets are validated on the host
        n_y = np.shape(y)[0] if np.ndim(y) >= 1 else None
        if n_y != x.shape[0]:
            raise ValueError(f"{prefix}y: expected {x.shape[0]} rows to match {prefix}x, got shape {np.shape(y)}")
        if not is_array_like(y):
            return x, loss.check_target(y, (x.shape[0], self.out_features), self.dtype)
        # An array-like y is read whole: labels and targets are small next to x (one row of y per row
        # of x); class labels out of range are then named by their row as well.
        y = np.asarray(y[:])
        try:
            y = loss.check_target(y, (x.shape[0], self.out_features), self.dtype)
        except ValueError as e:
            if y.ndim == 1 and y.dtype.kind in "iu" and loss.classifies:
                bad = np.flatnonzero((y < 0) | (y >= max(self.out_features, 2)))
                if bad.size:
                    raise ValueError(f"{e} (first at row {int(bad[0])})") from None
            raise
        return x, y

    def rows(self, data: Any, index: Any) -> Any:
        """Rows ``index`` (a slice, or a host int64 array) of data from :meth:`prepare_input` or
        :meth:`prepare_data` (x (N, in), or y), on the device: (len(index), ...)."""
        if isinstance(data, LazyRows):  # read (sorted), converted and checked on the host first
            return self._backend.take_rows(data.read(index), slice(None))
        return self._backend.take_rows(data, index)

    # fit's signature and documentation are declared once, in gpubp.training
    fit = _fit

    def predict(self, x: Any, batch_size: int | None = None, check_finite: bool = True) -> np.ndarray:
        """Outputs (N, out) for x (N, in) as a NumPy array, without keeping anything for backward.

        ``check_finite``: refuse x holding NaN or Inf, as fit does (ValueError naming the first
        such element); False skips that pass over x.
        """
        x = self.prepare_input(x, check_finite=boolean(check_finite, "check_finite"))
        bs = x.shape[0] if batch_size is None else positive_int(batch_size, "batch_size")
        if isinstance(x, LazyRows):
            outs = [self._backend.to_numpy(self.forward_batch(self.rows(x, slice(i, i + bs)), training=False))
                    for i in range(0, x.shape[0], bs)]
        else:
            outs = [self._backend.to_numpy(self.forward_batch(x[i : i + bs], training=False))
                    for i in range(0, x.shape[0], bs)]
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def predict_proba(self, x: Any, batch_size: int | None = None, check_finite: bool = True,
                      loss: str | losses_mod.Loss | None = None) -> np.ndarray:
        """Class probabilities (N, out) for x (N, in), float64 NumPy: the softmax of each row of
        outputs for a model of ``"cross_entropy"`` (rows sum to 1), the sigmoid of each output for
        ``"bce_with_logits"`` (P(label 1) per column). ``loss``: the loss the outputs are meant
        for; None: that of the last fit (``loss_name``, kept in checkpoints).
        """
        name = self.loss_name if loss is None else loss
        if name is None:
            raise ValueError("loss: this model has not been fit, so its loss is unknown; pass "
                             "loss='cross_entropy' or loss='bce_with_logits'")
        lo = losses_mod.get(name)
        if not lo.classifies:
            raise ValueError(f"loss: {lo.name!r} is a regression loss: its outputs are values, not probabilities "
                             "(predict_proba needs 'cross_entropy' or 'bce_with_logits'; use predict)")
        return lo.probabilities(self.predict(x, batch_size=batch_size, check_finite=check_finite))

    def evaluate(self, x: Any, y: Any, loss: str | losses_mod.Loss, batch_size: int = 1024,
                 check_finite: bool = True, sample_weight: Any = None,
                 metrics: list[Any] | None = None) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ..., <metric>: ...}`` over (x, y); accuracy for classification
        losses only.

        ``check_finite``: refuse x holding NaN or Inf, as fit does (ValueError naming the first
        such element); False skips that pass over x (targets are always checked).
        ``sample_weight``: one weight per row (1-D, finite, >= 0, not all zero): the loss is
        sum_i w_i l_i / sum_i w_i (scikit-learn's weighted mean), accuracy and metrics are
        weighted too. ``metrics``: names or callables of :mod:`gpubp.metrics`, one key each.
        """
        loss = losses_mod.get(loss)
        x, y = self.prepare_data(x, y, loss, check_finite=boolean(check_finite, "check_finite"))
        bs = positive_int(batch_size, "batch_size")
        backend = self._backend
        w = None
        if sample_weight is not None:
            if backend.is_device_array(sample_weight):
                sample_weight = backend.to_numpy(sample_weight)
            w = sample_weights(sample_weight, x.shape[0])
        tracker = metrics_mod.Tracker(metrics_mod.resolve(metrics, loss, self.out_features), loss, backend,
                                      y.shape[1:], self.out_features, weighted=w is not None)
        classifies = loss.classifies
        mean = loss.reduction == "mean"
        total, correct, counted = 0.0, 0, 0
        for i in range(0, x.shape[0], bs):
            rows = slice(i, i + bs)
            out = self.forward_batch(self.rows(x, rows), training=False)
            yb = self.rows(y, rows)
            wb = w_rows = w_total = None
            if w is None:
                value, _ = loss.compute(out, yb, backend)
                total = total + value * (out.shape[0] if mean else 1)
            else:
                w_rows = w[rows]
                w_total = weight_sum(w_rows)
                wb = backend.asarray(w_rows, np.float64)
                value, _ = loss.compute(out, yb, backend, wb, w_total)
                total = total + value * (w_total if mean else 1)
            if classifies:
                c, k = loss.correct(out, yb, wb)
                correct, counted = correct + c, counted + k
            if tracker:
                tracker.update(out, yb, y[rows], wb, w_rows)
        result = {"loss": float(total) / (x.shape[0] if w is None else weight_sum(w))}
        if classifies:
            result["accuracy"] = float(correct) / float(counted)
        result.update(tracker.result())
        return result
