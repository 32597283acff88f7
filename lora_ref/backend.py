"""Backends: which array library holds the numbers, and how autograd differentiates through it.

Contract
--------
* Array code in lora_ref and transformer_ref never imports ``numpy`` to compute: it asks
  :func:`namespace` for the namespace of the arrays it was given. So the same function runs on
  NumPy, on CuPy (GPU), and on ``array_api_strict`` (which rejects NumPy-only idioms, so CI without
  a GPU still proves the code is backend-agnostic).
* The *backend switch* decides only where **new** arrays are created (:func:`asarray`,
  :func:`xp`): ``set_backend(name)``, the ``use_backend(name)`` context manager, or the environment
  variable ``LORA_REF_BACKEND``. Valid names: ``numpy`` (default), ``cupy``, ``array_api_strict``.
* HIPS autograd's NumPy wrappers only understand NumPy, but its core (tracer, ``primitive``,
  ``defvjp``, ``Box``, ``VSpace``) is array-agnostic. :func:`register_array_type` teaches that core
  a new array type: a :class:`GenericArrayBox` to carry it through a trace and a
  :class:`GenericArrayVSpace` to make zeros and add gradients. lora_ref's layers are autograd
  primitives with hand-written VJPs, so ``autograd.grad`` chains them on every backend.
* Inside ``autograd.grad`` on NumPy, the arrays a function sees are autograd ``ArrayBox`` es; for
  those :func:`namespace` returns :data:`autograd_namespace`, autograd.numpy spoken with the Array
  API's names. That is how an *undecorated* forward is traced by autograd.numpy, giving a second,
  independent derivation of every gradient for the tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import array_api_compat
import array_api_compat.numpy
import numpy as np
from autograd.extend import Box, VSpace, defvjp, primitive
from autograd.numpy.numpy_boxes import ArrayBox

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GenericArrayBox",
    "GenericArrayVSpace",
    "asarray",
    "autograd_namespace",
    "get_backend",
    "getval",
    "is_box",
    "namespace",
    "register_array_type",
    "scatter_add_rows",
    "set_backend",
    "sum_to_shape",
    "to_numpy",
    "use_backend",
    "xp",
]

BACKENDS = ("numpy", "cupy", "array_api_strict")
ENV_VAR = "LORA_REF_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (its package is missing, or there is no GPU)."""


# --------------------------------------------------------------------------------------------
# autograd.numpy with Array API names (what `namespace` returns for a traced NumPy value)
# --------------------------------------------------------------------------------------------


class _AutogradNamespace:
    """autograd.numpy, answering to the Array API names lora_ref's array code uses.

    autograd wraps every NumPy function but defines derivatives only for NumPy's classic names;
    the few Array API spellings that differ are mapped here onto differentiable equivalents.
    Everything else falls through to ``autograd.numpy`` unchanged.
    """

    def __init__(self) -> None:
        import autograd.numpy as anp

        self._anp = anp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._anp, name)

    def __repr__(self) -> str:
        return "<lora_ref autograd.numpy namespace (Array API names)>"

    def matrix_transpose(self, x: Any) -> Any:
        return self._anp.swapaxes(x, -1, -2)

    def concat(self, arrays: Any, /, *, axis: int = 0) -> Any:
        return self._anp.concatenate(arrays, axis=axis)

    def astype(self, x: Any, dtype: Any, /, *, copy: bool = True) -> Any:
        return x.astype(dtype)

    def take(self, x: Any, indices: Any, /, *, axis: int | None = None) -> Any:
        if axis is None:
            raise ValueError("take: axis is required")
        index = (slice(None),) * (axis % x.ndim) + (getval(indices),)
        return x[index]

    def isdtype(self, dtype: Any, kind: Any) -> bool:
        return array_api_compat.numpy.isdtype(dtype, kind)


autograd_namespace = _AutogradNamespace()

# autograd's ArrayBox (a NumPy value being traced) lacks NumPy 2's ``.mT``. Give it one, so that
# array code written with ``.mT`` between primitives traces on NumPy as it does on GenericArrayBox.
if not hasattr(ArrayBox, "mT"):
    ArrayBox.mT = property(lambda self: autograd_namespace.matrix_transpose(self))


def is_box(x: Any) -> bool:
    """Whether ``x`` is an autograd box (a value being traced), by autograd's own test.

    Not ``isinstance(x, Box)``: the box of an array_api_strict array is a subclass of that array
    type and cannot also derive from ``Box`` (see :func:`register_array_type`).
    """
    return type(x) in Box.types


def getval(x: Any) -> Any:
    """The raw array under any number of autograd boxes (``x`` itself when it is not boxed)."""
    while type(x) in Box.types:
        x = x._value
    return x


def namespace(*arrays: Any) -> Any:
    """The array namespace of ``arrays`` (None and Python scalars are ignored).

    NumPy arrays give ``array_api_compat.numpy``, CuPy arrays ``array_api_compat.cupy``,
    ``array_api_strict`` arrays that module. An autograd ``ArrayBox`` (a NumPy value being traced
    by ``autograd.grad``) gives :data:`autograd_namespace`, so the caller's array code is traced
    by autograd.numpy. A :class:`GenericArrayBox` gives the namespace of the value it carries:
    array code that must be differentiated on those backends is an autograd primitive.
    """
    # Fast path, plain NumPy arrays (and None): the answer is always array_api_compat.numpy, and
    # the generic lookup below costs ~2 us per call -- 2-5% of a small training step, which asks
    # ~200 times (measured by benchmarks/, see docs/performance.md).
    if any(a is not None for a in arrays) and all(type(a) is np.ndarray or a is None for a in arrays):
        return array_api_compat.numpy
    present = [a for a in arrays if a is not None and not isinstance(a, (bool, int, float, complex))]
    if not present:
        raise TypeError("namespace() needs at least one array")
    if any(type(a) is ArrayBox for a in present):
        return autograd_namespace
    return array_api_compat.array_namespace(*[getval(a) for a in present])


# --------------------------------------------------------------------------------------------
# The backend switch: where new arrays are created
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends are {', '.join(BACKENDS)}")
    return name


def _import_backend(name: str) -> Any:
    """The Array-API namespace used to create arrays on backend ``name`` (imports it)."""
    if name == "numpy":
        return array_api_compat.numpy
    if name == "array_api_strict":
        try:
            import array_api_strict
        except ImportError as exc:
            raise BackendUnavailableError(
                "backend 'array_api_strict' needs the array-api-strict package, which is not "
                "installed: pip install 'lora-ref[test]'"
            ) from exc
        register_array_type(array_api_strict.Array if hasattr(array_api_strict, "Array")
                            else type(array_api_strict.asarray(0.0)))
        return array_api_strict
    # cupy: two distinct failures, two distinct messages.
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend 'cupy' needs CuPy, which is not installed: pip install 'lora-ref[gpu]' "
            "(CuPy wheels are built per CUDA version; see docs/backends.md)"
        ) from exc
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a driver/library that fails to load
        raise BackendUnavailableError(
            f"backend 'cupy': CuPy is installed but no usable CUDA GPU was found ({exc})"
        ) from exc
    if n_gpus < 1:
        raise BackendUnavailableError("backend 'cupy': CuPy is installed but no CUDA GPU is visible")
    from array_api_compat import cupy as compat_cupy

    register_array_type(cupy.ndarray)
    return compat_cupy


_state: dict[str, Any] = {"name": None, "xp": None}


def set_backend(name: str) -> None:
    """Create new arrays on backend ``name`` from now on (``numpy``, ``cupy``, ``array_api_strict``).

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailableError` when the
    backend's package is missing or (for ``cupy``) when there is no usable GPU.
    """
    _check_name(name)
    module = _import_backend(name)
    _state["name"], _state["xp"] = name, module


def get_backend() -> str:
    """The name of the current backend (initially ``$LORA_REF_BACKEND``, else ``numpy``)."""
    if _state["name"] is None:
        set_backend(os.environ.get(ENV_VAR, "numpy") or "numpy")
    return _state["name"]


def xp() -> Any:
    """The namespace in which new arrays are created (that of the current backend)."""
    get_backend()
    return _state["xp"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Any]:
    """Context manager: create arrays on backend ``name`` inside the block; yields its namespace."""
    previous = get_backend()
    set_backend(name)
    try:
        yield _state["xp"]
    finally:
        set_backend(previous)


def asarray(obj: Any, dtype: Any = None) -> Any:
    """``obj`` (a NumPy array, nested list, scalar, or an array of any backend) as an array of the
    current backend. ``dtype`` may be a NumPy dtype or a name ("float32", "float64", "int64")."""
    module = xp()
    if dtype is not None:
        dtype = getattr(module, np.dtype(dtype).name)
    if not isinstance(obj, np.ndarray) and not np.isscalar(obj) and not isinstance(obj, list | tuple):
        obj = to_numpy(obj)  # another backend's array: through host memory
    if _state["name"] == "numpy":
        return np.asarray(obj, dtype=dtype)
    return module.asarray(np.asarray(obj) if isinstance(obj, list | tuple) else obj, dtype=dtype)


def to_numpy(x: Any) -> np.ndarray:
    """Copy an array of any backend (or an autograd box of one) to a NumPy ndarray."""
    x = getval(x)
    if isinstance(x, np.ndarray):
        return x
    if np.isscalar(x):
        return np.asarray(x)
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.from_dlpack(x)


def dtype_name(dtype: Any) -> str:
    """A backend's dtype object as NumPy's name for it ("float32", "int64", ...)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).split(".")[-1].strip("'>")


def float_dtype(dtype: Any) -> np.dtype:
    """``dtype`` (a NumPy dtype, a name, or a backend's dtype object) as NumPy's float32 or float64.

    The precisions lora_ref creates arrays in; anything else raises ``TypeError`` naming it.
    """
    try:
        np_dtype = np.dtype(dtype_name(dtype))
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if np_dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {np_dtype.name}")
    return np_dtype


# --------------------------------------------------------------------------------------------
# autograd's engine on arrays that are not NumPy's
# --------------------------------------------------------------------------------------------


def sum_to_shape(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``g`` down to ``shape``: the VJP of broadcasting a value of ``shape`` to ``g.shape``.

    The one way lora-ref sums leading and broadcast axes (NumPy broadcasting rules): the leading
    axes ``g`` has beyond ``len(shape)`` are folded into one, ``(..., *shape) -> (N, *shape)``,
    and summed in a single reduction; then every axis where ``shape`` has 1 and ``g`` more is
    summed with ``keepdims``. Returns ``g`` itself when the shapes already agree. A bias
    gradient is ``sum_to_shape(g, (C,))``, g (..., C). Any backend, boxed or not.
    """
    shape = tuple(int(n) for n in shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.ndim - len(shape)
    if lead < 0:
        raise ValueError(f"cannot sum an array of shape {tuple(g.shape)} to the larger shape {shape}")
    xp = namespace(g)
    if lead:
        rest = tuple(g.shape[lead:])
        g = xp.sum(xp.reshape(g, (-1,) + rest), axis=0)                   # (N, *rest) -> rest
    for axis, size in enumerate(shape):
        if size == 1 and g.shape[axis] != 1:
            g = xp.sum(g, axis=axis, keepdims=True)
    if tuple(g.shape) != shape:
        raise ValueError(f"an array of shape {tuple(g.shape)} does not broadcast from shape {shape}")
    return g


def scatter_add_rows(ids: Any, Z: Any, n_rows: int) -> Any:
    """``out[v] = sum of Z[i] over the i with ids[i] == v``: ids (N,) in [0, n_rows), Z (N, C) -> (n_rows, C).

    An embedding's gradient, where every occurrence of a repeated id adds. The Array API has no
    scatter-add, so one path per backend: NumPy ``np.add.at`` (unbuffered), CuPy
    ``cupyx.scatter_add``, anything else (array_api_strict) the one-hot product onehot(ids)^T Z,
    N n_rows C work: fine at the sizes that backend is tested with.
    """
    ids = getval(ids)
    if isinstance(Z, np.ndarray):
        out = np.zeros((n_rows, Z.shape[1]), dtype=Z.dtype)
        np.add.at(out, np.asarray(ids), Z)                          # unbuffered: repeated ids all add
        return out
    xp = namespace(Z)
    if type(Z).__module__.startswith("cupy"):
        import cupyx

        out = xp.zeros((n_rows, Z.shape[1]), dtype=Z.dtype)
        cupyx.scatter_add(out, ids, Z)
        return out
    ids = xp.astype(ids, xp.int64)                                  # any integer dtype against arange's
    onehot = xp.astype(ids[:, None] == xp.arange(n_rows, dtype=xp.int64)[None, :], Z.dtype)   # (N, n_rows)
    return xp.matrix_transpose(onehot) @ Z                          # (n_rows, C)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


@primitive
def _add(x: Any, y: Any) -> Any:
    return x + y


@primitive
def _multiply(x: Any, y: Any) -> Any:
    return x * y


@primitive
def _matmul(x: Any, y: Any) -> Any:
    return x @ y


@primitive
def _getitem(x: Any, index: Any) -> Any:
    return x[index]


@primitive
def _reshape(x: Any, shape: tuple[int, ...]) -> Any:
    return namespace(x).reshape(x, shape)


def _getitem_vjp(ans: Any, x: Any, index: Any) -> Any:
    def vjp(g: Any) -> Any:
        # A zero array with g written into the indexed places, built without in-place writes is
        # not expressible for a general index in the Array API; the backends that reach here
        # (CuPy, array_api_strict) both allow __setitem__ on a fresh array.
        out = namespace(x).zeros(x.shape, dtype=x.dtype)
        out[index] = g
        return out

    return vjp


defvjp(_add, lambda ans, x, y: lambda g: sum_to_shape(g, _shape_of(x)),
       lambda ans, x, y: lambda g: sum_to_shape(g, _shape_of(y)))
defvjp(_multiply, lambda ans, x, y: lambda g: sum_to_shape(g * y, _shape_of(x)),
       lambda ans, x, y: lambda g: sum_to_shape(g * x, _shape_of(y)))
defvjp(_matmul, lambda ans, x, y: lambda g: g @ namespace(y).matrix_transpose(y),
       lambda ans, x, y: lambda g: namespace(x).matrix_transpose(x) @ g)
defvjp(_getitem, _getitem_vjp)
defvjp(_reshape, lambda ans, x, shape: lambda g: namespace(g).reshape(g, x.shape))


class _TracedOperators:
    """What lora_ref's code does with a traced non-NumPy array *between* primitives: ``+``, ``-``,
    ``*`` and ``/`` (with arrays or Python scalars), ``@``, indexing, ``.reshape``, and the
    read-only attributes ``shape``, ``dtype``, ``ndim``, ``size``, ``mT``, ``device``. Each
    operation is a primitive above, so it differentiates. Anything else belongs inside a primitive.
    Both operand orders work: ``x + attn(x)`` and ``attn(x) + x`` (see :func:`register_array_type`).
    """

    __slots__ = ()

    shape = property(lambda self: getval(self).shape)
    dtype = property(lambda self: getval(self).dtype)
    ndim = property(lambda self: getval(self).ndim)
    size = property(lambda self: math.prod(getval(self).shape))
    device = property(lambda self: getval(self).device)
    mT = property(lambda self: _matmul_transpose(self))

    def __array_namespace__(self, *, api_version: str | None = None) -> Any:
        return getval(self).__array_namespace__(api_version=api_version)

    def __add__(self, other: Any) -> Any:
        return _add(self, other)

    def __radd__(self, other: Any) -> Any:
        return _add(other, self)

    def __sub__(self, other: Any) -> Any:
        return _add(self, _multiply(other, -1.0))

    def __rsub__(self, other: Any) -> Any:
        return _add(other, _multiply(self, -1.0))

    def __mul__(self, other: Any) -> Any:
        return _multiply(self, other)

    def __rmul__(self, other: Any) -> Any:
        return _multiply(other, self)

    def __truediv__(self, other: Any) -> Any:
        if isinstance(other, (int, float)):
            return _multiply(self, 1.0 / other)
        raise TypeError("a traced non-NumPy array can only be divided by a Python scalar")

    def __rtruediv__(self, other: Any) -> Any:
        raise TypeError("a traced non-NumPy array can only be divided by a Python scalar")

    def __neg__(self) -> Any:
        return _multiply(self, -1.0)

    def __matmul__(self, other: Any) -> Any:
        return _matmul(self, other)

    def __rmatmul__(self, other: Any) -> Any:
        return _matmul(other, self)

    def __getitem__(self, index: Any) -> Any:
        return _getitem(self, index)

    def reshape(self, *shape: Any) -> Any:
        if len(shape) == 1 and isinstance(shape[0], tuple):
            shape = shape[0]
        return _reshape(self, tuple(shape))


class GenericArrayBox(_TracedOperators, Box):
    """autograd's box for a non-NumPy array that follows NumPy's operator protocol (CuPy).

    ``array + box`` (the array on the left) reaches ``box.__radd__`` because of the two class
    attributes below. CuPy's ``ndarray.__add__(x, y)`` (cupy/_core/core.pyx, CuPy 9 to 14) returns
    ``NotImplemented`` when ``y.__array_ufunc__ is None`` (NEP 13's opt-out), and, for a ``y``
    without ``__array_ufunc__``, when ``y.__array_priority__`` exceeds x's (CuPy before 9 only
    compared priorities and called ``y.__radd__`` itself); Python then calls ``box.__radd__``.
    """

    __slots__ = []
    __array_ufunc__ = None
    __array_priority__ = 1000.0


def _subclass_box(array_type: type) -> type:
    """A box class for ``array_type`` that is also a *subclass* of it, for array types whose
    operators raise ``TypeError`` on an operand they do not know instead of returning
    ``NotImplemented`` (array_api_strict: ``Array.__add__`` -> ``_check_type_device``).

    Python's rule for ``a + b``: when ``type(b)`` is a subclass of ``type(a)`` and overrides the
    reflected method, ``b.__radd__(a)`` runs *before* ``a.__add__(b)``. So ``array + box`` reaches
    the box, and the residual stream can read ``x = x + attn(ln_1(x))``. The class cannot also
    derive from autograd's ``Box`` (both lay out ``__slots__``), so it carries Box's three slots
    itself and is registered in ``Box.types``: autograd tells boxes by ``type(x) in Box.types``
    (:func:`is_box`), not by ``isinstance``. The array's own storage (``_array``) is never set: a
    traced array that reaches a function of its library raises a clear ``TypeError`` instead of
    being read as a constant, which would silently drop its gradient.
    """

    def __new__(cls, value: Any, trace: Any, node: Any) -> Any:   # array_api_strict's __new__ refuses
        return object.__new__(cls)

    def __init__(self, value: Any, trace: Any, node: Any) -> None:
        self._value, self._trace, self._node = value, trace, node

    def refuse(self: Any) -> Any:
        raise TypeError(f"a traced {array_type.__module__}.{array_type.__name__} reached a function autograd cannot "
                        "differentiate through; between lora_ref's primitives only + - * / @, indexing, "
                        ".reshape and .mT work on arrays being differentiated")

    return type(f"Traced{array_type.__name__}", (_TracedOperators, array_type), {
        "__slots__": ("_value", "_trace", "_node"), "__new__": __new__, "__init__": __init__,
        "_array": property(refuse), "__hash__": object.__hash__,
        "__bool__": lambda self: bool(self._value), "__repr__": Box.__str__, "__str__": Box.__str__,
        "__doc__": f"autograd's box for {array_type.__module__}.{array_type.__name__} (see _subclass_box)."})


@primitive
def _matmul_transpose(x: Any) -> Any:
    return namespace(x).matrix_transpose(x)


defvjp(_matmul_transpose, lambda ans, x: lambda g: namespace(g).matrix_transpose(g))


class GenericArrayVSpace(VSpace):
    """autograd's vector space for a non-NumPy array: zeros, ones, sums and inner products."""

    def __init__(self, value: Any) -> None:
        self.shape = tuple(value.shape)
        self.dtype = value.dtype
        self._ns = array_api_compat.array_namespace(value)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def zeros(self) -> Any:
        return self._ns.zeros(self.shape, dtype=self.dtype)

    def ones(self) -> Any:
        return self._ns.ones(self.shape, dtype=self.dtype)

    def _mut_add(self, x: Any, y: Any) -> Any:
        return x + y  # functional: never writes into a gradient another node may still hold

    def _inner_prod(self, x: Any, y: Any) -> Any:
        return self._ns.sum(x * y)

    def __eq__(self, other: object) -> bool:
        return (type(self) is type(other) and self.shape == other.shape
                and self.dtype == other.dtype)


_registered: set[type] = set()


def register_array_type(array_type: type) -> None:
    """Teach autograd's engine an array type (idempotent).

    After this, ``autograd.grad`` can differentiate through lora_ref's primitives for arrays of
    that type. CuPy and array_api_strict are registered automatically when their backend is
    selected, or here if they are already imported; call this yourself only for CuPy arrays you
    create without ever selecting the ``cupy`` backend.

    The box that carries such an array through a trace supports both operand orders of ``+ - *
    @`` with a plain array. A type that follows NumPy's protocol (has ``__array_ufunc__``, as
    CuPy does) gets :class:`GenericArrayBox`, to which it defers; any other type (array_api_strict)
    gets a box that subclasses it (:func:`_subclass_box`), since Python asks a subclass first.
    """
    if array_type in _registered or array_type is np.ndarray:
        return
    box = GenericArrayBox
    if not hasattr(array_type, "__array_ufunc__"):
        try:
            box = _subclass_box(array_type)
        except TypeError:                      # a type that cannot be subclassed: box on the left only
            box = GenericArrayBox
    Box.types.add(box)                         # what Box.register does, for a class not derived from Box
    Box.type_mappings[array_type] = box
    Box.type_mappings[box] = box
    VSpace.register(array_type, GenericArrayVSpace)
    _registered.add(array_type)


def _register_imported() -> None:
    if "array_api_strict" in sys.modules or _importable("array_api_strict"):
        with contextlib.suppress(ImportError):
            import array_api_strict

            register_array_type(type(array_api_strict.asarray(0.0)))
    if "cupy" in sys.modules:
        register_array_type(sys.modules["cupy"].ndarray)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


_register_imported()
