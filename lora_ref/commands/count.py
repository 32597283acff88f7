"""``lora-ref count``: LoRA vs full fine-tuning in parameters, checkpoint bytes and Adam state.

``lora-ref count MODEL [--targets q,v] [--rank 4]`` counts a preset: the paper's (roberta-base,
roberta-large, deberta-xxlarge, gpt2-medium, gpt2-large, gpt3-175b), GPT-2 small (gpt2) and
LLaMA-2 7B/13B/70B, LLaMA-3 8B/70B (llama-2-7b, ..., llama-3-70b), and adds a table of the common
settings (q,v and every matrix at r = 8, 16, 64); ``lora-ref count --d-model D --layers L [--ffn F]
[--kv-dim K] ...`` counts any size (LoRA side only: the full model needs an architecture).
``lora-ref count --paper`` recomputes the paper's reported figures and flags those that do not
recompute under the configuration the paper states; ``lora-ref count`` alone lists the presets and
the audit's summary. ``--json`` prints the same results machine-readably. Flags are information:
the audit exits 0.

LoRA's counts, presets, byte accounting and the paper's figures come from
:mod:`lora_ref.counting` (arithmetic on shapes). The full GPT-2 presets are counted by the GPT-2
and LLaMA of :mod:`transformer_ref`, imported inside :func:`_full_params` for those presets only.
Accounting: docs/counting.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "parameters, checkpoint bytes and Adam state of LoRA vs full fine-tuning; --paper audits the paper's counts"

_DEFAULT_TARGETS = "q,v"
_DEFAULT_RANK = 4
_COMMON_RANKS = (8, 16, 64)          # the table of common settings: q,v and every matrix at these ranks
_STATUS_NOTE = {"ok": "", "truncated": "flag", "mismatch": "FLAG", "n/a": ""}
_QUANTITY_LABEL = {"lora": "LoRA params", "full": "full params", "lora_fp16_bytes": "LoRA ckpt fp16",
                   "full_fp16_bytes": "full ckpt fp16"}


_SIZE_FLAGS = ("d_model", "layers", "ffn", "kv_dim")   # the sizes a preset fixes (argparse names)


class _Usage(ValueError):
    """A bad command line: reported on stderr, exit status 2."""


def _flag(name: str) -> str:
    """The command-line spelling of an argparse name: ``kv_dim`` -> ``--kv-dim``."""
    return f"--{name.replace('_', '-')}"


def _given_sizes(args: argparse.Namespace) -> list[str]:
    """The size flags given on the command line, as spelled there."""
    return [_flag(n) for n in _SIZE_FLAGS if getattr(args, n) is not None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..counting import PRESETS

    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help=f"a model preset: {', '.join(PRESETS)} (or give --d-model and --layers)")
    parser.add_argument("--d-model", type=int, metavar="D", help="model width d_model, for a model without a preset")
    parser.add_argument("--layers", type=int, metavar="L", help="number of layers, with --d-model")
    parser.add_argument("--ffn", type=int, metavar="F",
                        help="MLP width, used by the mlp targets (default 4 x d_model; presets know theirs)")
    parser.add_argument("--kv-dim", type=int, metavar="K",
                        help="width of k and v under grouped-query attention, key/value heads x head width "
                             "(default d_model; presets know theirs)")
    parser.add_argument("--targets", metavar="LIST",
                        help="comma-separated matrices to adapt in every layer: q, k, v, o (attention), "
                             "mlp_in, mlp_out (GELU MLP) or gate, up, down (LLaMA's), mlp (the MLP's), all "
                             f"(default {_DEFAULT_TARGETS})")
    parser.add_argument("--rank", type=int, metavar="R", help=f"LoRA rank r (default {_DEFAULT_RANK})")
    parser.add_argument("--paper", action="store_true",
                        help="recompute the LoRA paper's reported counts and flag those that do not recompute")
    parser.add_argument("--qlora", action="store_true",
                        help="QLoRA's memory for a GPT-2 or LLaMA preset (default llama-65b): 4-bit weights, their "
                             "constants with and without double quantisation, adapters, Adam; audits the QLoRA paper's "
                             "figures (targets default to all, rank to 64)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    qlora = args.qlora
    overview = not args.paper and not qlora and all(getattr(args, n) is None for n in (
        "model", *_SIZE_FLAGS, "targets", "rank"))
    try:
        result = _overview() if overview else _qlora(args) if qlora else _paper_audit_of(args) if args.paper \
            else _count(args)
    except _Usage as exc:
        print(f"lora-ref count: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    elif overview:
        _print_overview(result)
    elif qlora:
        _print_qlora(result)
    elif args.paper:
        _print_audit(result)
    else:
        _print_count(result)
    return 0


# ============================================================================================
# Counting
# ============================================================================================


def _full_params(preset: Any) -> tuple[int | None, bool]:
    """``(parameters of the full model, exact?)`` for a preset."""
    from ..counting import deberta_v2_parameters, parse_reported, roberta_parameters

    if preset.family in ("gpt2", "llama"):
        # GPT-2 and LLaMA are models transformer_ref implements: the parameter count is that model's.
        from transformer_ref import GPTConfig, LlamaConfig
        from transformer_ref.count import count_parameters

        config = (GPTConfig if preset.family == "gpt2" else LlamaConfig)(**preset.config)
        return count_parameters(config)["base"], True
    if preset.family == "roberta":
        return roberta_parameters(preset.config), True
    if preset.family == "deberta-v2":
        return deberta_v2_parameters(preset.config), True
    return parse_reported(preset.reported_full).value, False


def _resolve(args: argparse.Namespace) -> tuple[Any, int, int, int, int]:
    """``(preset or None, d_model, layers, ffn, kv_dim)`` from the command line, validated."""
    from ..counting import PRESETS

    for name in _SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _Usage(f"{_flag(name)} must be a positive integer, got {value}")
    if args.model is not None:
        if args.model not in PRESETS:
            raise _Usage(f"unknown model {args.model!r}; the presets are {', '.join(PRESETS)} "
                         "(or give --d-model and --layers instead)")
        given = _given_sizes(args)
        if given:
            raise _Usage(f"give a preset or {'/'.join(given)}, not both: {args.model!r} fixes the sizes")
        preset = PRESETS[args.model]
        return preset, preset.d_model, preset.layers, preset.ffn_width, preset.kv_dim or preset.d_model
    if args.d_model is None or args.layers is None:
        missing = [f for f, v in (("--d-model", args.d_model), ("--layers", args.layers)) if v is None]
        raise _Usage(f"give a model preset ({', '.join(PRESETS)}) or both --d-model and --layers; "
                     f"missing {' and '.join(missing)}")
    return (None, args.d_model, args.layers, args.ffn if args.ffn is not None else 4 * args.d_model,
            args.d_model if args.kv_dim is None else args.kv_dim)


def _matrices(preset: Any, targets: str | None) -> tuple[str, ...]:
    """The weight-matrix types of the model: a preset's; for given sizes, a gated MLP's when
    ``targets`` (the --targets text, or None) names gate, up or down."""
    from ..counting import GATED_MATRICES, PLAIN_MATRICES

    if preset is not None:
        return preset.matrices
    named = {t.strip() for t in (targets or "").split(",")}
    return GATED_MATRICES if named & {"gate", "up", "down"} else PLAIN_MATRICES


def _targets_and_rank(targets_text: str, rank: int, matrices: tuple[str, ...]) -> tuple[tuple[str, ...], int]:
    """``(targets, rank)`` from the --targets text and the rank (defaults already applied), validated."""
    from ..counting import parse_targets

    try:
        targets = parse_targets(targets_text, matrices)
    except ValueError as exc:
        raise _Usage(f"--targets: {exc}") from None
    if rank < 1:
        raise _Usage(f"--rank must be a positive integer, got {rank}")
    return targets, rank


def _check_rank(rank: int, targets: tuple[str, ...], d_model: int, ffn: int, kv_dim: int) -> None:
    """A rank above min(d_in, d_out) of an adapted matrix cannot raise the rank of B A: refuse it."""
    from ..counting import target_shape

    limit = min(min(target_shape(t, d_model, ffn, kv_dim)) for t in targets)
    if rank > limit:
        raise _Usage(f"--rank must be at most {limit}, min(d_out, d_in) of the adapted matrices "
                     f"(B A has rank at most that), got {rank}")


def _sizes(n_params: int) -> dict[str, Any]:
    from ..counting import adam_state_bytes, checkpoint_bytes

    return {"checkpoint_bytes": {"fp16": checkpoint_bytes(n_params, "fp16"),
                                 "fp32": checkpoint_bytes(n_params, "fp32")},
            "adam_state_bytes": adam_state_bytes(n_params)}


def _count(args: argparse.Namespace) -> dict[str, Any]:
    from ..counting import lora_parameters

    preset, d_model, layers, ffn, kv_dim = _resolve(args)
    matrices = _matrices(preset, args.targets)
    targets, rank = _targets_and_rank(_DEFAULT_TARGETS if args.targets is None else args.targets,
                                      _DEFAULT_RANK if args.rank is None else args.rank, matrices)
    _check_rank(rank, targets, d_model, ffn, kv_dim)
    sizes = dict(d_model=d_model, layers=layers, ffn_width=ffn, kv_dim=kv_dim, matrices=matrices)
    by_target = lora_parameters(targets, rank, **sizes)
    lora = sum(by_target.values())
    result: dict[str, Any] = {
        "model": preset.name if preset else None,
        "label": preset.label if preset else None,
        "d_model": d_model, "layers": layers, "ffn_width": ffn, "kv_dim": kv_dim,
        "config_source": preset.source if preset else "given on the command line",
        "targets": list(targets), "rank": rank,
        "lora": {"params": lora, "params_by_target": by_target, **_sizes(lora)},
    }
    if preset is None:
        result["full"] = {"params": None, "exact": False,
                          "counted": "n/a: the full model needs an architecture; use a preset"}
        result["full_over_lora"] = result["lora_fraction"] = None
        return result
    full, exact = _full_params(preset)
    result["full"] = {"params": full, "exact": exact, "counted": preset.counted,
                      "reported": None if exact else preset.reported_full, **_sizes(full)}
    result["full_over_lora"] = full / lora
    result["lora_fraction"] = lora / full
    common = [(t, r, sum(lora_parameters(t, r, **sizes).values())) for t in (("q", "v"), matrices)
              for r in _COMMON_RANKS]
    result["common"] = [{"targets": list(t), "rank": r, **_sizes(n), "params": n} for t, r, n in common]
    return result


def _print_count(res: dict[str, Any]) -> None:
    from ..counting import format_size

    name = f"{res['model']} ({res['label']})" if res["model"] else "model"
    kv = f", k/v width {res['kv_dim']}" if res["kv_dim"] != res["d_model"] else ""
    print(f"{name}: d_model {res['d_model']}, {res['layers']} layers, MLP width {res['ffn_width']}{kv} "
          f"[{res['config_source']}]")
    lora = res["lora"]
    parts = " + ".join(f"{t} {n:,}" for t, n in lora["params_by_target"].items())
    print(f"LoRA rank {res['rank']} on {','.join(res['targets'])} in every layer: {parts} "
          f"= {lora['params']:,} parameters (A and B)")
    full = res["full"]

    def size(n: int, exact: bool) -> str:
        text = f"{format_size(n)} ({format_size(n, binary=True)})"
        return f"{n:,} B = {text}" if exact else f"~{text}"

    rows = [("parameters", f"{lora['params']:,}",
             "n/a" if full["params"] is None else
             f"{full['params']:,}" if full["exact"] else f"~{full['params']:,} (reported as {full['reported']})")]
    for label, get in (("checkpoint, fp16", lambda d: d["checkpoint_bytes"]["fp16"]),
                       ("checkpoint, fp32", lambda d: d["checkpoint_bytes"]["fp32"]),
                       ("Adam state, 2 x fp32", lambda d: d["adam_state_bytes"])):
        rows.append((label, size(get(lora), True), "n/a" if full["params"] is None else size(get(full), full["exact"])))
    print()
    print(f"{'':<22}{'LoRA (A and B only)':<38}full model")
    for label, a, b in rows:
        print(f"{label:<22}{a:<38}{b}")
    print()
    if full["params"] is not None:
        print(f"full / LoRA = {res['full_over_lora']:,.1f}x: LoRA trains {100 * res['lora_fraction']:.4g}% "
              "of the model's parameter count.")
    print(f"full model: {full['counted']}.")
    if "common" in res:
        _print_common(res)


def _print_common(res: dict[str, Any]) -> None:
    """The table of common settings: q,v and every matrix type at r = 8, 16, 64."""
    from ..counting import format_size

    print()
    print(f"{'common settings':<31}{'LoRA params':>14}{'share':>9}{'adapter fp16':>14}{'adapter fp32':>14}"
          f"{'Adam state':>12}")
    for row in res["common"]:
        what = f"r={row['rank']} on {','.join(row['targets'])}"
        share = f"{100 * row['params'] / res['full']['params']:.3g}%"
        print(f"{what:<31}{row['params']:>14,}{share:>9}{format_size(row['checkpoint_bytes']['fp16']):>14}"
              f"{format_size(row['checkpoint_bytes']['fp32']):>14}{format_size(row['adam_state_bytes']):>12}")


# ============================================================================================
# The paper's figures
# ============================================================================================


def _config_text(targets: tuple[str, ...], rank: int) -> str:
    return f"r={rank} on {','.join(targets)}"


def _paper_audit_of(args: argparse.Namespace) -> dict[str, Any]:
    """``--paper``: refuses any model, size, target or rank (the audit's configurations are the paper's)."""
    extra = (["MODEL"] if args.model is not None else []) + _given_sizes(args) + [
        flag for flag, value in (("--targets", args.targets), ("--rank", args.rank)) if value is not None]
    if extra:
        raise _Usage(f"--paper audits fixed configurations and takes no {', '.join(extra)}")
    return _paper_audit()


def _paper_audit() -> dict[str, Any]:
    from ..counting import PAPER_CLAIMS

    claims = [_claim_row(c) for c in PAPER_CLAIMS]
    return {
        "paper": "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685v2",
        "formula": "|Theta| = 2 x L x d_model x r per adapted d_model x d_model matrix type (Section 5.1)",
        "claims": claims, "flagged": sum(r["flagged"] for r in claims), "headline": _headline(),
    }


def _lora_count(model: str, targets: tuple[str, ...], rank: int) -> int:
    """LoRA's parameters for rank ``rank`` on ``targets`` of preset ``model``, all layers."""
    from ..counting import PRESETS, lora_parameters

    p = PRESETS[model]
    return sum(lora_parameters(targets, rank, d_model=p.d_model, layers=p.layers, ffn_width=p.ffn_width).values())


def _claim_row(c: Any) -> dict[str, Any]:
    """One figure of the paper recomputed, classified, and explained in one line."""
    from ..counting import PRESETS, classify, round_reported

    preset, rep = PRESETS[c.model], c.reported_parsed
    is_bytes = c.quantity.endswith("_bytes")
    if c.quantity.startswith("lora"):
        recomputed, exact = _lora_count(c.model, c.targets, c.rank) * (2 if is_bytes else 1), True
    else:
        recomputed, exact = _full_params(preset)
        if is_bytes and recomputed is not None:
            recomputed *= 2
        if not exact and not is_bytes:
            recomputed = None       # a reported figure cannot check itself
    status = classify(rep, recomputed)
    row: dict[str, Any] = {
        "source": c.source, "model": c.model, "label": preset.label, "quantity": c.quantity,
        "stated": {"targets": list(c.targets), "rank": c.rank, "in": c.stated_in} if c.rank else None,
        "reported": c.reported, "reported_value": rep.value,
        "recomputed": recomputed, "recomputed_exact": exact if recomputed is not None else None,
        "recomputed_as_reported": None if recomputed is None else round_reported(recomputed, rep),
        "status": status, "flagged": status in ("truncated", "mismatch"), "alternative": None,
    }
    unit = " bytes" if is_bytes else ""
    say = f"{_config_text(c.targets, c.rank)} ({c.stated_in}) gives " if c.rank else (
        f"{preset.reported_full} (reported) x 2 bytes = " if is_bytes and not exact else "the model has ")
    if status == "ok":
        why = f"{say}{recomputed:,}{unit}, which rounds to {c.reported}"
    elif status == "truncated":
        why = f"{say}{recomputed:,}{unit}, which rounds to {row['recomputed_as_reported']}; {c.reported} truncates it"
    elif status == "mismatch":
        why = f"{say}{recomputed:,}{unit} = {row['recomputed_as_reported']}"
        if is_bytes:
            why += f" = {round_reported(recomputed, rep, binary=True)}"
        why += f", not {c.reported}"
        if c.alternative is not None:
            alt_targets, alt_rank = c.alternative
            alt = _lora_count(c.model, alt_targets, alt_rank)
            row["alternative"] = {"targets": list(alt_targets), "rank": alt_rank, "recomputed": alt,
                                  "status": classify(rep, alt)}
            why += f"; {_config_text(alt_targets, alt_rank)} gives {alt:,} = {round_reported(alt, rep)}"
        elif c.quantity == "lora":
            why += f"; no integer rank gives it (r = {rep.value * c.rank / recomputed:.2f} would)"
    else:
        why = ""
    row["explanation"] = "; ".join(s for s in (why, c.remark) if s)
    return row


def _overview() -> dict[str, Any]:
    """``lora-ref count`` alone: the presets and the paper audit's summary."""
    from ..counting import PRESETS

    presets = []
    for p in PRESETS.values():
        full, exact = _full_params(p)
        presets.append({"model": p.name, "label": p.label, "d_model": p.d_model, "layers": p.layers,
                        "ffn_width": p.ffn_width, "kv_dim": p.kv_dim or p.d_model, "params": full, "exact": exact})
    audit = _paper_audit()
    n_mis = sum(r["status"] == "mismatch" for r in audit["claims"])
    return {"presets": presets, "paper": {"figures": len(audit["claims"]), "flagged": audit["flagged"],
                                          "mismatch": n_mis, "truncated": audit["flagged"] - n_mis,
                                          "headline": audit["headline"]}}


def _print_overview(res: dict[str, Any]) -> None:
    print("lora-ref count MODEL: LoRA versus full fine-tuning in parameters, checkpoint bytes and Adam state. "
          "The presets:")
    for p in res["presets"]:
        kv = f", k/v {p['kv_dim']}" if p["kv_dim"] != p["d_model"] else ""
        full = f"{p['params']:,} parameters" + ("" if p["exact"] else " (as reported)")
        print(f"  {p['model']:<17}{p['label']:<15}d_model {p['d_model']:>5}, {p['layers']:>2} layers{kv:<10}  {full}")
    print("Or any size: lora-ref count --d-model D --layers L [--ffn F] [--kv-dim K] [--targets q,v] [--rank 4].")
    a = res["paper"]
    h = a["headline"]
    print(f"\nThe paper's counts (lora-ref count --paper): of {a['figures']} figures, {a['flagged']} do not "
          f"recompute as printed ({a['mismatch']} mismatch, {a['truncated']} truncated). Headline: GPT-3 175B at r=4 on "
          f"q,v trains {h['lora_params']:,} parameters, {h['lora_fp16']} in fp16, {h['ratio']:,.0f}x fewer than the model.")


def _headline() -> dict[str, Any]:
    """Section 4.2's "350GB -> 35MB, roughly 10,000x" for GPT-3 175B at r=4 on q, v, recomputed."""
    from ..counting import PRESETS, format_size

    gpt3 = PRESETS["gpt3-175b"]
    lora = _lora_count("gpt3-175b", ("q", "v"), 4)
    full, _ = _full_params(gpt3)
    return {
        "source": "Section 4.2", "paper": "checkpoint 350GB -> 35MB, reduced roughly 10,000x (r=4 on q,v)",
        "formula": f"2 x {gpt3.layers} layers x {gpt3.d_model} x r=4 x 2 matrices",
        "lora_params": lora, "lora_fp16_bytes": 2 * lora,
        "lora_fp16": format_size(2 * lora), "lora_fp16_binary": format_size(2 * lora, binary=True),
        "full_params_reported": gpt3.reported_full, "full_fp16_bytes": 2 * full,
        "full_fp16": format_size(2 * full), "ratio": full / lora,
    }


def _print_audit(res: dict[str, Any]) -> None:
    print(f"The LoRA paper's counts, recomputed ({res['paper'].split(',')[0]}, arXiv 2106.09685v2)")
    print(res["formula"])
    print()
    print(f"{'source':<13}{'model':<14}{'quantity':<16}{'stated config':<30}{'reported':>11}  "
          f"{'recomputed':<17}status")
    for r in res["claims"]:
        cfg = "" if r["stated"] is None else f"{_config_text(r['stated']['targets'], r['stated']['rank'])} ({r['stated']['in']})"
        if r["recomputed"] is None:
            rec = "n/a"
        else:
            rec = ("" if r["recomputed_exact"] else "~") + f"{r['recomputed']:,}"
        flag = _STATUS_NOTE[r["status"]]
        print(f"{r['source']:<13}{r['label']:<14}{_QUANTITY_LABEL[r['quantity']]:<16}{cfg:<30}{r['reported']:>11}  "
              f"{rec:<17}{r['status']}{'  <- ' + flag if flag else ''}")
    print()
    n_mis = sum(r["status"] == "mismatch" for r in res["claims"])
    print(f"{res['flagged']} figures do not recompute as printed ({n_mis} mismatch, {res['flagged'] - n_mis} "
          "truncated); information, not an error:")
    for r in res["claims"]:
        if r["flagged"]:
            print(f"  {r['source']}, {r['label']}, {r['reported']}: {r['explanation']}.")
    print("Not checkable:")
    for r in res["claims"]:
        if r["status"] == "n/a":
            print(f"  {r['source']}, {r['label']}, {r['reported']}: {r['explanation']}.")
    h = res["headline"]
    print()
    print(f"Headline ({h['source']}): GPT-3 175B, {h['paper']}")
    print(f"  LoRA: {h['formula']} = {h['lora_params']:,} parameters; fp16 {h['lora_fp16_bytes']:,} bytes "
          f"= {h['lora_fp16']} = {h['lora_fp16_binary']}")
    print(f"  full: {h['full_params_reported']} parameters (Table 4); fp16 {h['full_fp16_bytes']:,} bytes = {h['full_fp16']}")
    print(f"  ratio {h['ratio']:,.0f}x: the paper's 35MB is neither {h['lora_fp16']} nor {h['lora_fp16_binary']}, "
          f"and 'roughly 10,000x' rounds {h['ratio']:,.0f}x up.")
    print("Legend: ok = rounds to the reported figure; truncated = only dropping digits gives it; "
          "mismatch = neither; n/a = nothing exact to compare with.")


# ============================================================================================
# QLoRA (Dettmers et al. 2023): what a 4-bit base and its adapters occupy
# ============================================================================================

_GB = 10**9


def _qlora(args: argparse.Namespace) -> dict[str, Any]:
    """Bytes of a preset fine-tuned with QLoRA, part by part, and the QLoRA paper's figures."""
    from ..counting import (GATED_MATRICES, PRESETS, QLORA_BLOCKSIZE, QLORA_CLAIMS, adam_state_bytes,
                            constants_bits, lora_parameters, quant_bytes, target_shape)

    if args.paper:
        raise _Usage("--qlora and --paper are two audits: give one")
    given = _given_sizes(args)
    if given:
        raise _Usage(f"--qlora counts a preset (default llama-65b), not {'/'.join(given)}")
    name = "llama-65b" if args.model is None else args.model
    if name not in PRESETS or PRESETS[name].family not in ("gpt2", "llama"):
        ok = [n for n, p in PRESETS.items() if p.family in ("gpt2", "llama")]
        raise _Usage(f"--qlora counts the GPT-2 and LLaMA presets ({', '.join(ok)}), whose projections transformers "
                     f"quantises to 4 bits; got {name!r}")
    p = PRESETS[name]
    d, L, F, kv = p.d_model, p.layers, p.ffn_width, p.kv_dim or p.d_model
    targets, rank = _targets_and_rank(args.targets or "all", 64 if args.rank is None else args.rank, p.matrices)
    _check_rank(rank, targets, d, F, kv)
    full, _ = _full_params(p)
    shapes = L * ([(3 * d, d), (d, d), (F, d), (d, F)] if p.family == "gpt2" else   # GPT-2's c_attn is one weight
                  [target_shape(t, d, F, kv) for t in GATED_MATRICES])
    quantised = sum(a * b for a, b in shapes)
    stored = {dq: sum(sum(quant_bytes(s, QLORA_BLOCKSIZE, dq).values()) for s in shapes) for dq in (True, False)}
    codes = sum(quant_bytes(s)["weight"] for s in shapes)
    lora = sum(lora_parameters(targets, rank, d_model=d, layers=L, ffn_width=F, kv_dim=kv, matrices=p.matrices).values())
    parts = {"codes": codes, "constants_double_quant": stored[True] - codes, "constants_float32": stored[False] - codes,
             "rest_bf16": 2 * (full - quantised), "adapters_bf16": 2 * lora, "adapter_gradients_bf16": 2 * lora,
             "adam_state": adam_state_bytes(lora)}
    common = parts["codes"] + parts["rest_bf16"] + 4 * lora + parts["adam_state"]
    total = {"double_quant": common + parts["constants_double_quant"], "float32_constants": common +
             parts["constants_float32"]}
    full16 = 4 * full + adam_state_bytes(full)       # bf16 weights and gradients, Adam's m and v in fp32
    bits = {dq: 8 * (stored[dq] - codes) / quantised for dq in (True, False)}
    formula = {dq: constants_bits(QLORA_BLOCKSIZE, dq) for dq in (True, False)}
    claims = [
        {"source": QLORA_CLAIMS["constants"][0], "claim": QLORA_CLAIMS["constants"][1],
         "recomputed": f"32/64 = {float(formula[False])}, 8/64 + 32/(64 * 256) = {float(formula[True])}; stored by "
                       f"bitsandbytes for {name} (level tables and offsets included): {bits[False]:.5f} and "
                       f"{bits[True]:.5f} bits per quantised parameter",
         "status": "ok" if (round(float(formula[False]), 3), round(float(formula[True]), 3)) == (0.5, 0.127) else "mismatch"},
        {"source": QLORA_CLAIMS["full"][0], "claim": QLORA_CLAIMS["full"][1],
         "recomputed": f"{full:,} parameters x 12 bytes (bf16 weights and gradients, fp32 m and v) = "
                       f"{full16 / _GB:.1f} GB", "status": "ok" if full16 > 780 * _GB else "mismatch"},
        {"source": QLORA_CLAIMS["qlora"][0], "claim": QLORA_CLAIMS["qlora"][1],
         "recomputed": f"{total['double_quant'] / _GB:.2f} GB before activations: {(48 * _GB - total['double_quant']) / _GB:.2f}"
                       f" GB left of 48 GB, {(48 * 2**30 - total['double_quant']) / _GB:.2f} GB of 48 GiB; without double "
                       f"quantisation {total['float32_constants'] / _GB:.2f} GB, "
                       f"{(48 * _GB - total['float32_constants']) / _GB:.2f} GB left of 48 GB",
         "status": "ok" if total["double_quant"] < 48 * _GB else "mismatch"},
    ][: 3 if name == "llama-65b" else 1]             # the 65B figures are the paper's LLaMA 65B's
    return {"model": name, "label": p.label, "config_source": p.source, "params": full, "quantised_params": quantised,
            "quantised_weights": len(shapes), "blocksize": QLORA_BLOCKSIZE, "targets": list(targets), "rank": rank,
            "lora_params": lora, "bytes": parts, "total_bytes": total, "full_16bit_bytes": full16,
            "peft_float32_extra_bytes": 4 * lora,
            "constants_bits": {"formula_double_quant": float(formula[True]), "formula_float32": float(formula[False]),
                               "stored_double_quant": bits[True], "stored_float32": bits[False]},
            "claims": claims}


def _print_qlora(res: dict[str, Any]) -> None:
    from ..counting import format_size

    print(f"QLoRA memory, {res['model']} ({res['label']}) [{res['config_source']}]")
    print(f"{res['params']:,} parameters; the {res['quantised_weights']} projection weights ({res['quantised_params']:,} "
          f"parameters) in NF4, blocks of {res['blocksize']}; LoRA r={res['rank']} on {','.join(res['targets'])} "
          f"({res['lora_params']:,} parameters)")
    print()
    b, q = res["bytes"], res["quantised_params"]
    rows = [("4-bit codes", b["codes"], 8 * b["codes"] / q),
            ("constants, float32 per block", b["constants_float32"], res["constants_bits"]["stored_float32"]),
            ("constants, double quantised", b["constants_double_quant"], res["constants_bits"]["stored_double_quant"]),
            ("the rest in bf16 (embeddings, head, norms)", b["rest_bf16"], None),
            ("LoRA adapters, bf16", b["adapters_bf16"], None),
            ("adapter gradients, bf16", b["adapter_gradients_bf16"], None),
            ("Adam state, 2 x fp32", b["adam_state"], None)]
    print(f"{'':<42}{'bytes':>16}{'':>4}{'':<22}bits / quantised parameter")
    for label, n, bits in rows:
        size = f"{format_size(n)} ({format_size(n, binary=True)})"
        print(f"{label:<42}{n:>16,}    {size:<22}{'' if bits is None else f'{bits:.5f}'}".rstrip())
    for label, key in (("total, double quantisation", "double_quant"), ("total, float32 constants", "float32_constants")):
        n = res["total_bytes"][key]
        print(f"{label:<42}{n:>16,}    {format_size(n)} ({format_size(n, binary=True)})")
    print(f"Activations are not counted (they depend on the batch, the sequence and checkpointing). PEFT's default "
          f"float32 adapters and gradients add {format_size(res['peft_float32_extra_bytes'])}.")
    print(f"Full fine-tuning in 16 bits (bf16 weights and gradients, fp32 Adam): {res['full_16bit_bytes']:,} bytes = "
          f"{format_size(res['full_16bit_bytes'])}.")
    print()
    print("The QLoRA paper's memory figures (arXiv 2305.14314), recomputed"
          + (":" if len(res["claims"]) > 1 else " (its 65B figures: lora-ref count --qlora llama-65b):"))
    for c in res["claims"]:
        print(f"  {c['source']}: {c['claim']}.")
        print(f"    {c['recomputed']}: {c['status']}")
