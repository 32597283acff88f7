"""lora_ref.backend: the namespace lookup, the backend switch, and autograd on non-NumPy arrays.

The cross-backend tests compute the same LoRA layer (forward and every gradient) on NumPy and on
another backend and compare within ``2 gamma_n M`` (two computations of one exact value; ``n``
and ``M`` as in tests/test_lora.py). array_api_strict runs everywhere; CuPy runs under
``@pytest.mark.gpu`` and skips with the reason when CuPy or a GPU is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import array_api_compat
import array_api_strict
import autograd
from autograd.extend import Box
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_ref
from lora_ref import asarray, backend, delta_weight, lora_linear, merge, to_numpy, unmerge, use_backend
from lora_ref.backend import (
    BACKENDS,
    BackendUnavailableError,
    GenericArrayBox,
    autograd_namespace,
    get_backend,
    namespace,
    set_backend,
    sum_to_shape,
)
from lora_ref.strategies import lora_cases
from lora_ref.testing import assert_within, lora_linear_magnitude, tolerance

STRICT_ARRAY = type(array_api_strict.asarray(0.0))  # array_api_strict does not export its Array class
OTHER_BACKENDS = ["array_api_strict", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def restore_backend():
    """Every test leaves the backend switch as it found it."""
    saved = dict(backend._state)
    yield
    backend._state.update(saved)


def f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# namespace()
# ----------------------------------------------------------------------------------------------


def test_namespace_of_each_array_kind():
    assert namespace(np.ones(2)) is array_api_compat.numpy
    assert namespace(array_api_strict.ones(2)) is array_api_strict
    assert namespace(None, 1.0, np.ones(2)) is array_api_compat.numpy         # None and scalars ignored
    seen = []
    autograd.grad(lambda v: seen.append(namespace(v)) or (v * v).sum())(np.ones(2))
    assert seen == [autograd_namespace]                                      # traced NumPy: autograd.numpy
    with pytest.raises(TypeError, match=r"namespace\(\) needs at least one array"):
        namespace(None, 2.0)


def test_generic_box_has_the_value_namespace():
    seen = []

    def f(v):
        seen.append((type(v), namespace(v)))
        return (v.reshape((1, -1)) @ v.reshape((-1, 1)))[0, 0]

    autograd.grad(f)(array_api_strict.ones(3, dtype=array_api_strict.float64))
    box_type, ns = seen[0]
    assert ns is array_api_strict and box_type in Box.types                 # autograd's test for a box
    assert issubclass(box_type, STRICT_ARRAY)                               # so `array + box` asks the box first
    assert not issubclass(GenericArrayBox, STRICT_ARRAY) and GenericArrayBox.__array_ufunc__ is None


# ----------------------------------------------------------------------------------------------
# The switch: set_backend, use_backend, LORA_REF_BACKEND
# ----------------------------------------------------------------------------------------------


def test_set_and_use_backend():
    set_backend("numpy")
    assert get_backend() == "numpy" and isinstance(asarray([1.0]), np.ndarray)
    with use_backend("array_api_strict") as xp:
        assert xp is array_api_strict and get_backend() == "array_api_strict"
        assert isinstance(asarray([1.0]), STRICT_ARRAY)
        with use_backend("numpy"):
            assert get_backend() == "numpy"
        assert get_backend() == "array_api_strict"
    assert get_backend() == "numpy"


def test_use_backend_restores_after_an_error():
    set_backend("numpy")
    with pytest.raises(RuntimeError, match="inside"):
        with use_backend("array_api_strict"):
            raise RuntimeError("inside")
    assert get_backend() == "numpy"


def test_environment_variable_chooses_the_initial_backend(monkeypatch):
    monkeypatch.setitem(backend._state, "name", None)
    monkeypatch.setenv("LORA_REF_BACKEND", "array_api_strict")
    assert get_backend() == "array_api_strict"
    assert isinstance(asarray(np.ones(2)), STRICT_ARRAY)
    monkeypatch.setitem(backend._state, "name", None)
    monkeypatch.setenv("LORA_REF_BACKEND", "")                      # empty: the default
    assert get_backend() == "numpy"


def test_environment_variable_in_a_fresh_process():
    code = "import lora_ref; print(lora_ref.get_backend(), type(lora_ref.asarray([1.0])).__module__)"
    env = {**os.environ, "LORA_REF_BACKEND": "array_api_strict"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["array_api_strict", "array_api_strict._array_object"]
    env["LORA_REF_BACKEND"] = "jax"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "unknown backend 'jax'; valid backends are numpy, cupy, array_api_strict" in bad.stderr


def test_unknown_backend_lists_the_valid_names():
    set_backend("numpy")
    with pytest.raises(ValueError, match=r"unknown backend 'torch'; valid backends are numpy, cupy, array_api_strict"):
        set_backend("torch")
    with pytest.raises(ValueError, match=r"unknown backend 'NumPy'"):
        with use_backend("NumPy"):
            pass
    assert get_backend() == "numpy" and BACKENDS == ("numpy", "cupy", "array_api_strict")


def test_cupy_not_installed(monkeypatch):
    set_backend("numpy")
    monkeypatch.setitem(sys.modules, "cupy", None)                 # `import cupy` raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"backend 'cupy' needs CuPy, which is not installed"):
        set_backend("cupy")
    assert get_backend() == "numpy"                                 # a failed switch changes nothing


def _fake_cupy(get_device_count):
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    cupy.ndarray = type("ndarray", (), {})
    return cupy


def test_cupy_installed_but_no_usable_gpu(monkeypatch):
    set_backend("numpy")

    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(broken))
    with pytest.raises(BackendUnavailableError,
                       match=r"CuPy is installed but no usable CUDA GPU was found \(cudaErrorInsufficientDriver"):
        set_backend("cupy")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 0))
    with pytest.raises(BackendUnavailableError, match=r"CuPy is installed but no CUDA GPU is visible"):
        set_backend("cupy")
    assert get_backend() == "numpy"


# ----------------------------------------------------------------------------------------------
# asarray / to_numpy across backends
# ----------------------------------------------------------------------------------------------


def test_asarray_and_to_numpy_across_backends():
    data = np.arange(6.0).reshape(2, 3)
    set_backend("numpy")
    assert asarray(data).dtype == np.float64 and asarray(data, "float32").dtype == np.float32
    with use_backend("array_api_strict"):
        s = asarray(data, dtype="float32")                          # NumPy -> strict
        assert isinstance(s, STRICT_ARRAY) and s.dtype == array_api_strict.float32
        assert isinstance(asarray([[1.0, 2.0]]), STRICT_ARRAY)   # nested list
        assert isinstance(asarray(s), STRICT_ARRAY)       # strict -> strict
    back = asarray(s)                                               # strict -> NumPy (current backend)
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    assert np.array_equal(back, data.astype(np.float32))
    assert np.array_equal(to_numpy(s), data.astype(np.float32)) and isinstance(to_numpy(s), np.ndarray)
    assert to_numpy(data) is data and to_numpy(2.5) == np.asarray(2.5)
    boxed = []
    autograd.grad(lambda v: boxed.append(to_numpy(v)) or (v * v).sum())(data)
    assert type(boxed[0]) is np.ndarray and np.array_equal(boxed[0], data)


# ----------------------------------------------------------------------------------------------
# The same computation on another backend equals NumPy's
# ----------------------------------------------------------------------------------------------


def _on(backend_name, *arrays):
    with use_backend(backend_name):
        return [None if a is None else asarray(a) for a in arrays]


def _abs_delta(case):
    return f64(delta_weight(np.abs(f64(case.A)), np.abs(f64(case.B)), abs(case.scale), case.enable_lora))


def _forward_magnitude(case):
    if case.enable_lora is None:
        return lora_linear_magnitude(case.x, case.W, case.A, case.B, case.scale, case.bias, case.mask)
    xd = np.abs(f64(case.x)) if case.mask is None else np.abs(f64(case.x) * f64(case.mask))
    return lora_linear_magnitude(case.x, case.W, bias=case.bias) + xd @ _abs_delta(case).T


def _grads(case, arrays, G, scale, mask):
    f = lambda x, W, A, B, b: lora_linear(x, W, A, B, scale, b, mask, case.enable_lora)  # noqa: E731
    vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4))(*arrays)
    return y, tuple(vjp(G))


@pytest.mark.parametrize("name", OTHER_BACKENDS)
@settings(max_examples=25)
@given(data=st.data())
def test_forward_and_gradients_match_numpy(name, data):
    case = data.draw(lora_cases(bias=True, max_dim=32, enable_lora=None))
    G = np.random.default_rng(case.seed + 1).uniform(-1, 1, case.batch_shape + (case.d_out,)).astype(case.dtype)
    host = (case.x, case.W, case.A, case.B, case.bias)
    y_np, g_np = _grads(case, host, G, case.scale, case.mask)
    x, W, A, B, b, G_dev, mask = _on(name, *host, G, case.mask)
    y_dev, g_dev = _grads(case, (x, W, A, B, b), G_dev, case.scale, mask)
    assert type(y_dev) is type(x) and type(g_dev[2]) is type(x)      # stayed on the backend
    # Forward: n = d_in + r + 4 (+1 mask) roundings with a bias, as derived in tests/test_lora.py.
    n = case.d_in + case.r + 4 + int(case.mask is not None)
    assert_within(y_dev, y_np, 2 * tolerance(case.dtype, n) * _forward_magnitude(case), what=f"forward on {name}")
    # Gradients: the longest chain is at most L = N + d_in + d_out + n r + 4 (tests/test_lora.py);
    # magnitudes are the same VJPs evaluated on absolute values.
    t = lambda a: None if a is None else np.abs(f64(a))  # noqa: E731
    _, mags = _grads(case, tuple(t(a) for a in host), t(G), abs(case.scale), t(case.mask))
    N = int(np.prod(case.batch_shape, dtype=np.int64))
    L = N + case.d_in + case.d_out + case.A.shape[0] + 4
    for arg, gd, gn, m in zip("x W A B bias".split(), g_dev, g_np, mags):
        assert_within(gd, gn, 2 * tolerance(case.dtype, L) * m, what=f"dL/d{arg} on {name}")


@pytest.mark.parametrize("name", OTHER_BACKENDS)
@settings(max_examples=25)
@given(data=st.data())
def test_merge_unmerge_match_numpy(name, data):
    case = data.draw(lora_cases(dropout=False, max_dim=32, enable_lora=None))
    kw = {"enable_lora": case.enable_lora, "fan_in_fan_out": case.fan_in_fan_out}
    W, A, B = _on(name, case.W_stored, case.A, case.B)
    merged = merge(W, A, B, case.scale, **kw)
    merged_np = merge(case.W_stored, case.A, case.B, case.scale, **kw)
    D = _abs_delta(case)
    D = D.T if case.fan_in_fan_out else D
    # Each merged entry: r (B A) + 2 (s rounded, times s) + 1 (W +) roundings of |W| + |s||B||A|.
    assert_within(merged, merged_np, 2 * tolerance(case.dtype, case.r + 3) * (np.abs(f64(case.W_stored)) + D))
    back = unmerge(merged, A, B, case.scale, **kw)
    # unmerge(merge(W)) is within gamma_2 (|W| + |D|) of W on any backend (tests/test_lora.py).
    assert_within(back, case.W_stored, tolerance(case.dtype, 2) * (np.abs(f64(case.W_stored)) + D))


@pytest.mark.parametrize("name", OTHER_BACKENDS)
@settings(max_examples=10)
@given(data=st.data())
def test_zero_init_identity_on_backend(name, data):
    case = data.draw(lora_cases(init="kaiming", max_dim=32, enable_lora=None))
    x, W, A, B, b, mask = _on(name, case.x, case.W, case.A, case.B, case.bias, case.mask)
    y = lora_linear(x, W, A, B, case.scale, b, mask, case.enable_lora)
    base = lora_linear(x, W, None, None, case.scale, b)
    assert np.array_equal(to_numpy(y), to_numpy(base))              # B = 0: exactly the base output


@pytest.mark.parametrize("name", OTHER_BACKENDS)
def test_grad_over_a_dict_of_adapters(name):
    # LoRA training's shape: autograd.grad with respect to a dict of adapters, the base closed over.
    rng = np.random.default_rng(7)
    d_in, d_out, r, dtype = 12, 9, 3, "float64"
    x, W1, W2 = rng.uniform(-1, 1, (4, d_in)), rng.uniform(-1, 1, (d_out, d_in)), rng.uniform(-1, 1, (d_out, d_out))
    G = rng.uniform(-1, 1, (4, d_out))
    adapters = {"l1": {"A": rng.uniform(-1, 1, (r, d_in)), "B": rng.uniform(-1, 1, (d_out, r))},
                "l2": {"A": rng.uniform(-1, 1, (6, d_out)), "B": rng.uniform(-1, 1, (6, 3))}}
    enable = (True, False, True)

    def loss(ad, x, W1, W2, G):
        h = lora_linear(x, W1, ad["l1"]["A"], ad["l1"]["B"], 0.5)                      # (4, d_out)
        y = lora_linear(h, W2, ad["l2"]["A"], ad["l2"]["B"], 2.0, enable_lora=enable)  # (4, d_out)
        # <y, G> with the operations a GenericArrayBox supports: reshape, @ and indexing.
        return (y.reshape((1, -1)) @ namespace(G).reshape(G, (-1, 1)))[0, 0]

    grads_np = autograd.grad(loss)(adapters, x, W1, W2, G)
    dev = {k: dict(zip("AB", _on(name, v["A"], v["B"]))) for k, v in adapters.items()}
    grads_dev = autograd.grad(loss)(dev, *_on(name, x, W1, W2, G))
    assert set(grads_dev) == {"l1", "l2"} and all(set(g) == {"A", "B"} for g in grads_dev.values())
    # Magnitude: the same gradient with every input replaced by its absolute value (all sums of
    # products); chain length at most: 4 tokens + 2 (d_in + d_out) + 2 r_total + 8 roundings.
    absd = {k: {n: np.abs(a) for n, a in v.items()} for k, v in adapters.items()}
    mags = autograd.grad(lambda ad: loss(ad, np.abs(x), np.abs(W1), np.abs(W2), np.abs(G)))(absd)
    n = 4 + 2 * (d_in + d_out) + 2 * (r + 6) + 8
    for k in adapters:
        for p in "AB":
            assert_within(grads_dev[k][p], grads_np[k][p], 2 * tolerance(dtype, n) * mags[k][p], what=f"{k}.{p}")


# ----------------------------------------------------------------------------------------------
# GenericArrayBox: each supported operation differentiates like NumPy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OTHER_BACKENDS)
def test_generic_box_operations(name):
    rng = np.random.default_rng(3)
    X, Y, c = rng.uniform(-1, 1, (3, 4)), rng.uniform(-1, 1, (4, 3)), rng.uniform(-1, 1, (3,))

    def f(X, Y, c):
        Z = (X @ Y).mT * 2.0 - X @ Y / 4.0 + c         # (3, 3): @, .mT, *, -, /, + broadcast
        Z = -Z + 1.0 - (0.5 * Z) + (2.0 - Z)           # neg, radd/rsub/rmul with scalars
        Z = Z * (X[:, 0:3] + 1.0)                      # indexing, elementwise product
        v = Z.reshape((1, -1)) @ Z.reshape(9, 1)       # reshape both spellings, (1, 1)
        return v[0, 0]

    g_np = autograd.grad(f, argnum=(0, 1, 2))(X, Y, c)
    g_dev = autograd.grad(f, argnum=(0, 1, 2))(*_on(name, X, Y, c))
    # Every entry is a polynomial in X, Y, c with at most ~30 roundings per path; compare within
    # 2 gamma_64 of the magnitude, the same gradient of the function on absolute values taken as
    # |sum| <= sum |terms| with every minus turned into a plus (bounded here by f on |X|,|Y|,|c|
    # with the signs of its operations made positive).
    def f_abs(X, Y, c):
        Z = (X @ Y).mT * 2.0 + X @ Y / 4.0 + c
        Z = Z + 1.0 + (0.5 * Z) + (2.0 + Z)
        Z = Z * (X[:, 0:3] + 1.0)
        v = Z.reshape((1, -1)) @ Z.reshape(9, 1)
        return v[0, 0]

    mags = autograd.grad(f_abs, argnum=(0, 1, 2))(np.abs(X), np.abs(Y), np.abs(c))
    for gd, gn, m in zip(g_dev, g_np, mags):
        assert_within(gd, gn, 2 * tolerance("float64", 64) * m)


@pytest.mark.parametrize("name", OTHER_BACKENDS)
def test_array_on_the_left_of_a_box_differentiates(name):
    # The residual stream reads `x = x + attn(ln_1(x))`: a plain array (x, not differentiated)
    # on the left of a traced one. array_api_strict's Array.__add__ raises TypeError for an
    # operand it does not know; the box's type is a subclass of Array, so Python asks it first.
    rng = np.random.default_rng(5)
    X, P, M, c = rng.uniform(-1, 1, (3, 4)), rng.uniform(-1, 1, (3, 4)), rng.uniform(-1, 1, (4, 3)), rng.uniform(-1, 1, (4,))

    def f(P, X, M, c):
        Z = X + P * 2.0                                 # array + box
        Z = X - Z                                       # array - box
        Z = X * Z + c                                   # array * box, box + array (broadcast)
        Y = Z @ M                                       # (3, 3) box @ array
        Y = Y + (M @ Y.mT)[0:3, :]                      # array @ box: (4, 3) -> rows 0:3, (3, 3)
        return (Y.reshape((1, -1)) @ Y.reshape((-1, 1)))[0, 0]

    g_np = autograd.grad(f)(P, X, M, c)
    g_dev = autograd.grad(f)(*_on(name, P, X, M, c))

    def f_abs(P, X, M, c):                               # the same sums with every term made positive
        Z = X + P * 2.0
        Z = X + Z
        Z = X * Z + c
        Y = Z @ M
        Y = Y + (M @ Y.T)[0:3, :]
        return (Y.reshape((1, -1)) @ Y.reshape((-1, 1)))[0, 0]

    mags = autograd.grad(f_abs)(np.abs(P), np.abs(X), np.abs(M), np.abs(c))
    assert_within(g_dev, g_np, 2 * tolerance("float64", 64) * mags, what=f"d/dP on {name}")
    assert float(np.max(np.abs(g_np))) > 0.0


@pytest.mark.parametrize("shape", [(3, 4), (4,), (1, 4), (3, 1), (1,), ()])
def test_sum_to_shape_is_the_vjp_of_broadcasting(shape):
    # <g, broadcast(v)> == <sum_to_shape(g), v> for every v: the adjoint, checked on the basis of v.
    g = np.random.default_rng(2).uniform(-1, 1, (2, 3, 4))
    summed = sum_to_shape(g, shape)
    assert summed.shape == shape
    for index in np.ndindex(*shape):
        e = np.zeros(shape)
        e[index] = 1.0
        lhs = float(np.sum(g * np.broadcast_to(e, g.shape)))          # sum of the entries e reaches
        assert_within(np.asarray(summed[index]), np.asarray(lhs), 2 * tolerance("float64", g.size) * np.abs(g).sum())
    assert sum_to_shape(g, g.shape) is g
    on_strict = sum_to_shape(array_api_strict.asarray(g), shape)
    assert np.array_equal(to_numpy(on_strict), summed)
    with pytest.raises(ValueError, match=r"does not broadcast from shape \(2, 4\)"):
        sum_to_shape(g, (2, 4))


def test_a_traced_strict_array_refuses_library_functions():
    a = array_api_strict.ones((2, 2), dtype=array_api_strict.float64)
    with pytest.raises(TypeError, match="reached a function autograd cannot differentiate through"):
        autograd.grad(lambda v: array_api_strict.sum(v))(a)


def test_generic_box_divides_only_by_scalars():
    a = array_api_strict.ones(2, dtype=array_api_strict.float64)
    with pytest.raises(TypeError, match="can only be divided by a Python scalar"):
        autograd.grad(lambda v: (v / v).reshape((1, -1))[0, 0])(a)


def test_public_names_are_reexported():
    for name in ("asarray", "get_backend", "set_backend", "use_backend", "to_numpy", "namespace",
                 "register_array_type", "BackendUnavailableError", "BACKENDS"):
        assert getattr(lora_ref, name) is getattr(backend, name)


@pytest.mark.parametrize("name", ["numpy", *OTHER_BACKENDS])
@pytest.mark.parametrize("id_dtype", ["int64", "int32", "uint8", "uint64"])
def test_scatter_add_rows_adds_every_repeated_id_on_every_backend(id_dtype, name):
    # One path per backend (np.add.at, cupyx.scatter_add, the one-hot product): each must add every
    # occurrence of a repeated id. The sums are of small integers: exact, so compared exactly.
    ids = np.array([3, 0, 255, 3, 3, 7], dtype=id_dtype)       # 300 rows: more than uint8 counts
    Z = np.arange(12.0).reshape(6, 2)
    expected = np.zeros((300, 2))
    for i, v in enumerate(ids):                              # one row at a time: the definition
        expected[int(v)] += Z[i]
    ids_dev, Z_dev = _on(name, ids, Z)
    out = backend.scatter_add_rows(ids_dev, Z_dev, 300)
    assert type(out) is type(Z_dev) and out.dtype == Z_dev.dtype      # stayed on the backend, float64
    assert np.array_equal(to_numpy(out), expected)
