"""Embedding and convolution LoRA against PyTorch, PEFT 0.21.2 and loralib 0.1.2 (CPU).

What is compared (float64, and float32 where noted):

* the reference convolution lora_ref.conv.conv_nd against torch.nn.functional.conv1d/conv2d:
  output and the gradients of x, weight and bias;
* PEFT's Conv1d/Conv2d LoRA layer (init_lora_weights=False: non-zero B) over stride, padding,
  groups and an explicit dropout mask: output, gradients of x, lora_A, lora_B, merged weight; what
  PEFT does with groups > 1 (merge refused) and with dilation (a shape error, or, where stride makes
  the sizes agree, a forward that is not its own merged model);
* PEFT's Embedding LoRA on a tiny module (with and without padding_idx) and on a tiny GPT-2
  (target_modules ["wte"] and ["wte", "c_attn"]): the embedding output, the gradients of
  lora_embedding_A/B through the whole model's loss, the merged table; the tied output head:
  merged against unmerged logits, and ensure_weight_tying=True;
* loralib's Embedding and Conv2d (ConvLoRA), and how its Conv1d with a kernel > 1 fails.

Bounds are ``2 * tolerance(dtype, n) * M`` (lora_ref.testing), n and M as derived in
tests/test_embedding.py and tests/test_conv.py: both sides compute in the same dtype, each within
gamma_n M of the exact value. For the tied-head facts the adapter factors are small dyadic numbers
(multiples of 1/64, s = 2) so that ``s B A`` is exact and merged and unmerged lookups agree bit for
bit: those comparisons are exact, no tolerance. Run with ``pytest -s`` to see every error/bound.

The measured lines docs/embedding.md and docs/conv.md quote are printed through
``assert_page_shows``, which fails when the page does not show the line verbatim: the pages cannot
drift from what these tests measure (every number printed here is bit-for-bit the same run to run:
fixed seeds, fixed shapes).
"""

from __future__ import annotations

import copy
import math
import warnings

import autograd
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
loralib = pytest.importorskip("loralib")

import _pages  # noqa: E402
from lora_ref.conv import conv_nd, lora_conv, loralib_conv_delta, merge_conv  # noqa: E402
from lora_ref.embedding import lora_embedding, merge_embedding  # noqa: E402
from lora_ref.testing import assert_within, tolerance  # noqa: E402

pytestmark = pytest.mark.interop
F = torch.nn.functional
TORCH = {"float64": torch.float64, "float32": torch.float32}
CONV = {1: F.conv1d, 2: F.conv2d}


def f64(t):
    return (t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).astype(np.float64)


EMBEDDING_PAGE = ("embedding.md", 'python -m pytest -q -s tests/interop/test_embedding_conv_peft.py -k "tied_head or tying or reload"')
CONV_PAGE = ("conv.md", "python -m pytest -q -s tests/interop/test_embedding_conv_peft.py -k dilation")




def assert_page_shows(line, page):
    """_pages.assert_page_shows for ``page``, a (file name, the command that prints the line) pair."""
    _pages.assert_page_shows(line, *page)


def check(what, ours, theirs, bound, page=None):
    """assert_within, printing max |ours - theirs| / max |theirs| and the worst error / bound (a
    line ``page`` must show, when given)."""
    theirs = f64(theirs)
    ratio = assert_within(ours, theirs, bound, what=what)
    rel = float(np.max(np.abs(f64(ours) - theirs)) / max(np.max(np.abs(theirs)), 1e-300))
    line = f"  {what:<48} max relative error {rel:.2e}   error/bound {ratio:.2e}"
    if page is None:
        print("\n" + line)
    else:
        assert_page_shows(line, page)


def t(a, requires_grad=False):
    return torch.tensor(a, requires_grad=requires_grad)


# ============================================================================================
# The reference convolution against torch.nn.functional.conv1d / conv2d
# ============================================================================================

GEOMETRIES = [
    ((9,), (3,), dict(stride=2, padding=1)),
    ((12,), (3,), dict(stride=3, padding=2, dilation=2, groups=2)),
    ((7, 8), (3, 3), dict(padding=1)),
    ((8, 7), (3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)),
    ((9, 9), (3, 3), dict(stride=2, padding=2, dilation=2, groups=4)),
]
IDS = [f"{len(s)}d-" + "-".join(f"{k}{v}" for k, v in g.items()) for s, _, g in GEOMETRIES]
C_IN = C_OUT = 4


@pytest.mark.parametrize("dtype", TORCH)
@pytest.mark.parametrize("size, kernel, geo", GEOMETRIES, ids=IDS)
def test_reference_conv_against_torch(size, kernel, geo, dtype):
    rng, G = np.random.default_rng(0), geo.get("groups", 1)
    x, W, b = (rng.uniform(-1, 1, s).astype(dtype) for s in ((2, C_IN) + size, (C_OUT, C_IN // G) + kernel, (C_OUT,)))
    xt, Wt, bt = t(x, True), t(W, True), t(b, True)
    yt = CONV[len(size)](xt, Wt, bt, **geo)
    g = rng.uniform(-1, 1, tuple(yt.shape)).astype(dtype)
    yt.backward(t(g))
    vjp, y = autograd.make_vjp(lambda x, W, b: conv_nd(x, W, b, **geo), argnum=(0, 1, 2))(x, W, b)
    mag_vjp, M = autograd.make_vjp(lambda x, W, b: conv_nd(x, W, b, **geo), argnum=(0, 1, 2))(
        *(np.abs(a.astype(np.float64)) for a in (x, W, b)))
    K, NP = math.prod(kernel), 2 * math.prod(y.shape[2:])
    check(f"conv {IDS[GEOMETRIES.index((size, kernel, geo))]} {dtype} y", y, yt,
          2 * tolerance(dtype, C_IN // G * K + 1) * M)
    L = NP + C_OUT * K + 2                                    # K1: C_out K terms, K2 and K3: N P
    for name, ours, theirs, m in zip(("dx", "dW", "dbias"), vjp(g), (xt.grad, Wt.grad, bt.grad), mag_vjp(np.abs(g).astype(np.float64))):
        check(f"conv {dtype} {name}", ours, theirs, 2 * tolerance(dtype, L) * m)


# ============================================================================================
# PEFT conv LoRA at the layer level
# ============================================================================================


class Holder(torch.nn.Module):
    """A module whose child ``conv`` (or ``emb``) PEFT adapts."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class FixedMask(torch.nn.Module):
    """PEFT's lora_dropout replaced by an explicit inverted-dropout mask, so both sides use one."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def peft_conv(size, kernel, geo, dtype, r=4, alpha=3.0, dropout=0.0):
    torch.manual_seed(0)
    n = len(size)
    conv = (torch.nn.Conv1d if n == 1 else torch.nn.Conv2d)(C_IN, C_OUT, kernel, **geo).to(TORCH[dtype])
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"], init_lora_weights=False, lora_dropout=dropout)
    return peft.get_peft_model(Holder(conv), config)


PEFT_GEOMETRIES = [g for g in GEOMETRIES if "dilation" not in g[2]] + [
    ((9,), (3,), dict(groups=2)), ((7, 8), (3, 3), dict(stride=2, groups=2)), ((7, 8), (1, 1), dict())]
PEFT_IDS = [f"{len(s)}d-k{k[0]}-" + ("-".join(f"{a}{v}" for a, v in g.items()) or "plain") for s, k, g in PEFT_GEOMETRIES]


@pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")
@pytest.mark.parametrize("dtype", TORCH)
@pytest.mark.parametrize("size, kernel, geo", PEFT_GEOMETRIES, ids=PEFT_IDS)
def test_peft_conv_lora(size, kernel, geo, dtype):
    pm = peft_conv(size, kernel, geo, dtype, dropout=0.25)
    layer = pm.base_model.model.layer
    rng, G, s = np.random.default_rng(1), geo.get("groups", 1), layer.scaling["default"]
    x = rng.uniform(-1, 1, (2, C_IN) + size).astype(dtype)
    mask = ((rng.random(x.shape) >= 0.25) / 0.75).astype(dtype)
    layer.lora_dropout["default"] = FixedMask(t(mask))
    W, b = f64(layer.base_layer.weight).astype(dtype), f64(layer.base_layer.bias).astype(dtype)
    A, B = f64(layer.lora_A["default"].weight).astype(dtype), f64(layer.lora_B["default"].weight).astype(dtype)
    assert A.shape == (4, C_IN) + kernel and B.shape == (C_OUT, 4 // G) + (1,) * len(size)   # PEFT's layout
    xt = t(x, True)
    yt = pm(xt)
    g = rng.uniform(-1, 1, tuple(yt.shape)).astype(dtype)
    yt.backward(t(g))
    f = lambda x, A, B: lora_conv(x, W, A, B, s, b, dropout_mask=mask, **geo)  # noqa: E731
    vjp, y = autograd.make_vjp(f, argnum=(0, 1, 2))(x, A, B)
    ab = lambda a: np.abs(a.astype(np.float64))  # noqa: E731
    mag_vjp, M = autograd.make_vjp(lambda x, A, B: lora_conv(x, ab(W), A, B, abs(s), ab(b), dropout_mask=ab(mask), **geo),
                                   argnum=(0, 1, 2))(ab(x), ab(A), ab(B))
    K, NP, r = math.prod(kernel), 2 * math.prod(y.shape[2:]), 4
    check(f"peft conv {PEFT_IDS[PEFT_GEOMETRIES.index((size, kernel, geo))]} {dtype} y", y, yt,
          2 * tolerance(dtype, C_IN * K + r + 5) * M)
    L = NP + C_IN * K + C_OUT * K + C_OUT + r * K + 8            # as tests/test_conv.py
    for name, ours, theirs, m in zip(("dx", "dA", "dB"), vjp(g), (xt.grad, layer.lora_A["default"].weight.grad,
                                                                  layer.lora_B["default"].weight.grad), mag_vjp(ab(g))):
        check(f"peft conv {dtype} {name}", ours, theirs, 2 * tolerance(dtype, L) * m)
    if G > 1:   # PEFT refuses to merge a grouped conv's adapter; so does lora_ref
        with pytest.raises(NotImplementedError, match="groups > 1"):
            pm.merge_and_unload()
        with pytest.raises(ValueError, match="grouped"):
            merge_conv(W, A, B, s)
        return
    merged = pm.merge_and_unload().layer.weight
    M_merge = ab(W) + abs(s) * np.abs(merge_conv(np.zeros_like(ab(W)), ab(A), ab(B), 1.0))
    check(f"peft conv {dtype} merged weight", merge_conv(W, A, B, s), merged, 2 * tolerance(dtype, r + 3) * M_merge)


def test_peft_conv_with_dilation():
    """PEFT builds lora_A without the base's dilation. Usually the output sizes then differ and
    the forward raises; where stride makes them agree, PEFT computes a function that is not its own
    merged model. lora_ref applies the dilation to A: it equals PEFT's MERGED model."""
    pm = peft_conv((16,), (3,), dict(dilation=2), "float64")
    assert pm.base_model.model.layer.lora_A["default"].dilation == (1,)
    with pytest.raises(RuntimeError, match=r"The size of tensor a \(12\) must match the size of tensor b \(14\)"):
        pm(torch.zeros(1, C_IN, 16, dtype=torch.float64))
    geo = dict(stride=3, dilation=2)                               # L = 11: (11 - 5) // 3 = (11 - 3) // 3 = 2
    pm = peft_conv((11,), (3,), geo, "float64")
    layer = pm.base_model.model.layer
    s = layer.scaling["default"]
    W, b, A, B = (f64(p) for p in (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                                   layer.lora_B["default"].weight))
    x = np.random.default_rng(2).uniform(-1, 1, (2, C_IN, 11))
    unmerged = f64(pm(t(x)))
    ours = lora_conv(x, W, A, B, s, b, **geo)
    M = lora_conv(np.abs(x), np.abs(W), np.abs(A), np.abs(B), s, np.abs(b), **geo)
    bound = 2 * tolerance("float64", C_IN * 3 + 4 + 5) * M
    undilated = conv_nd(x, W, b, **geo) + s * conv_nd(conv_nd(x, A, stride=3), B)   # what PEFT computes
    check("peft dilated conv: unmerged = A without dilation", undilated, unmerged, bound, page=CONV_PAGE)
    assert_page_shows(f"  peft dilated conv: max |PEFT unmerged - lora_ref| = {np.max(np.abs(unmerged - ours)):.3f}, "
                      f"{np.max(np.abs(unmerged - ours) / bound):.1e} bounds", CONV_PAGE)
    assert np.max(np.abs(unmerged - ours) / bound) > 1e3
    merged = f64(pm.merge_and_unload()(t(x)))
    check("peft dilated conv: merged = lora_ref", ours, merged, bound, page=CONV_PAGE)


# ============================================================================================
# PEFT embedding LoRA: a tiny module
# ============================================================================================

V, D, R = 24, 8, 4


def embedding_bounds(ids, E, A, B, s, G):
    """Forward bound (n = r + 3) and gradient bounds (n = D + N + 3) for one case (float64 M)."""
    ab = lambda a: np.abs(np.asarray(a, dtype=np.float64))  # noqa: E731
    vjp, M = autograd.make_vjp(lambda E, A, B: lora_embedding(ids, E, A, B, abs(s)), argnum=(0, 1, 2))(ab(E), ab(A), ab(B))
    return M, vjp(ab(G)), A.shape[0] + 3, E.shape[1] + ids.size + 3


@pytest.mark.parametrize("padding_idx", [None, 5])
@pytest.mark.parametrize("dtype", TORCH)
def test_peft_embedding_layer(dtype, padding_idx):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, D, padding_idx=padding_idx).to(TORCH[dtype])
    # lora_dropout > 0 and train mode: PEFT must still apply no dropout on this path.
    pm = peft.get_peft_model(Holder(emb), peft.LoraConfig(r=R, lora_alpha=6, target_modules=["layer"],
                                                            init_lora_weights=False, lora_dropout=0.5)).train()
    layer = pm.base_model.model.layer
    E, A, B = (f64(p).astype(dtype) for p in (layer.base_layer.weight, layer.lora_embedding_A["default"],
                                                layer.lora_embedding_B["default"]))
    s = layer.scaling["default"]
    assert A.shape == (R, V) and B.shape == (D, R)
    ids = np.random.default_rng(3).integers(0, V, (3, 7))
    ids[0, :3] = 5                                                 # the padding id occurs
    yt = pm(torch.tensor(ids))
    g = np.random.default_rng(4).uniform(-1, 1, tuple(yt.shape)).astype(dtype)
    yt.backward(t(g))
    vjp, y = autograd.make_vjp(lambda A, B: lora_embedding(ids, E, A, B, s, padding_idx), argnum=(0, 1))(A, B)
    M, (_, mA, mB), n_y, n_g = embedding_bounds(ids, E, A, B, s, g)
    check(f"peft embedding {dtype} padding_idx={padding_idx} y", y, yt, 2 * tolerance(dtype, n_y) * M)
    dA, dB = vjp(g)
    check(f"peft embedding {dtype} dA", dA, layer.lora_embedding_A["default"].grad, 2 * tolerance(dtype, n_g) * mA)
    check(f"peft embedding {dtype} dB", dB, layer.lora_embedding_B["default"].grad, 2 * tolerance(dtype, n_g) * mB)
    if padding_idx is not None:
        assert not np.any(f64(layer.lora_embedding_A["default"].grad)[:, padding_idx]) and not np.any(dA[:, padding_idx])
    merged = pm.merge_and_unload().layer.weight
    M_merge = np.abs(f64(E)) + abs(s) * (np.abs(f64(B)) @ np.abs(f64(A))).T
    check(f"peft embedding {dtype} merged table", merge_embedding(E, A, B, s), merged, 2 * tolerance(dtype, R + 3) * M_merge)


def test_peft_embedding_default_init():
    pm = peft.get_peft_model(Holder(torch.nn.Embedding(V, D)), peft.LoraConfig(r=R, target_modules=["layer"]))
    layer = pm.base_model.model.layer
    assert not torch.any(layer.lora_embedding_A["default"])       # A = 0, B random: the roles swapped
    assert torch.all(layer.lora_embedding_B["default"] != 0)


# ============================================================================================
# PEFT embedding LoRA on a tiny GPT-2, and the tied output head
# ============================================================================================

TINY = dict(n_embd=D, n_layer=1, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).double().eval()


def dyadic_adapter(layer, seed):
    """Set lora_embedding_A/B to multiples of 1/64 in [-1/16, 1/16] (the size of a trained update
    next to GPT-2's N(0, 0.02^2) table): with r = 2 and s = 2, s B A is exact."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in (layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]):
            p.copy_(t(rng.integers(-4, 5, tuple(p.shape)) / 64.0))


def with_tables(base, wte, lm_head=None):
    """A copy of ``base`` with input table ``wte``; tied unless ``lm_head`` is given (then untied)."""
    model = copy.deepcopy(base)
    if lm_head is not None:
        model.lm_head.weight = torch.nn.Parameter(t(lm_head))      # unties: its own parameter
    with torch.no_grad():
        model.transformer.wte.weight.copy_(t(wte))
    assert (model.lm_head.weight is model.transformer.wte.weight) == (lm_head is None)
    return model


@pytest.mark.parametrize("targets", [["wte"], ["wte", "c_attn"]])
def test_peft_gpt2_wte_and_the_tied_head(gpt2, targets):
    ids = torch.tensor(np.random.default_rng(5).integers(0, V, (2, 9)))
    torch.manual_seed(5)                                           # c_attn's random factors: the same whatever ran before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                       init_lora_weights=False))
    wte = pm.base_model.model.transformer.wte
    dyadic_adapter(wte, seed=6)
    E, A, B = (f64(p) for p in (wte.base_layer.weight, wte.lora_embedding_A["default"], wte.lora_embedding_B["default"]))
    s = wte.scaling["default"]
    assert s == 2.0
    seen = {}

    def capture(module, args, out):                                # the output and its upstream gradient
        seen["y"] = out
        out.register_hook(lambda g: seen.update(g=g))

    wte.register_forward_hook(capture)
    logits = pm(ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    # The embedding layer: output, and the gradients of A and B given the upstream gradient at wte.
    vjp, y = autograd.make_vjp(lambda A, B: lora_embedding(ids.numpy(), E, A, B, s), argnum=(0, 1))(A, B)
    G = f64(seen["g"])
    M, (_, mA, mB), n_y, n_g = embedding_bounds(ids.numpy(), E, A, B, s, G)
    check(f"gpt2 {'+'.join(targets)} wte output", y, seen["y"], 2 * tolerance("float64", n_y) * M)
    dA, dB = vjp(G)
    check("gpt2 wte dA (through the model's loss)", dA, wte.lora_embedding_A["default"].grad, 2 * tolerance("float64", n_g) * mA)
    check("gpt2 wte dB (through the model's loss)", dB, wte.lora_embedding_B["default"].grad, 2 * tolerance("float64", n_g) * mB)
    # The tied head. s B A is exact, so merged and unmerged lookups are the same numbers bit for bit.
    merged_table = merge_embedding(E, A, B, s)
    unmerged = f64(logits)
    if targets == ["wte"]:
        # PEFT's unmerged forward adapts the input lookup only: exactly lora_ref's untied merge.
        untied = f64(with_tables(gpt2, merged_table, lm_head=E)(ids).logits)
        assert np.array_equal(unmerged, untied)
        assert_page_shows(f"  untied merge (wte = E + s (B A)^T, lm_head = E): max |its logits - PEFT unmerged| = "
                          f"{np.max(np.abs(untied - unmerged)):.1f}", EMBEDDING_PAGE)
    merged_model = pm.merge_and_unload()
    assert np.array_equal(f64(merged_model.transformer.wte.weight), merged_table)
    assert merged_model.lm_head.weight is merged_model.transformer.wte.weight   # the head moved too
    merged = f64(merged_model(ids).logits)
    if targets == ["wte"]:
        assert np.array_equal(merged, f64(with_tables(gpt2, merged_table)(ids).logits))
    diff = np.max(np.abs(merged - unmerged))
    assert_page_shows(f"  tied head, targets {targets}: max |merged - unmerged logits| = {diff:.4f}, max |logits| = "
                      f"{np.max(np.abs(unmerged)):.4f}", EMBEDDING_PAGE)
    assert diff > 0


@pytest.mark.filterwarnings("ignore:Model with `tie_word_embeddings=True`")
def test_peft_ensure_weight_tying_merges_twice(gpt2):
    ids = torch.tensor(np.random.default_rng(5).integers(0, V, (2, 9)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm_wte = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["wte"],
                                                                           ensure_weight_tying=True))
    # GPT-2's "wte" is not among PEFT's EMBEDDING_LAYER_NAMES (embed_tokens, lm_head): nothing is tied.
    assert any("no tied modules are added" in str(w.message) for w in caught)
    assert not hasattr(pm_wte.base_model.model.lm_head, "lora_A")
    # Targeting "lm_head" with ensure_weight_tying=True: PEFT adapts wte (Embedding LoRA) and gives
    # lm_head a Linear LoRA whose factors share storage with the embedding's, transposed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"],
                                                                       ensure_weight_tying=True))
    wte, head = pm.base_model.model.transformer.wte, pm.base_model.model.lm_head
    emb_B, head_A = wte.lora_embedding_B["default"], head.lora_A["default"].weight
    assert emb_B.data_ptr() == head_A.data_ptr()
    # With the default init, lm_head's kaiming-uniform init of its lora_A overwrote the embedding's
    # N(0, 1) lora_embedding_B through the shared storage: every entry within 1/sqrt(n_embd).
    assert float(emb_B.detach().abs().max()) <= 1 / math.sqrt(D)
    dyadic_adapter(wte, seed=7)
    E, A, B = (f64(p) for p in (wte.base_layer.weight, wte.lora_embedding_A["default"], emb_B))
    s = wte.scaling["default"]
    once = merge_embedding(E, A, B, s)
    twice = merge_embedding(once, A, B, s)
    seen = {}
    head.register_forward_hook(lambda mod, args, out: seen.update(h=f64(args[0])))
    unmerged = f64(pm(ids).logits)
    # Unmerged, both ends are adapted: the lookup reads E + s (B A)^T bit for bit (s B A exact), the
    # head computes h E^T + s (h B) A, which is h (E + s (B A)^T)^T up to the linear layer's rounding.
    tied_once = f64(with_tables(gpt2, once)(ids).logits)
    h = seen["h"]
    M = np.abs(h) @ (np.abs(E) + s * (np.abs(B) @ np.abs(A)).T).T
    check("ensure_weight_tying unmerged = tied E + s(BA)^T", unmerged, tied_once, 2 * tolerance("float64", D + 2 + 3) * M,
          page=EMBEDDING_PAGE)
    merged_model = pm.merge_and_unload()
    assert np.array_equal(f64(merged_model.transformer.wte.weight), twice)  # the delta added twice
    merged = f64(merged_model(ids).logits)
    assert np.array_equal(merged, f64(with_tables(gpt2, twice)(ids).logits))
    assert_page_shows(f"  ensure_weight_tying: merged table = E + 2 s (B A)^T; max |merged - unmerged logits| = "
                      f"{np.max(np.abs(merged - unmerged)):.4f}, max |logits| = {np.max(np.abs(unmerged)):.4f}",
                      EMBEDDING_PAGE)
    assert np.any(merged != unmerged)


# ============================================================================================
# loralib: Embedding, Conv2d (ConvLoRA), and Conv1d with a kernel > 1
# ============================================================================================


@pytest.mark.parametrize("dtype", TORCH)
def test_loralib_embedding(dtype):
    torch.manual_seed(0)
    layer = loralib.Embedding(V, D, r=R, lora_alpha=6).to(TORCH[dtype])
    layer.train()                                                     # loralib's train() returns None
    with torch.no_grad():
        layer.lora_A.normal_()                                        # a non-identity adapter (A starts at 0)
    E, A, B, s = f64(layer.weight).astype(dtype), f64(layer.lora_A).astype(dtype), f64(layer.lora_B).astype(dtype), layer.scaling
    ids = np.random.default_rng(8).integers(0, V, (2, 6))
    yt = layer(torch.tensor(ids))
    g = np.random.default_rng(9).uniform(-1, 1, tuple(yt.shape)).astype(dtype)
    yt.backward(t(g))
    vjp, y = autograd.make_vjp(lambda A, B: lora_embedding(ids, E, A, B, s), argnum=(0, 1))(A, B)
    M, (_, mA, mB), n_y, n_g = embedding_bounds(ids, E, A, B, s, g)
    check(f"loralib embedding {dtype} y", y, yt, 2 * tolerance(dtype, n_y) * M)
    for name, ours, theirs, m in zip(("dA", "dB"), vjp(g), (layer.lora_A.grad, layer.lora_B.grad), (mA, mB)):
        check(f"loralib embedding {dtype} {name}", ours, theirs, 2 * tolerance(dtype, n_g) * m)
    layer.eval()                                                      # loralib merges on eval()
    M_merge = np.abs(f64(E)) + s * (np.abs(f64(B)) @ np.abs(f64(A))).T
    check(f"loralib embedding {dtype} merged table", merge_embedding(E, A, B, s), layer.weight, 2 * tolerance(dtype, R + 3) * M_merge)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", TORCH)
def test_loralib_conv2d(dtype, groups):
    torch.manual_seed(0)
    k, r = 3, 2
    layer = loralib.Conv2d(C_IN, C_OUT, k, r=r, lora_alpha=3, stride=2, padding=1, groups=groups).to(TORCH[dtype])
    layer.train()
    with torch.no_grad():
        layer.lora_B.normal_()                                        # a non-identity adapter (B starts at 0)
    assert tuple(layer.lora_A.shape) == (r * k, C_IN * k) and tuple(layer.lora_B.shape) == (C_OUT // groups * k, r * k)
    W, b, A, B = (f64(p).astype(dtype) for p in (layer.conv.weight, layer.conv.bias, layer.lora_A, layer.lora_B))
    s = layer.scaling
    x = np.random.default_rng(10).uniform(-1, 1, (2, C_IN, 7, 8)).astype(dtype)
    yt = layer(t(x))
    g = np.random.default_rng(11).uniform(-1, 1, tuple(yt.shape)).astype(dtype)
    yt.backward(t(g))
    f = lambda A, B, x=x, W=W, b=b: conv_nd(x, W + loralib_conv_delta(A, B, s, k, groups=groups), b, stride=2,  # noqa: E731
                                            padding=1, groups=groups)
    vjp, y = autograd.make_vjp(f, argnum=(0, 1))(A, B)
    ab = lambda a: np.abs(a.astype(np.float64))  # noqa: E731
    mag_vjp, M = autograd.make_vjp(lambda A, B: f(A, B, ab(x), ab(W), ab(b)), argnum=(0, 1))(ab(A), ab(B))
    K, NP = k * k, 2 * math.prod(y.shape[2:])
    # delta: r k products + 2 (s), + 1 (W +), then the conv's (C_in/G) K + 1 (bias).
    check(f"loralib conv2d groups={groups} {dtype} y", y, yt, 2 * tolerance(dtype, r * k + C_IN * K + 4) * M)
    L = NP + C_OUT * K + r * k + C_IN * K + 8
    for name, ours, theirs, m in zip(("dA", "dB"), vjp(g), (layer.lora_A.grad, layer.lora_B.grad), mag_vjp(ab(g))):
        check(f"loralib conv2d {dtype} {name}", ours, theirs, 2 * tolerance(dtype, L) * m)


def test_loralib_conv1d_with_kernel_above_one_fails():
    # ConvLoRA sizes B A as (C_out k, C_in k): C_out C_in k^2 entries, but a 1-D weight has
    # C_out C_in k: the view to the weight's shape fails at the first forward (or merge).
    layer = loralib.Conv1d(4, 6, 3, r=2)
    assert tuple(layer.lora_A.shape) == (6, 12) and tuple(layer.lora_B.shape) == (18, 6)
    with pytest.raises(RuntimeError, match=r"shape '\[6, 4, 3\]' is invalid for input of size 216"):
        layer(torch.zeros(1, 4, 9))
    layer_k1 = loralib.Conv1d(4, 6, 1, r=2)                          # kernel 1: (6, 4) = (6, 4, 1) entries
    assert tuple(layer_k1(torch.zeros(1, 4, 9)).shape) == (1, 6, 9)


@pytest.mark.filterwarnings("ignore:Model with `tie_word_embeddings=True`", "ignore:You have requested `ensure_weight_tying`",
                            "ignore:`is_gradient_checkpointing` is deprecated")
def test_peft_ensure_weight_tying_adapter_does_not_reload_on_gpt2(gpt2, tmp_path):
    # The file holds both layers' factors, but the saved config's target_modules is the rewritten
    # ["transformer.wte"]; on reload "wte" is not an EMBEDDING_LAYER_NAME, so lm_head is left
    # unadapted: the reloaded adapter is not the trained model.
    from safetensors import safe_open

    ids = torch.tensor(np.random.default_rng(5).integers(0, V, (2, 9)))
    pm = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"],
                                                                   ensure_weight_tying=True))
    dyadic_adapter(pm.base_model.model.transformer.wte, seed=7)
    trained = f64(pm(ids).logits)
    pm.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "np") as f:
        keys = sorted(f.keys())
    assert keys == ["base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight",
                    "base_model.model.transformer.wte.lora_embedding_A", "base_model.model.transformer.wte.lora_embedding_B"]
    assert pm.peft_config["default"].target_modules == {"transformer.wte"}
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path)
    assert not hasattr(reloaded.base_model.model.lm_head, "lora_A")
    diff = np.max(np.abs(f64(reloaded(ids).logits) - trained))
    assert_page_shows(f"  ensure_weight_tying on GPT-2, saved and reloaded: lm_head unadapted, max |logits - trained| = "
                      f"{diff:.4f}", EMBEDDING_PAGE)
    assert diff > 0
