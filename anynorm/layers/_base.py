"""The layer protocol every anynorm layer shares.

A layer is a thin stateful wrapper over a pure function of ``anynorm.functional``: it owns
``params`` (trainable), ``grads`` (keyed like ``params``), ``buffers`` (non-trainable state),
the ``training`` flag, the cache of the last forward, an SGD ``update``, ``state_dict`` /
``load_state_dict``, ``to()``, ``save()`` and ``persist()`` (Dask: collapse the lazy state's
task graph). The math never lives here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

from .. import _compat
from .. import _validation as V

Array = Any

FORMAT_NAME = "anynorm"
FORMAT_VERSION = 1
CONFIG_KEY = "__anynorm_config__"

_REGISTRY: dict[str, type[Layer]] = {}


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` skipped (as torch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Layer:
    """Base class of anynorm layers (see the module docstring for the protocol).

    Parameters
    ----------
    xp : namespace, optional
        Array namespace (``numpy``, ``torch``, ``cupy``, ``jax.numpy``, ``dask.array``,
        ``array_api_strict``) to create parameters and buffers in at construction. Without it
        they are created on the first forward, in the input's namespace and device.
    device : optional
        Device for the parameters and buffers (with ``xp``).
    dtype : optional
        Parameter dtype; default: the input's dtype, float32 for float16/bfloat16 input.
    """

    #: names of trainable parameters and of buffers, in ``state_dict`` order
    _param_names: ClassVar[tuple[str, ...]] = ()
    _buffer_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            _REGISTRY[cls.__name__] = cls

    def __init__(self, *, xp: Any = None, device: Any = None, dtype: Any = None) -> None:
        self.training: bool = True
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.buffers: dict[str, Array] = {}
        self._velocity: dict[str, Array] = {}
        self._xp = None if xp is None else _compat.namespace_of(xp)
        self._device = device
        self._dtype = dtype
        self._cache: Any = None
        self._out: dict | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _config(self) -> dict:
        """Constructor arguments (JSON-serialisable) that rebuild this layer."""
        return {}

    def _state_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """Expected shape of every state entry (None where not known yet)."""
        return {}

    def _feature_shape_from(self, x: Array) -> tuple[int, ...] | None:
        """Validate ``x`` against the layer and return the parameter shape (or None)."""
        return None

    def _set_feature_shape(self, shape: tuple[int, ...]) -> None:
        """Record a parameter shape learned from the first input or a loaded state."""

    def _init_value(self, name: str) -> str:
        return {"weight": "ones", "running_var": "ones", "num_batches_tracked": "count"}.get(
            name, "zeros"
        )

    def _forward(self, x: Array, xp: Any) -> tuple[Array, Any]:
        raise NotImplementedError

    def _backward(self, dy: Array, cache: Any, xp: Any) -> tuple[Array, dict[str, Array]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @property
    def _name(self) -> str:
        return type(self).__name__

    def _f(self, method: str) -> str:
        return f"anynorm.{self._name}.{method}"

    @property
    def _holds_arrays(self) -> bool:
        return bool(self.params or self.buffers)

    @property
    def xp(self) -> Any:
        """The namespace the layer's arrays live in (None before they exist)."""
        return self._xp

    def _materialize(self, xp: Any, dev: Any, dtype: Any) -> None:
        V.check_param_dtype(f"anynorm.{self._name}", dtype, xp)
        shapes = self._state_shapes()
        int_dtype = _compat.index_dtype(xp, dev)
        for name in (*self._param_names, *self._buffer_names):
            if name not in shapes:
                continue
            kind = self._init_value(name)
            if kind == "count":
                arr = xp.asarray(0, dtype=int_dtype, device=dev)
            elif kind == "ones":
                arr = xp.ones(shapes[name], dtype=dtype, device=dev)
            else:
                arr = xp.zeros(shapes[name], dtype=dtype, device=dev)
            (self.params if name in self._param_names else self.buffers)[name] = arr
        self._xp, self._device, self._dtype = xp, dev, dtype

    def _maybe_materialize_early(self) -> None:
        """Create arrays at construction when ``xp`` was given and the shapes are known."""
        shapes = self._state_shapes()
        if self._xp is None or not shapes or any(s is None for s in shapes.values()):
            return
        xp = self._xp
        dev = self._device
        if dev is None:
            dev = _compat.device(xp.asarray([0.0]))
        dtype = self._dtype if self._dtype is not None else xp.asarray([0.0]).dtype
        self._materialize(xp, dev, dtype)

    def _check_input(self, func: str, x: Array, xp: Any) -> None:
        """A layer bound to a namespace/device (holding arrays, or given ``xp=``/``device=``)
        accepts inputs from that namespace and device only."""
        if self._xp is None or not self._state_shapes():
            return
        if xp is not self._xp:
            raise TypeError(
                f"{func}: the layer's parameters/buffers are "
                f"{_compat.namespace_name(self._xp)} arrays but `x` is a "
                f"{_compat.namespace_name(xp)} array. Move the layer first: "
                f"layer.to({_compat.namespace_name(xp)})."
            )
        dev = _compat.device(x)
        if self._device is not None and not _compat.same_device(dev, self._device):
            raise ValueError(
                f"{func}: the layer's arrays are on device {self._device} but `x` is on "
                f"{dev}. Move the layer first: layer.to(xp, device=...)."
            )

    # ------------------------------------------------------------------ protocol
    def forward(self, x: Array) -> Array:
        """Normalize ``x``; remember what the backward needs. Returns an array of the
        namespace, device, dtype and shape of ``x``."""
        func = self._f("forward")
        V.check_array(func, "x", x)
        xp = _compat.array_namespace(x)
        V.check_floating(func, "x", x, xp)
        V.check_known_shape(func, "x", x)
        self._check_input(func, x, xp)
        fshape = self._feature_shape_from(x)
        if fshape is not None:
            self._set_feature_shape(fshape)
        if self._state_shapes() and not self._holds_arrays:
            dtype = self._dtype if self._dtype is not None else _compat.compute_dtype(xp, x.dtype)
            dev = self._device if self._device is not None else _compat.device(x)
            self._materialize(xp, dev, dtype)
        y, cache = self._forward(x, xp)
        self._cache = cache
        self._out = {
            "xp": xp,
            "dtype": y.dtype,
            "device": _compat.device(y),
            "shape": tuple(y.shape),
        }
        return y

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def backward(self, dy: Array) -> Array:
        """Input gradient of the last forward for upstream gradient ``dy``.

        Parameter gradients land in ``self.grads`` (same keys as ``self.params``, same dtype).
        The cache of the forward is kept, so calling ``backward`` again (e.g. with another
        ``dy``) is allowed and gives the gradient of that same forward; ``grads`` are
        replaced, not accumulated."""
        func = self._f("backward")
        if self._cache is None:
            raise RuntimeError(
                f"{func}: backward() was called before forward(); run y = layer.forward(x) "
                "first (and again after layer.to(...) or load_state_dict)."
            )
        V.check_array(func, "dy", dy)
        V.check_known_shape(func, "dy", dy)
        V.check_grad(func, dy, self._out)
        xp = self._out["xp"]
        with _compat.no_autodiff(xp):
            dx, grads = self._backward(dy, self._cache, xp)
        self.grads = {
            k: (g if g.dtype == self.params[k].dtype else xp.astype(g, self.params[k].dtype))
            for k, g in grads.items()
        }
        return dx

    def train(self, mode: bool = True) -> Layer:
        """Switch to training (``mode=True``) or evaluation mode; returns the layer."""
        self.training = V.check_bool(self._f("train"), "mode", mode)
        return self

    def eval(self) -> Layer:
        """Switch to evaluation mode (running statistics where the layer has them)."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Forget the parameter gradients."""
        self.grads = {}

    def update(self, lr: float = 0.01, momentum: float = 0.0, decay: float = 0.0) -> None:
        """One SGD step with momentum and L2 weight decay on ``params`` using ``grads``:

        ``v = momentum·v − lr·(g + decay·θ)``, ``θ = θ + v`` (out of place: arrays
        previously returned by ``state_dict`` are not changed). A no-op for layers without
        parameters; a RuntimeError when the layer has parameters but no gradients yet.

        On Dask the new parameters are lazy: each step adds its graph to the previous ones.
        Call :meth:`persist` (or :func:`anynorm.persist` for several layers) every ``k``
        steps, e.g. after ``update()``."""
        func = self._f("update")
        V.check_number(func, "lr", lr, low=0.0)
        V.check_number(func, "momentum", momentum, low=0.0)
        V.check_number(func, "decay", decay, low=0.0)
        if not self.params:
            return
        if not self.grads:
            raise RuntimeError(
                f"{func}: the layer has parameters {sorted(self.params)} but no gradients; "
                "call forward(x) and backward(dy) before update()."
            )
        with _compat.no_autodiff(self._xp):
            self._sgd_step(lr, momentum, decay)

    def _sgd_step(self, lr: float, momentum: float, decay: float) -> None:
        for name, theta in self.params.items():
            g = self.grads[name]
            if decay:
                g = g + decay * theta
            v = -lr * g
            if momentum and name in self._velocity:
                v = momentum * self._velocity[name] + v
            self._velocity[name] = v
            self.params[name] = theta + v

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Array]:
        """Parameters then buffers under PyTorch's key names. The arrays are not copied;
        anynorm never writes into them (updates rebind)."""
        return {**self.params, **self.buffers}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Load ``state`` (arrays of any namespace, or Python numbers) into the layer.

        Values are copied into the layer's namespace, device and dtype (into the state's own
        namespace and dtype when the layer holds no arrays yet). With ``strict=True``
        (default) missing, unexpected or mis-shaped entries are a ValueError listing them;
        with ``strict=False`` missing/unexpected keys are skipped and returned."""
        func = self._f("load_state_dict")
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{func}: `state` must be a mapping of names to arrays (from state_dict()); "
                f"received {type(state).__name__}."
            )
        shapes = self._state_shapes()
        expected = [n for n in (*self._param_names, *self._buffer_names) if n in shapes]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(
                f"{func}: the state does not match {self!r}: missing keys {missing}, "
                f"unexpected keys {unexpected}. Expected exactly {expected}."
            )
        for k in expected:
            if k in state and not (_compat.is_array(state[k]) or _is_number(state[k])):
                raise TypeError(
                    f"{func}: entry {k!r} must be an array or a number; received "
                    f"{type(state[k]).__name__}."
                )
        V.check_state_floating(func, state, [k for k in expected if k != "num_batches_tracked"])
        # Shapes: compare with the known ones; otherwise learn them from the state.
        learned = None
        bad = []
        for k in expected:
            if k not in state or k == "num_batches_tracked":
                continue
            got = tuple(getattr(state[k], "shape", ()))
            want = shapes[k] if shapes[k] is not None else learned
            if want is None:
                learned = got
            elif got != tuple(want):
                bad.append(f"{k}: expected {tuple(want)}, received {got}")
        if (
            "num_batches_tracked" in state
            and tuple(getattr(state["num_batches_tracked"], "shape", ())) != ()
        ):
            bad.append(
                f"num_batches_tracked: expected (), received "
                f"{tuple(state['num_batches_tracked'].shape)}"
            )
        if bad:
            raise ValueError(f"{func}: mis-shaped entries: {'; '.join(bad)}.")
        if learned is not None:
            self._set_feature_shape(learned)
        if not self._holds_arrays:
            first = next(
                (
                    state[k]
                    for k in expected
                    if k in state and _compat.is_array(state[k]) and k != "num_batches_tracked"
                ),
                None,
            )
            xp = self._xp or (_compat.array_namespace(first) if first is not None else None)
            if xp is None:
                return LoadResult(missing, unexpected)
            dev = self._device
            if dev is None:
                dev = (
                    _compat.device(first)
                    if first is not None and _compat.array_namespace(first) is xp
                    else _compat.device(xp.asarray([0.0]))
                )
            dtype = self._dtype
            if dtype is None and first is not None:
                # the state's own dtype; float32 for float16/bfloat16 (parameter policy)
                dtype = _compat.compute_dtype(xp, _compat.convert(first, xp).dtype)
            self._materialize(xp, dev, dtype)
        xp = self._xp
        for k in expected:
            if k not in state:
                continue
            target = self.params if k in self.params else self.buffers
            ref = target[k]
            value = state[k]
            if _is_number(value):
                value = xp.asarray(value, dtype=ref.dtype, device=self._device)
            else:
                if k != "num_batches_tracked" and not _compat.array_namespace(value).isdtype(
                    value.dtype, "real floating"
                ):
                    raise TypeError(
                        f"{func}: entry {k!r} must have a real floating dtype; received "
                        f"{value.dtype}."
                    )
                value = _compat.convert(value, xp, self._device, ref.dtype)
            target[k] = value
        self._cache = None
        return LoadResult(missing, unexpected)

    def to(self, target: Any, device: Any = None, dtype: Any = None) -> Layer:
        """Move params, grads, buffers and SGD velocity to another namespace and/or device.

        ``target`` is an array namespace (``numpy``, ``torch``, ``cupy``, ``jax.numpy``,
        ``dask.array``, ``array_api_strict``) or an array whose namespace and device to use.
        ``dtype`` (a floating dtype of ``target``) also casts the floating arrays. Uses DLPack
        where possible, else a host copy. The forward cache is dropped: run a new forward
        before the next backward. Returns the layer."""
        xp = _compat.namespace_of(target)
        if dtype is not None:
            V.check_param_dtype(self._f("to"), dtype, xp)
        if device is None and _compat.is_array(target):
            device = _compat.device(target)
        if device is None and self._holds_arrays:
            device = _compat.device(xp.asarray([0.0]))
        for store in (self.params, self.grads, self.buffers, self._velocity):
            for k, v in store.items():
                cast = dtype if dtype is not None and k != "num_batches_tracked" else None
                store[k] = _compat.convert(v, xp, device, cast)
        self._xp, self._device = xp, device
        if dtype is not None:
            self._dtype = dtype
        elif self.params or set(self.buffers) - {"num_batches_tracked"}:
            self._dtype = next(
                v for k, v in {**self.params, **self.buffers}.items() if k != "num_batches_tracked"
            ).dtype
        self._cache = None
        self._out = None
        return self

    def persist(self, **kwargs: Any) -> Layer:
        """Compute the layer's lazy (Dask) state now and keep it in memory; returns the layer.

        On Dask, ``forward``/``backward``/``update`` only build a task graph, and every
        training step stacks its graph on top of the previous ones: without ``persist`` the
        running statistics and the parameters keep the graph of every past batch (and, for
        data loaded with ``da.from_array``, the batches themselves). **On Dask, call
        ``persist`` every k steps (e.g. after ``update()``)**. Each call computes
        ``params``, ``buffers``, ``grads`` and the SGD velocity in one graph execution and
        replaces them by in-memory dask arrays of the same chunks: one task per chunk, no
        history (also on a ``dask.distributed`` cluster, where a bare ``dask.persist`` keeps
        the history of every persisted key on the scheduler). Use :func:`anynorm.persist` to
        persist several layers (and e.g. the loss) in one call, so that work they share,
        such as the input batch, is computed once.

        For eager namespaces (NumPy, PyTorch, JAX, CuPy, array-api-strict) and for a layer
        without arrays yet this is a no-op that does not import dask.

        Parameters
        ----------
        **kwargs
            Passed to ``dask.compute`` (e.g. ``scheduler="threads"``); ignored when nothing
            is lazy.

        Returns
        -------
        Layer
            ``self``; its arrays are replaced by their persisted versions (equal values).

        Notes
        -----
        The call returns when the state is computed (on a cluster too). The cache of the
        last forward (what ``backward`` needs: the input and its statistics) is neither
        persisted nor dropped: ``backward`` after ``persist`` still works, and the next
        forward replaces it. Persisting it would compute and pin the whole input batch in
        memory. Until then it refers to the parameters as they were at that forward, so
        with ``persist`` every k steps at most the last k batches stay referenced.

        Examples
        --------
        >>> import numpy as np, dask.array as da, anynorm
        >>> layer = anynorm.BatchNorm(3)
        >>> for step in range(20):
        ...     x = da.from_array(np.random.default_rng(step).normal(size=(8, 3)), chunks=4)
        ...     y = layer.forward(x)
        ...     dx = layer.backward(y - 1.0)
        ...     layer.update(lr=0.1)
        ...     if step % 5 == 4:
        ...         _ = layer.persist()
        >>> len(layer.buffers["running_mean"].__dask_graph__())
        1
        """
        persist(self, **kwargs)
        return self

    # ------------------------------------------------------------------ files
    def get_config(self) -> dict:
        """The constructor arguments, as stored in checkpoints."""
        return self._config()

    def save(self, path: str | os.PathLike) -> None:
        """Write one ``.npz`` file: every ``state_dict()`` entry under its key plus the JSON
        config (class, hyper-parameters, format version) under ``"__anynorm_config__"``.

        The file is written to a temporary file in the same folder, flushed, then renamed
        over ``path``: an interrupted save never leaves a partial file under ``path``.
        No pickle is used. Load it with :func:`anynorm.load`."""
        import numpy as np

        path = os.fspath(path)
        if self._state_shapes() and not self._holds_arrays:
            raise RuntimeError(
                f"anynorm.{self._name}.save: the layer has no parameters/buffers yet (they are "
                "created on the first forward); run a forward first, or build it with "
                "xp=/device=/dtype= (and its feature sizes) so they exist up front."
            )
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "class": self._name,
            "config": self._config(),
        }
        from .. import __version__

        meta["anynorm_version"] = __version__
        arrays = {k: _compat.to_numpy(v) for k, v in self.state_dict().items()}
        arrays[CONFIG_KEY] = np.asarray(json.dumps(meta))
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".anynorm-", suffix=".npz.tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{self._name}({args})"


def _is_number(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def persist(*objects: Any, **kwargs: Any) -> tuple:
    """Compute the lazy (Dask) state of several layers, and arrays, in one graph execution.

    The module-level form of :meth:`Layer.persist`. **On Dask, call persist every k steps
    (e.g. after update()); without it the running statistics and parameters keep the graph
    of every past batch.** One call over all layers of a model (and the loss, if you read
    it) computes work they share once: the input batch feeds both a layer's running
    statistics and the next layer's gradients, and is loaded and reduced a single time.

    Each layer's ``params``, ``buffers``, ``grads`` and SGD velocity are computed and
    replaced by in-memory dask arrays with the same chunks (one task per chunk, no history:
    their values are brought to the client, which for normalization layers is
    feature-sized). On a ``dask.distributed`` cluster a bare ``dask.persist`` would not bound
    the memory: the scheduler keeps the history of every persisted key, including the data
    of every past batch loaded with ``da.from_array`` (dask/distributed#809).

    Parameters
    ----------
    *objects : Layer or array
        Layers (updated in place) and arrays (persisted with ``dask.persist`` semantics and
        returned: on a cluster, futures computed in the background, whose history the
        scheduler keeps while they are alive, so read e.g. a loss with ``float(loss)`` and
        drop it rather than keeping every step's). Arrays and layers of eager namespaces
        (NumPy, PyTorch, JAX, CuPy, array-api-strict) are left as they are, and dask is not
        imported for them.
    **kwargs
        Passed to ``dask.persist``/``dask.compute`` (e.g. ``scheduler="threads"``);
        ignored when nothing is lazy.

    Returns
    -------
    tuple
        One entry per argument: each layer itself (updated in place), each array persisted.

    Raises
    ------
    TypeError
        If an argument is neither an anynorm ``Layer`` nor an array (e.g. a list of layers:
        unpack it, ``anynorm.persist(*layers)``).

    Notes
    -----
    The call returns when the layers' state is computed (on a cluster too). Neither the
    layers' values nor their forward caches change: a ``backward`` after ``persist`` gives
    what it would have given before. See :meth:`Layer.persist`.

    Examples
    --------
    >>> import numpy as np, dask.array as da, anynorm
    >>> norm, head = anynorm.BatchNorm(4), anynorm.LayerNorm(4)
    >>> x = da.from_array(np.random.default_rng(0).normal(size=(16, 4)), chunks=(5, 2))
    >>> y = head.forward(norm.forward(x))
    >>> dx = norm.backward(head.backward(y))
    >>> norm.update(lr=0.1); head.update(lr=0.1)
    >>> _, _, y = anynorm.persist(norm, head, y)
    >>> len(head.params["weight"].__dask_graph__()) == head.params["weight"].npartitions
    True
    """
    func = "anynorm.persist"
    for i, obj in enumerate(objects):
        if isinstance(obj, Layer) or _compat.is_array(obj):
            continue
        if isinstance(obj, (list, tuple)) and all(isinstance(o, Layer) for o in obj):
            fix = "unpack the sequence: anynorm.persist(*layers)."
        elif isinstance(obj, type) and issubclass(obj, Layer):
            fix = "pass a layer instance, not the class."
        else:
            fix = (
                "pass anynorm layers and arrays only (persist other Dask collections with "
                "dask.persist)."
            )
        raise TypeError(
            f"{func}: argument {i} (`objects[{i}]`) must be an anynorm Layer or an array; "
            f"received {V._describe(obj)}. Fix: {fix}"
        )
    slots: list = []  # (store, key) of every lazy layer array
    extra_at: list[int] = []  # positions of lazy array arguments
    seen: set[int] = set()
    for i, obj in enumerate(objects):
        if not isinstance(obj, Layer):
            if _compat.is_lazy(obj):
                extra_at.append(i)
            continue
        for store in (obj.params, obj.buffers, obj.grads, obj._velocity):
            if id(store) in seen:  # the same layer given twice
                continue
            seen.add(id(store))
            slots.extend((store, k) for k, v in store.items() if _compat.is_lazy(v))
    out = list(objects)
    if not slots and not extra_at:
        return tuple(out)
    state, extras = _compat.persist_dask(
        [store[k] for store, k in slots], [objects[i] for i in extra_at], kwargs
    )
    for (store, k), value in zip(slots, state, strict=True):
        store[k] = value
    for i, value in zip(extra_at, extras, strict=True):
        out[i] = value
    return tuple(out)


def _read_npz(func: str, path: str, fh: Any) -> dict:
    """Every entry of an open ``.npz`` file, read with ``allow_pickle=False``."""
    import zipfile

    import numpy as np

    try:
        npz = np.load(fh, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ValueError(
            f"{func}: {path!r} is not a readable anynorm checkpoint (truncated or not an .npz "
            f"file): {exc}"
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{func}: {path!r} holds a single array, not an anynorm checkpoint.")
    entries = {}
    with npz:
        for key in npz.files:
            try:
                entries[key] = npz[key]
            except ValueError as exc:
                raise ValueError(
                    f"{func}: entry {key!r} of {path!r} cannot be loaded without pickle "
                    f"(object array?); anynorm never unpickles. ({exc})"
                ) from exc
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                raise ValueError(
                    f"{func}: entry {key!r} of {path!r} is truncated or corrupt: {exc}"
                ) from exc
    return entries


def load(path: str | os.PathLike, xp: Any = None, device: Any = None) -> Layer:
    """Rebuild a layer saved with ``layer.save(path)``.

    Parameters
    ----------
    path : str or path-like
        The ``.npz`` checkpoint.
    xp : namespace, optional
        Namespace for the arrays (default NumPy).
    device : optional
        Device for the arrays.

    Raises
    ------
    ValueError
        If the file is not a readable anynorm checkpoint (truncated, not a zip, no config),
        holds object arrays (never unpickled), names an unknown class or a newer format
        version, or has missing, unexpected or mis-shaped entries.
    """

    func = "anynorm.load"
    path = os.fspath(path)
    with open(path, "rb") as fh:  # FileNotFoundError stays as it is
        entries = _read_npz(func, path, fh)

    if CONFIG_KEY not in entries:
        raise ValueError(
            f"{func}: {path!r} is not an anynorm checkpoint (no {CONFIG_KEY!r} entry); "
            "save layers with layer.save(path)."
        )
    raw = entries.pop(CONFIG_KEY)
    try:
        meta = json.loads(str(raw[()]))
        fmt, version, cls_name, config = (
            meta["format"],
            meta["format_version"],
            meta["class"],
            meta["config"],
        )
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{func}: {path!r} has an unreadable config entry: {exc}") from exc
    if fmt != FORMAT_NAME:
        raise ValueError(f"{func}: {path!r} has format {fmt!r}, expected {FORMAT_NAME!r}.")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{func}: {path!r} uses checkpoint format version {version!r}; this anynorm reads "
            f"versions up to {FORMAT_VERSION}. Upgrade anynorm."
        )
    cls = _REGISTRY.get(cls_name)
    if cls is None:
        raise ValueError(
            f"{func}: {path!r} holds unknown layer class {cls_name!r}; known classes: "
            f"{sorted(_REGISTRY)}."
        )
    try:
        layer = cls(**config)
    except TypeError as exc:
        raise ValueError(f"{func}: {path!r} has a config that {cls_name} rejects: {exc}") from exc
    if xp is not None:
        layer._xp = _compat.namespace_of(xp)
        layer._device = device
        state = entries
    else:
        state = entries
        if device is not None:
            raise ValueError(f"{func}: pass `xp` together with `device`.")
    layer.load_state_dict(state, strict=True)
    return layer
