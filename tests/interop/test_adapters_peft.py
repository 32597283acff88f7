"""Many adapters on one base against PEFT 0.21.2 on PyTorch (CPU, float64), and the serving
contract against a per-token computation in PyTorch.

A tiny torch module (two nn.Linear, float64) gets three PEFT adapters of ranks 2, 3 and 4, one
of them rsLoRA, with random non-zero B (``init_lora_weights=False``). Each LoRA layer's input and
output are captured with forward hooks, and lora-ref computes the same layer from the captured
input; ``pytest -s`` prints every comparison's largest error relative to its bound.

* summed active adapters (``base_model.set_adapter([...])``), ``disable_adapter()``, and
  ``merge_adapter`` of the active set: :mod:`lora_ref.adapters`;
* ``model(x, adapter_names=[...])`` mixed batches: ``mixed_batch_linear``;
* ``add_weighted_adapter`` for every combination type: :func:`lora_ref.combine.combine_adapters`,
  and its options ``svd_clamp``, ``svd_rank`` (lora-ref's ``rank``) and
  ``majority_sign_method="frequency"`` (lora-ref's ``majority_sign``) on every ties variant.
  DARE's masks are INJECTED: ``torch.bernoulli`` (which PEFT's ``random_pruning`` calls) is
  replaced by a function handing out masks drawn by :func:`lora_ref.combine.dare_masks`, in the
  order PEFT draws them (per module: the A's in adapter order, then the B's; SVD methods: one per
  delta). Reproducing torch's own draws from a seed would tie the test to torch's RNG stream;
  injecting checks the same arithmetic with masks both sides know. The wrapper checks each
  request's shape and that it asks for Bernoulli(density), and that every mask was used;
* PEFT 0.21.2's rsLoRA over-scaling, measured.

Bounds: layer outputs ``2 gamma_n M``, n = d_in + r_max + k + 4 (as tests/test_adapters.py), M
the layer on absolute values; combined factors ``2 gamma_{n+4} M`` with M the operator on
absolute values (tests/test_combine.py); SVD products ``4 gamma_{mn} ||D||_F`` (two SVDs, LAPACK's
backward error with p(m, n) = m n); SVD factors, which also move with the singular subspaces,
that times ``1 + 2 sigma_1 / delta`` (Wedin), delta the smallest gap among the kept singular
values and to the first dropped one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
ml_dtypes = pytest.importorskip("ml_dtypes")

from lora_ref import delta_weight  # noqa: E402
from lora_ref.adapters import BASE, adapter_set_linear, merge_adapters, mixed_batch_linear  # noqa: E402
from lora_ref.combine import METHODS, SVD_METHODS, combine_adapters, dare_masks  # noqa: E402
from lora_ref.serving import add_lora, stack_adapters, token_indices, Segments  # noqa: E402
from lora_ref.testing import tolerance  # noqa: E402

pytestmark = pytest.mark.interop

NAMES = ("north", "south", "east")     # not substrings of PEFT's "lora_" prefix
LAYERS = ("fc1", "fc2")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(5, 7, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def build(ranks=(2, 3, 4), rslora=(False, True, False)):
    torch.manual_seed(0)
    model, pm = Tiny(), None
    for name, r, rs in zip(NAMES, ranks, rslora):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=list(LAYERS), init_lora_weights=False,
                              use_rslora=rs)
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    return pm.eval()


def layer(pm, name):
    return getattr(pm.base_model.model, name)


def adapters_of(pm, name, names=NAMES):
    lyr = layer(pm, name)
    return {n: (lyr.lora_A[n].weight.detach().numpy().copy(), lyr.lora_B[n].weight.detach().numpy().copy(),
                lyr.scaling[n]) for n in names}


def capture(pm, x, **kw):
    """Each LoRA layer's (input, output) as NumPy, from forward hooks."""
    seen, hooks = {}, []
    for name in LAYERS:
        hooks.append(layer(pm, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0].detach().numpy().copy(),
                                                                      out.detach().numpy().copy()))))
    with torch.no_grad():
        pm(torch.from_numpy(x), **kw)
    for h in hooks:
        h.remove()
    return seen


def base_of(pm, name):
    base = layer(pm, name).base_layer
    return base.weight.detach().numpy().copy(), base.bias.detach().numpy().copy()


def ratio(got, ref, bound):
    err = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(bound > 0, err / bound, np.where(err > 0, np.inf, 0.0))
    return float(r.max())


def check(what, got, ref, bound):
    r = ratio(got, ref, bound)
    print(f"{what}: max |lora-ref - PyTorch/PEFT| = {np.abs(np.asarray(got) - np.asarray(ref)).max():.3e}, "
          f"{r:.3f} of the bound")
    assert r <= 1, what


def layer_bound(x, W, b, ads, active):
    M = adapter_set_linear(np.abs(x), np.abs(W), {k: tuple(np.abs(t) if i < 2 else abs(t) for i, t in enumerate(v))
                                                  for k, v in ads.items()}, active, bias=np.abs(b))
    n = W.shape[1] + max(ads[a][0].shape[0] for a in ads) + len(active) + 4
    return 2 * tolerance("float64", n) * M


# ----------------------------------------------------------------------------------------------
# Summed active adapters, disabled, merged
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("active", [["north"], ["east", "north"], ["north", "south", "east"], []])
def test_summed_active_adapters(active):
    pm = build()
    x = np.random.default_rng(0).normal(size=(3, 4, 6))
    if active:
        pm.base_model.set_adapter(active)
        seen = capture(pm, x)
    else:
        with pm.disable_adapter():
            seen = capture(pm, x)
    for name in LAYERS:
        inp, out = seen[name]
        W, b = base_of(pm, name)
        ads = adapters_of(pm, name)
        ours = adapter_set_linear(inp, W, ads, active, bias=b)
        check(f"{name} active={active}", ours, out, layer_bound(inp, W, b, ads, active))


def test_merging_the_active_set():
    pm = build()
    pm.base_model.set_adapter(["south", "east"])
    before = {n: base_of(pm, n)[0] for n in LAYERS}
    pm.base_model.merge_adapter(["south", "east"])
    for name in LAYERS:
        ads = adapters_of(pm, name)
        ours = merge_adapters(before[name], ads, ["south", "east"])
        M = np.abs(before[name]) + sum(abs(ads[a][2]) * np.abs(ads[a][1]) @ np.abs(ads[a][0])
                                       for a in ("south", "east"))
        # per entry: B A (r_max = 4 roundings), the scale (2), two additions to W, both ways
        check(f"{name} merged", ours, base_of(pm, name)[0], 2 * tolerance("float64", 4 + 2 + 4) * M)


# ----------------------------------------------------------------------------------------------
# Mixed batches: adapter_names=
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["north", BASE, "east", "south", "north"], [BASE, BASE], ["south"]])
def test_mixed_batch(names):
    pm = build()
    pm.base_model.set_adapter(["east"])          # the active set must not matter
    x = np.random.default_rng(1).normal(size=(len(names), 3, 6))
    seen = capture(pm, x, adapter_names=list(names))
    for name in LAYERS:
        inp, out = seen[name]
        W, b = base_of(pm, name)
        ads = adapters_of(pm, name)
        ours = mixed_batch_linear(inp, W, ads, names, bias=b)
        for n, a in enumerate(names):
            active = () if a == BASE else (a,)
            check(f"{name} sample {n} ({a})", ours[n], out[n], layer_bound(inp[n], W, b, ads, active))


# ----------------------------------------------------------------------------------------------
# add_weighted_adapter, every combination type
# ----------------------------------------------------------------------------------------------


class InjectedBernoulli:
    """Stands in for torch.bernoulli inside PEFT's random_pruning: hands out the given masks."""

    def __init__(self, masks, density):
        self.queue, self.density = list(masks), density

    def __call__(self, probs, *args, **kwargs):
        assert not args and not kwargs and self.queue, "PEFT asked for more masks than it should"
        assert torch.all(probs == self.density), "PEFT asked for a Bernoulli draw of another density"
        mask = self.queue.pop(0)
        assert tuple(mask.shape) == tuple(probs.shape), (mask.shape, probs.shape)
        return torch.from_numpy(mask).to(probs.dtype)


def _svd_factor_bound(D, k):
    S = np.linalg.svd(D, compute_uv=False)
    kept = S[:k + 1] if k < len(S) else S[:k]
    gaps = np.abs(np.diff(kept))
    delta = gaps.min() if gaps.size else S[0]
    assert delta > 0, "repeated singular values: the factors are not unique"
    m, n = D.shape
    return 4 * tolerance("float64", m * n) * np.linalg.norm(D) * (1 + 2 * S[0] / delta)


def torch_svd(D, full_matrices):
    U, S, Vh = torch.linalg.svd(torch.from_numpy(np.asarray(D)), full_matrices=full_matrices)
    return U.numpy(), S.numpy(), Vh.numpy()


# add_weighted_adapter's options beyond the defaults, each compared against PEFT (PEFT's name -> lora-ref's).
OURS = {"svd_clamp": "svd_clamp", "svd_rank": "rank", "majority_sign_method": "majority_sign"}
FREQUENCY = [{"majority_sign_method": "frequency"}]
OPTIONS = {"svd": [{"svd_clamp": 0.9}, {"svd_clamp": 0.3}, {"svd_rank": 2}], "ties": FREQUENCY, "dare_ties": FREQUENCY,
           "ties_svd": FREQUENCY, "dare_ties_svd": FREQUENCY}
WEIGHTED = [(m, o) for m in METHODS if m != "exact" for o in [{}] + OPTIONS.get(m, [])]


@pytest.mark.parametrize("method,options", WEIGHTED,
                         ids=[m + "".join(f"-{k}={v}" for k, v in o.items()) for m, o in WEIGHTED])
def test_add_weighted_adapter(method, options, monkeypatch):
    same_rank = method not in SVD_METHODS and method != "cat"
    pm = build(ranks=(3, 3, 3) if same_rank else (2, 3, 4))
    weights, density = [0.7, -0.4, 1.3], 0.6
    kw = {} if method in ("cat", "linear", "svd") else {"density": density}
    ads = {name: adapters_of(pm, name) for name in LAYERS}
    masks = {name: None for name in LAYERS}
    if "dare" in method:
        rng, queue = np.random.default_rng(1), []
        for name in LAYERS:                          # PEFT's module order: fc1, then fc2
            masks[name] = dare_masks(ads[name], method, density, rng)
            m = masks[name]
            queue += ([m[n] for n in NAMES] if method in SVD_METHODS else
                      [m[n][0] for n in NAMES] + [m[n][1] for n in NAMES])
        injected = InjectedBernoulli(queue, density)
        monkeypatch.setattr(torch, "bernoulli", injected)
    ours_kw = dict(kw, **{OURS[k]: v for k, v in options.items()})
    clamp = options.get("svd_clamp")
    pm.add_weighted_adapter(list(NAMES), weights, "mix", combination_type=method, **kw, **options)
    if "dare" in method:
        assert not injected.queue, "PEFT drew fewer masks than expected"
    for name in LAYERS:
        lyr = layer(pm, name)
        A_p, B_p = lyr.lora_A["mix"].weight.detach().numpy(), lyr.lora_B["mix"].weight.detach().numpy()
        assert lyr.scaling["mix"] == 1.0       # the first adapter, north, is not rsLoRA
        ours = combine_adapters(ads[name], weights, method, masks=masks[name], **ours_kw)
        assert ours.scale == 1.0 and ours.rank == peft_rank(pm, "mix") == options.get("svd_rank", ours.rank)
        D = delta_weight(ours.A, ours.B, 1.0)
        if "majority_sign_method" in options:    # the option is exercised: "total" gives another delta here
            total = combine_adapters(ads[name], weights, method, masks=masks[name], **kw)
            assert np.max(np.abs(delta_weight(total.A, total.B, 1.0) - D)) > 0
        if method == "cat":                      # A's rows (A_i w_i) s_i (2 roundings), B's columns copied
            M = np.concatenate([np.abs(ads[name][n][0]) * abs(w * ads[name][n][2]) for n, w in zip(NAMES, weights)])
            check(f"cat {name} A", ours.A, A_p, 2 * tolerance("float64", 2) * M)
            assert np.array_equal(ours.B, B_p)
            continue
        if method not in SVD_METHODS:
            # Factors, entry by entry: 3 terms |t_i| sqrt|w_i s_i| (/ density for DARE), with the
            # weights' own roundings (sqrt, product, float32 cast: exact in float64 after it),
            # the sum, DARE's division and TIES' division: 3 + 4 + 2 roundings.
            rescale = 1 / density if "dare" in method else 1.0
            for got, ref, k in ((ours.A, A_p, 0), (ours.B, B_p, 1)):
                M = sum(np.abs(ads[name][n][k]) * math.sqrt(abs(w * ads[name][n][2])) for n, w in zip(NAMES, weights))
                check(f"{method} {name} {'AB'[k]}", got, ref, 2 * tolerance("float64", 3 + 4 + 2) * M * rescale)
            continue
        if clamp is None:                        # the product does not depend on LAPACK's signs
            check(f"{method} {name} B A", D, B_p @ A_p, 4 * tolerance("float64", D.size) * np.linalg.norm(D))
        # With PEFT's own SVD (torch's LAPACK, its sign choice), the factors themselves:
        mine = combine_adapters(ads[name], weights, method, masks=masks[name], svd=torch_svd, **ours_kw)
        # The singular values of the matrix before truncation and clamping (rank min(m, n) keeps all).
        before = {k: v for k, v in ours_kw.items() if k not in ("rank", "svd_clamp")}
        whole = combine_adapters(ads[name], weights, method, masks=masks[name], rank=min(D.shape),
                                 svd_full_matrices=False, **before)
        bound = _svd_factor_bound(delta_weight(whole.A, whole.B, 1.0), mine.A.shape[0])
        check(f"{method} {name} clamp={clamp} A", mine.A, A_p, bound)
        check(f"{method} {name} clamp={clamp} B", mine.B, B_p, bound)


def peft_rank(pm, name):
    return pm.peft_config[name].r


# ----------------------------------------------------------------------------------------------
# PEFT 0.21.2's rsLoRA over-scaling, measured
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_rslora_over_scaling(method):
    # south (rank 3) is rsLoRA; listed first, its config is the one PEFT copies.
    pm = build(ranks=(3, 3, 3) if method == "linear" else (2, 3, 4))
    order, weights = ["south", "north", "east"], [1.0, 0.5, -0.5]
    pm.add_weighted_adapter(order, weights, "mix", combination_type=method)
    for name in LAYERS:
        lyr = layer(pm, name)
        ads = adapters_of(pm, name, order)
        intended = combine_adapters(ads, weights, method)
        buggy = combine_adapters(ads, weights, method, peft_rslora_bug=True)
        d_peft = lyr.get_delta_weight("mix").detach().numpy()
        factor = np.linalg.norm(d_peft) / np.linalg.norm(delta_weight(intended.A, intended.B, intended.scale))
        print(f"{method} {name}: PEFT's scale {lyr.scaling['mix']!r} (rank {intended.rank}); "
              f"||PEFT delta|| / ||intended delta|| = {factor:.6f}, sqrt(rank) = {math.sqrt(intended.rank):.6f}")
        assert pm.peft_config["mix"].use_rslora and lyr.scaling["mix"] == buggy.scale
        D = delta_weight(buggy.A, buggy.B, buggy.scale)
        check(f"{method} {name} with peft_rslora_bug", D, d_peft, 4 * tolerance("float64", D.size) * np.linalg.norm(D))
        # each delta within 4 gamma_{mn} of its norm (two SVDs), so their ratio within twice that
        assert abs(factor - math.sqrt(intended.rank)) <= 8 * tolerance("float64", D.size) * math.sqrt(intended.rank)


# ----------------------------------------------------------------------------------------------
# Serving: shrink/expand against a per-token computation in PyTorch
# ----------------------------------------------------------------------------------------------


def torch_per_token(y, x, A_stacks, B_stacks, idx, scale, slices, dtype):
    """The serving contract, one token at a time, in PyTorch: float32 accumulation, h rounded to
    the storage dtype before the expand, c rounded, y + c rounded."""
    y = y.clone()
    for t in range(x.shape[0]):
        i = int(idx[t])
        if i < 0:
            continue
        for (off, w), A, B in zip(slices, A_stacks, B_stacks):
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            h = (A[i].to(acc) @ x[t].to(acc)) * torch.tensor(scale, dtype=acc)
            c = (B[i].to(acc) @ h.to(dtype).to(acc)).to(dtype)
            y[t, off:off + w] = (y[t, off:off + w].to(acc) + c.to(acc)).to(dtype)
    return y


TORCH = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NUMPY = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.mark.parametrize("dtype", list(TORCH))
def test_serving_against_torch_per_token(dtype):
    rng = np.random.default_rng(4)
    dt = NUMPY[dtype]
    u = lambda *shape: rng.uniform(-1, 1, size=shape).astype(dt)     # noqa: E731
    T, d_in, widths = 9, 16, (8, 4, 4)                                # q, k, v of a grouped-query layer
    slots = [[(u(r, d_in), u(w, r), s) for r, s in ((2, 1.0), (8, 0.25), (4, 2.0))] for w in widths]
    stacks = [stack_adapters(s) for s in slots]
    A, B = [s[0] for s in stacks], [s[1] for s in stacks]
    slices = [(0, 8), (8, 4), (12, 4)]
    x, y = u(T, d_in), u(T, 16)
    seg = Segments([0, 3, 4, 7], [3, 1, 3, 2], [2, -1, 0, 1])
    ours = add_lora(y, x, A, B, seg, 1.0, slices)
    to_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(TORCH[dtype])  # noqa: E731  exact
    ref = torch_per_token(to_t(y), to_t(x), [to_t(a) for a in A], [to_t(b) for b in B],
                          token_indices(seg, T), 1.0, slices, TORCH[dtype]).to(torch.float64).numpy()
    # Bound (tests/test_serving.py): 2 ((1 + gamma_{d_in+R+4}(Acc)) (1 + gamma_3(S)) - 1) M.
    u_s = 2.0 ** -8 if dtype == "bfloat16" else float(np.finfo(dt).eps) / 2     # unit roundoff of S
    g3 = 3 * u_s / (1 - 3 * u_s)
    acc = "float64" if dtype == "float64" else "float32"
    E = (1 + tolerance(acc, d_in + 8 + 4)) * (1 + g3) - 1
    M = np.abs(np.asarray(y, np.float64))
    for t, i in enumerate(token_indices(seg, T)):
        if i >= 0:
            for (off, w), sl in zip(slices, slots):
                a, b, s = (np.abs(np.asarray(v, np.float64)) if k < 2 else v for k, v in enumerate(sl[i]))
                M[t, off:off + w] += s * (b @ (a @ np.abs(np.asarray(x[t], np.float64))))
    check(f"serving {dtype} vs torch per token", np.asarray(ours, np.float64), ref, 2 * E * M)
