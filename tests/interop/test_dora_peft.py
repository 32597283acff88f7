"""DoRA: lora_ref.dora against PEFT's ``LoraConfig(use_dora=True)`` on PyTorch (CPU).

A one-layer torch module (``nn.Linear``, or transformers' GPT-2 ``Conv1D`` stored (d_in, d_out)
with ``fan_in_fan_out=True``) gets a PEFT DoRA adapter with non-zero B (``init_lora_weights=False``),
with and without rsLoRA. lora-ref must reproduce, from the same arrays:

* PEFT's initial ``lora_magnitude_vector`` (``dora_magnitude``),
* the forward in eval mode, and in train mode with dropout (PEFT's dropout module replaced by one
  that multiplies by a given mask, the same mask passed to ``dora_linear``),
* torch autograd's gradients of ``sum(y * G)`` with respect to ``lora_A``, ``lora_B``,
  ``lora_magnitude_vector``, the base weight, the bias and x (PEFT detaches the norm: Section 4.3),
* ``merge_and_unload()``'s weight (``dora_merge``), the norm PEFT caches when merging, and
  ``unmerge()`` (``dora_unmerge`` with that norm),

in float64 and float32, each within ``2 gamma_n M`` (``dora_rounding_counts``, ``dora_magnitudes``:
the bounds hold for any evaluation order, PEFT's included). Run with ``pytest -s`` to see the
maximum relative error (``max |ours - PEFT| / max |PEFT|``) and its ratio to the bound.

Also measured: PEFT with two active adapters, a plain LoRA one and a DoRA one. In eval mode the
DoRA adapter rescales what came before it, so the result depends on the order; in train mode
with a dropout module it rescales only the base output, so train and eval differ even with a
mask of ones. The identities below pin down exactly what PEFT computes.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import autograd  # noqa: E402

from lora_ref import lora_linear, lora_scale  # noqa: E402
from lora_ref.dora import (  # noqa: E402
    dora_linear,
    dora_magnitude,
    dora_magnitudes,
    dora_merge,
    dora_rounding_counts,
    dora_unmerge,
)
from lora_ref.testing import assert_within, tolerance  # noqa: E402

pytestmark = pytest.mark.interop

D_IN, D_OUT, BATCH = 12, 10, (3, 4)
CONFIGS = {"r=4 alpha=8": dict(r=4, lora_alpha=8), "rslora r=4 alpha=6": dict(r=4, lora_alpha=6, use_rslora=True)}
RECORD: dict[str, list[float]] = {}


class MaskDropout(torch.nn.Module):
    """Stands in for PEFT's ``nn.Dropout``: multiplies by a fixed inverted-dropout mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


class Host(torch.nn.Module):
    def __init__(self, conv: bool):
        super().__init__()
        self.proj = (transformers.pytorch_utils.Conv1D(D_OUT, D_IN) if conv
                     else torch.nn.Linear(D_IN, D_OUT, bias=True))

    def forward(self, x):
        return self.proj(x)


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(dtype: str, conv: bool, config: dict, seed: int = 0, **extra):
    """A PEFT DoRA model and its layer; m moved off its initial value (a 'trained' magnitude)."""
    torch.manual_seed(seed)
    with default_dtype(getattr(torch, dtype)):
        host = Host(conv)
        torch.nn.init.uniform_(host.proj.bias, -1.0, 1.0)                    # Conv1D starts at zero
        cfg = peft.LoraConfig(target_modules=["proj"], use_dora=True, init_lora_weights=False,
                              lora_dropout=0.1, fan_in_fan_out=conv, **config, **extra)
        model = peft.get_peft_model(host, cfg)
    layer = model.base_model.model.proj
    return model, layer


def arrays(layer, name="default"):
    """(W stored, A, B, m, bias, s) as NumPy, straight from the PEFT layer."""
    t = lambda p: p.detach().numpy().copy()  # noqa: E731
    return (t(layer.base_layer.weight), t(layer.lora_A[name].weight), t(layer.lora_B[name].weight),
            t(layer.lora_magnitude_vector[name].weight), t(layer.base_layer.bias), layer.scaling[name])


def check(what: str, ours, theirs, bound) -> None:
    ratio = assert_within(ours, theirs, bound, what=what)
    theirs = np.asarray(theirs, dtype=np.float64)
    rel = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs)) / np.max(np.abs(theirs)))
    worst = RECORD.setdefault(what, [0.0, 0.0])
    worst[0], worst[1] = max(worst[0], rel), max(worst[1], ratio)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RECORD:
        print("\n[dora vs peft] max relative error   error/bound")
        for what, (rel, ratio) in sorted(RECORD.items()):
            print(f"    {what:<34} {rel:.2e}   {ratio:.2e}")


# --------------------------------------------------------------------------------------------
# One DoRA adapter: init, forward, gradients, merge, unmerge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("conv", [False, True], ids=["Linear", "Conv1D"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_initial_magnitude(dtype, conv, config):
    model, layer = build(dtype, conv, CONFIGS[config])
    W, A, B, m, _, s = arrays(layer)
    assert A.dtype == np.dtype(dtype) and np.any(B) and m.shape == (D_OUT,)
    assert s == lora_scale(CONFIGS[config]["lora_alpha"], CONFIGS[config]["r"], CONFIGS[config].get("use_rslora", False))
    ours = dora_magnitude(W, A, B, s, fan_in_fan_out=conv)
    W_math = W.T if conv else W
    n = dora_rounding_counts(D_IN, D_OUT, A.shape[0], 1)["norm"]
    N_row = dora_magnitudes(np.zeros((1, D_IN), dtype), W_math, A, B, m, s)["norm"]
    check(f"init m {dtype}", ours, m, 2 * tolerance(dtype, n) * N_row)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("conv", [False, True], ids=["Linear", "Conv1D"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "train+mask"])
def test_forward_and_gradients(dtype, conv, config, dropout):
    model, layer = build(dtype, conv, CONFIGS[config])
    rng = np.random.default_rng(1)
    with torch.no_grad():                                                   # a trained-looking m
        layer.lora_magnitude_vector["default"].weight.mul_(torch.from_numpy(rng.uniform(0.5, 2.0, D_OUT).astype(dtype)))
    W, A, B, m, bias, s = arrays(layer)
    W_math = np.ascontiguousarray(W.T) if conv else W                       # (d_out, d_in)
    x = rng.uniform(-1, 1, BATCH + (D_IN,)).astype(dtype)
    G = rng.uniform(-1, 1, BATCH + (D_OUT,)).astype(dtype)
    mask = ((rng.random(BATCH + (D_IN,)) >= 0.5) / 0.5).astype(dtype) if dropout else None

    # PEFT: eval mode (no dropout), or train mode with our mask in place of its dropout module.
    if dropout:
        layer.lora_dropout["default"] = MaskDropout(torch.from_numpy(mask))
        model.train()
    else:
        model.eval()
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    xt = torch.from_numpy(x).requires_grad_(True)
    y_t = model(xt)
    (y_t * torch.from_numpy(G)).sum().backward()
    g = lambda p: p.grad.numpy()  # noqa: E731
    theirs = {"y": y_t.detach().numpy(), "dx": g(xt), "dW": g(layer.base_layer.weight).T if conv else g(layer.base_layer.weight),
              "dA": g(layer.lora_A["default"].weight), "dB": g(layer.lora_B["default"].weight),
              "dm": g(layer.lora_magnitude_vector["default"].weight), "dbias": g(layer.base_layer.bias)}

    # lora-ref: the detached gradient (Section 4.3), PEFT's choice.
    f = lambda x_, W_, A_, B_, m_, b_: dora_linear(x_, W_, A_, B_, m_, s, b_, mask, True)  # noqa: E731
    vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2, 3, 4, 5))(x, W_math, A, B, m, bias)
    ours = dict(zip(("dx", "dW", "dA", "dB", "dm", "dbias"), vjp(G)), y=y)
    mags = dora_magnitudes(x, W_math, A, B, m, s, bias=bias, dropout_mask=mask, dy=G)
    counts = dora_rounding_counts(D_IN, D_OUT, A.shape[0], int(np.prod(BATCH)))
    mode = "train+mask" if dropout else "eval"
    copies = dict.fromkeys(ours, 2)
    if conv and dropout:
        # A PEFT 0.21.2 defect, pinned here: with fan_in_fan_out, DoRA's dropout path computes
        # xd W^T with peft.utils.other.transpose(weight, True), which returns nn.Parameter(weight.T),
        # a new leaf: the (f - 1) xd W^T term sends no gradient to the base weight. PEFT's dL/dW is
        # therefore ours minus (f - 1) G^T Xd (it matters only when the base weight is trained).
        V = W_math.astype(np.float64) + s * B.astype(np.float64) @ A.astype(np.float64)
        f = m / np.linalg.norm(V, axis=1)
        E = G.reshape(-1, D_OUT).T.astype(np.float64) @ (x * mask).reshape(-1, D_IN).astype(np.float64)
        cut = (f - 1.0)[:, None] * E                                        # (d_out, d_in)
        b = 3 * tolerance(dtype, counts["dW"]) * mags["dW"]                 # + the float64 term
        assert np.max(np.abs(cut) / b) > 1e3                                # far from rounding: a real gap
        ours["dW"], copies["dW"] = ours["dW"] - cut, 3
    for key in ("y", "dx", "dW", "dA", "dB", "dm", "dbias"):
        assert ours[key].dtype == np.dtype(dtype) or key == "dW"
        check(f"{key} {mode} {dtype}", ours[key], theirs[key], copies[key] * tolerance(dtype, counts[key]) * mags[key])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("conv", [False, True], ids=["Linear", "Conv1D"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_merge_and_unmerge(dtype, conv, config):
    model, layer = build(dtype, conv, CONFIGS[config])
    rng = np.random.default_rng(2)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.from_numpy(rng.uniform(0.5, 2.0, D_OUT).astype(dtype)))
    W, A, B, m, bias, s = arrays(layer)
    W_math = W.T if conv else W
    x = np.zeros((1, D_IN), dtype)
    mags = dora_magnitudes(x, W_math, A, B, m, s)
    counts = dora_rounding_counts(D_IN, D_OUT, A.shape[0], 1)
    layout = (lambda t: t.T) if conv else (lambda t: t)  # noqa: E731

    # merge_and_unload (a copy): W' = (m / ||W + s B A||) (W + s B A), in the stored layout.
    merged = copy.deepcopy(model).merge_and_unload().proj.weight.detach().numpy()
    ours = dora_merge(W, A, B, m, s, fan_in_fan_out=conv)
    check(f"merged W {dtype}", ours, merged, 2 * tolerance(dtype, counts["W_merged"]) * layout(mags["W_merged"]))

    # merge() in place caches the norm; unmerge() divides by m / norm and subtracts s B A.
    layer.merge()
    cached = layer._caches[f"default-weight_norm"].detach().numpy()          # what PEFT keeps for unmerge
    check(f"cached norm {dtype}", dora_magnitude(W, A, B, s, fan_in_fan_out=conv), cached,
          2 * tolerance(dtype, counts["norm"]) * mags["norm"])
    merged_in_place = layer.base_layer.weight.detach().numpy().copy()
    layer.unmerge()
    assert "default-weight_norm" not in layer._caches                      # popped: unmerge needs it once
    unmerged = layer.base_layer.weight.detach().numpy()
    D = layout(abs(s) * np.abs(B) @ np.abs(A))
    round_trip = tolerance(dtype, 6) * (np.abs(W.astype(np.float64)) + D)   # derived in tests/test_dora.py
    assert_within(unmerged, W, round_trip, what="PEFT unmerge(merge(W))")
    ours_back = dora_unmerge(merged_in_place, A, B, m, s, norm=cached, fan_in_fan_out=conv)
    check(f"unmerged W {dtype}", ours_back, unmerged, 2 * round_trip)


def test_peft_refusals():
    # Combinations PEFT refuses (and lora-ref will refuse by name at integration).
    with pytest.raises(ValueError, match="not supported for DoRA"):
        peft.LoraConfig(target_modules=["proj"], use_dora=True, lora_bias=True)
    model, _ = build("float64", False, CONFIGS["r=4 alpha=8"])
    model.eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(torch.zeros((2, D_IN), dtype=torch.float64), adapter_names=["default", "default"])


# --------------------------------------------------------------------------------------------
# Several active adapters: a plain LoRA one and a DoRA one (PEFT's behaviour, measured)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_two_active_adapters_order_and_mode(dtype):
    model, layer = build(dtype, False, CONFIGS["r=4 alpha=8"])
    with default_dtype(getattr(torch, dtype)):
        model.add_adapter("plain", peft.LoraConfig(target_modules=["proj"], r=2, lora_alpha=3,
                                                   init_lora_weights=False, lora_dropout=0.1))
    rng = np.random.default_rng(3)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.from_numpy(rng.uniform(0.5, 2.0, D_OUT).astype(dtype)))
    W, A, B, m, bias, s = arrays(layer)
    A1, B1, s1 = (layer.lora_A["plain"].weight.detach().numpy(), layer.lora_B["plain"].weight.detach().numpy(),
                  layer.scaling["plain"])
    x = rng.uniform(-1, 1, BATCH + (D_IN,)).astype(dtype)
    xt = torch.from_numpy(x)

    def run(order, train):
        model.base_model.set_adapter(order)
        layer.lora_dropout["default"] = MaskDropout(torch.ones(D_IN, dtype=getattr(torch, dtype)))  # keeps every entry
        layer.lora_dropout["plain"] = torch.nn.Identity()
        model.train(train)
        with torch.no_grad():
            return model(xt).numpy()

    y = {(o, t): run(list(o), t) for o in (("plain", "default"), ("default", "plain")) for t in (False, True)}
    # What each adapter adds to the base output x W^T + b, on its own (lora-ref's definitions):
    base = lora_linear(x, W, None, None, 1.0, bias)
    d_plain = lora_linear(x, W, A1, B1, s1, bias) - base                     # s1 (x A1^T) B1^T
    y_dora = dora_linear(x, W, A, B, m, s, bias)                            # base + the DoRA delta
    C = dora_magnitude(W, A, B, s)
    f = m / C
    # Identities, each within 2 gamma_n M (n: DoRA's "y" count plus the plain adapter's r + 3):
    mags = dora_magnitudes(x, W, A, B, m, s, bias=bias)
    kappa = mags["norm"] / np.asarray(C, np.float64)
    fm = np.abs(m) / C * (1 + kappa)
    M = mags["y"] + (fm + 3) * (abs(s1) * (np.abs(x) @ np.abs(A1).T) @ np.abs(B1).T)
    b = 2 * tolerance(dtype, dora_rounding_counts(D_IN, D_OUT, A.shape[0], 1)["y"] + A1.shape[0] + 3) * M
    # eval, DoRA first: the two deltas add.
    check(f"eval [dora, plain] {dtype}", y[("default", "plain"), False], y_dora + d_plain, b)
    # eval, plain first: DoRA rescales the plain adapter's delta by f = m / ||W + s B A||.
    check(f"eval [plain, dora] {dtype}", y[("plain", "default"), False], y_dora + f * d_plain, b)
    # train with a dropout module (mask of ones): DoRA rescales only the base output, whatever the order.
    for order in (("plain", "default"), ("default", "plain")):
        check(f"train {list(order)} {dtype}", y[order, True], y_dora + d_plain, b)
    gap_order = np.max(np.abs(y[("plain", "default"), False] - y[("default", "plain"), False])) / np.max(np.abs(y_dora))
    gap_mode = np.max(np.abs(y[("plain", "default"), False] - y[("plain", "default"), True])) / np.max(np.abs(y_dora))
    print(f"\n[dora vs peft] two adapters ({dtype}): eval order changes y by {gap_order:.3f} of max|y|, "
          f"eval vs train by {gap_mode:.3f} (f ranges over [{float(np.min(f)):.2f}, {float(np.max(f)):.2f}])")
    assert gap_order > 1e3 * float(np.max(b)) / np.max(np.abs(y_dora))     # a real difference, not rounding


# --------------------------------------------------------------------------------------------
# A second implementation: torchtune's DoRALinear (skipped unless torchtune imports)
# --------------------------------------------------------------------------------------------


def f_mag(x, W, A, B, m, s, bias=None):
    """|f| (1 + kappa) and the DoRA magnitudes (dora_magnitudes' f_mag, recomputed here)."""
    mags = dora_magnitudes(x, W, A, B, m, s, bias=bias)
    C = np.asarray(dora_magnitude(W.astype(np.float64), A.astype(np.float64), B.astype(np.float64), s))
    return np.abs(m) / C * (1.0 + mags["norm"] / C), mags


def test_torchtune_dora_linear():
    # torchtune's convention, read from torchtune/modules/peft/dora.py (0.6.1) and measured here:
    # y = f * (x W^T + bias) + f s (xd A^T) B^T = f * lora_linear(x, W, A, B, s, bias, mask): the
    # bias is rescaled by f, and with dropout the outer base term stays on the clean input but is
    # rescaled too. PEFT (and lora-ref): y = f (xd V^T) + (x - xd) W^T + bias. Same init (the row
    # norm of W + s B A), same detached gradient, same merged weight; they agree exactly when there
    # is neither a bias nor dropout. torchtune's merged checkpoint keeps the bias unscaled, so with
    # a bias its merged model differs from its own forward.
    tt = pytest.importorskip("torchtune.modules.peft")
    torch.manual_seed(4)
    rank, alpha = 4, 8.0
    with default_dtype(torch.float64):
        layer = tt.DoRALinear(D_IN, D_OUT, rank=rank, alpha=alpha, dropout=0.1, use_bias=True)
        torch.nn.init.uniform_(layer.lora_b.weight, -0.5, 0.5)              # non-zero B
        torch.nn.init.uniform_(layer.bias, -1.0, 1.0)
        layer.initialize_dora_magnitude()
    t = lambda p: p.detach().numpy().copy()  # noqa: E731
    W, A, B, bias, m0 = t(layer.weight), t(layer.lora_a.weight), t(layer.lora_b.weight), t(layer.bias), t(layer.magnitude)
    s = alpha / rank                                                         # torchtune has no rsLoRA
    counts = dora_rounding_counts(D_IN, D_OUT, rank, int(np.prod(BATCH)))
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, BATCH + (D_IN,))
    check("torchtune init m", dora_magnitude(W, A, B, s), m0,
          2 * tolerance("float64", counts["norm"]) * f_mag(x, W, A, B, m0, s)[1]["norm"])
    with torch.no_grad():
        layer.magnitude.mul_(torch.from_numpy(rng.uniform(0.5, 2.0, D_OUT)))
    m = t(layer.magnitude)
    f = m / np.asarray(dora_magnitude(W, A, B, s))
    fm, mags = f_mag(x, W, A, B, m, s, bias)
    mask = (rng.random(BATCH + (D_IN,)) >= 0.5) / 0.5

    for dropout in (False, True):
        layer.dropout = MaskDropout(torch.from_numpy(mask)) if dropout else torch.nn.Identity()
        with torch.no_grad():
            y_tt = layer(torch.from_numpy(x)).numpy()
        y_eval = y_tt if not dropout else y_eval
        mk = mask if dropout else None
        lora_mag = lora_linear(np.abs(x), np.abs(W), np.abs(A), np.abs(B), s, np.abs(bias), mk)
        b = 2 * tolerance("float64", counts["y"] + 2) * (fm * lora_mag + mags["y"])
        check(f"torchtune y {'mask' if dropout else 'eval'}", f * lora_linear(x, W, A, B, s, bias, mk), y_tt, b)
        gap = np.max(np.abs(y_tt - dora_linear(x, W, A, B, m, s, bias, mk)) / b)
        assert gap > 1e3, f"torchtune's convention is only {gap:.3g} bounds from PEFT's"
        print(f"\n[dora vs torchtune] bias{' + dropout' if dropout else ''}: torchtune - lora-ref "
              f"= {np.max(np.abs(y_tt - dora_linear(x, W, A, B, m, s, bias, mk))):.3f} (max), {gap:.2g} bounds")

    # torchtune's merged checkpoint scales W but leaves the bias: merged forward = y_eval - f b + b.
    state = {"p.weight": layer.weight.detach().clone(), "p.bias": layer.bias.detach().clone(),
             "p.lora_a.weight": layer.lora_a.weight.detach(), "p.lora_b.weight": layer.lora_b.weight.detach(),
             "p.magnitude": layer.magnitude.detach()}
    merged = tt.get_merged_lora_ckpt(state, rank=rank, alpha=alpha)
    assert np.array_equal(merged["p.bias"].numpy(), bias) and "p.magnitude" not in merged
    y_merged = x @ merged["p.weight"].numpy().T + bias
    gap = np.max(np.abs(y_merged - y_eval))
    assert_within(y_merged, y_eval - f * bias + bias, 2 * tolerance("float64", counts["y"] + 2) * (fm * lora_mag + mags["y"]))
    print(f"[dora vs torchtune] merged checkpoint vs its own forward, with a bias: {gap:.3f} (max)")

    # Without bias and dropout: the same layer, the same detached gradient.
    with torch.no_grad():
        layer.bias.zero_()
    layer.dropout = torch.nn.Identity()
    G = rng.uniform(-1, 1, BATCH + (D_OUT,))
    y_t = layer(torch.from_numpy(x))
    (y_t * torch.from_numpy(G)).sum().backward()
    vjp, y = autograd.make_vjp(lambda A_, B_, m_: dora_linear(x, W, A_, B_, m_, s), argnum=(0, 1, 2))(A, B, m)
    mags = dora_magnitudes(x, W, A, B, m, s, dy=G)
    check("torchtune y no bias", y, y_t.detach().numpy(), 2 * tolerance("float64", counts["y"]) * mags["y"])
    for key, ours, theirs in zip(("dA", "dB", "dm"), vjp(G), (layer.lora_a.weight, layer.lora_b.weight, layer.magnitude)):
        check(f"torchtune {key}", ours, theirs.grad.numpy(), 2 * tolerance("float64", counts[key]) * mags[key])

    merged = tt.get_merged_lora_ckpt({"p.weight": layer.weight.detach().clone(), "p.lora_a.weight": layer.lora_a.weight.detach(),
                                      "p.lora_b.weight": layer.lora_b.weight.detach(), "p.magnitude": layer.magnitude.detach()},
                                     rank=rank, alpha=alpha)["p.weight"].numpy()
    check("torchtune merged W", dora_merge(W, A, B, m, s), merged,
          2 * tolerance("float64", counts["W_merged"]) * mags["W_merged"])
