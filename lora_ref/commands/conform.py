"""``lora-ref conform IMPL --variant VARIANT [--merge M] [--grad M] ...``: run the kit against your code.

One line in your own CI checks your implementation against lora-ref::

    lora-ref conform mypkg.lora:lora_forward --variant linear --merge mypkg.lora:merge --grad mypkg.lora:grad

``IMPL`` (and each of ``--merge``, ``--grad``, ``--magnitude``, ``--dequantize``) is
``MODULE:NAME`` (a module importable from the current directory or the installed packages;
``NAME`` may be dotted, ``Class.method``) or ``FILE.py:NAME``. It names a function with the
signature the variant's check documents (``lora_ref.testing.check_<variant>``; docs/oracle.md), or
an *adapter object*: a class (instantiated with no arguments) or an instance, used as the
implementation when callable (else its ``forward`` method), whose methods ``merge``, ``grad``,
``magnitude`` and ``dequantize`` fill the options not given on the command line.

The report is printed (one row per property, dtype and output, as ``print(report)`` shows it) and
the last line says whether everything passed. Exit status: 0 when every property passed, 1 when
one failed, 2 for bad input (a module that cannot be imported, a name that is missing or not
callable, a variant that does not take an option, an unknown dtype or property), which is
reported as one line on standard error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from ._common import seed_problem

HELP = ("run lora-ref's conformance kit against your implementation (MODULE:CALLABLE) of one variant; "
        "exit 1 if a property fails")

VARIANTS = {"linear": "lora_linear", "dora": "dora_linear", "embedding": "lora_embedding", "conv": "lora_conv",
            "adapter_set": "adapter_set", "mixed_batch": "mixed_batch", "shrink": "lora_shrink",
            "expand": "lora_expand", "serving": "serving", "combine": "combine_adapters",
            "quantize_4bit": "quantize_4bit"}
"""``--variant`` name -> the key of :data:`lora_ref.testing.CHECKS` (those keys are accepted too)."""

OPTIONS = ("merge", "grad", "magnitude", "dequantize")
"""The optional callables a check may take (each check takes a subset; see its docstring)."""


class _BadInput(Exception):
    """A problem with the command line, reported as one line (exit 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = list(VARIANTS) + [v for v in VARIANTS.values() if v not in VARIANTS]
    parser.add_argument("impl", metavar="IMPL",
                        help="your implementation: MODULE:CALLABLE or FILE.py:CALLABLE (a function, or an adapter "
                             "class/object whose merge/grad/... methods fill the options not given)")
    parser.add_argument("--variant", required=True, choices=names, metavar="VARIANT",
                        help="which check to run: " + ", ".join(VARIANTS))
    for name in OPTIONS:
        parser.add_argument(f"--{name}", metavar="M",
                            help=f"your {name} callable (MODULE:CALLABLE), for the variants whose check takes one")
    parser.add_argument("--dtypes", metavar="D,D",
                        help="comma-separated dtypes to run in (default: the check's own, e.g. float64,float32)")
    parser.add_argument("--properties", metavar="P,P",
                        help="comma-separated property names (default: every property your callables support)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the check's data (default 0)")


def _module(spec: str, what: str) -> Any:
    """Import ``spec`` (a dotted module name, or a path to a .py file)."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise _BadInput(f"{what}: no file {spec!r}")
        name = f"_lora_ref_conform_{path.stem}_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or loader.loader is None:
            raise _BadInput(f"{what}: cannot load {spec!r} as a Python module")
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - whatever the user's file raises, say it in one line
            del sys.modules[name]
            raise _BadInput(f"{what}: importing {spec!r} raised {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (spec == exc.name or spec.startswith(exc.name + ".")):
            raise _BadInput(f"{what}: no module named {spec!r} (run from the folder that holds it, "
                            "or give FILE.py:CALLABLE)") from None
        raise _BadInput(f"{what}: importing {spec!r} raised ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise _BadInput(f"{what}: importing {spec!r} raised {type(exc).__name__}: {exc}") from None


def _resolve(spec: str, what: str) -> Any:
    """The object ``MODULE:NAME`` names; a class is instantiated with no arguments."""
    if ":" not in spec or not spec.rsplit(":", 1)[1] or not spec.rsplit(":", 1)[0]:
        raise _BadInput(f"{what} must be MODULE:CALLABLE or FILE.py:CALLABLE, got {spec!r}")
    module_spec, name = spec.rsplit(":", 1)
    obj = _module(module_spec, what)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise _BadInput(f"{what}: {module_spec!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise _BadInput(f"{what}: {spec} is a class, and {name}() raised {type(exc).__name__}: {exc}") from None
    return obj


def _as_callable(obj: Any, spec: str, what: str) -> Any:
    if callable(obj):
        return obj
    forward = getattr(obj, "forward", None)
    if callable(forward):
        return forward
    raise _BadInput(f"{what}: {spec} is not callable (it is {type(obj).__name__}) and has no forward method")


def _callables(args: argparse.Namespace, takes: tuple[str, ...], variant: str) -> dict[str, Any]:
    """impl and the optional callables, from the flags and the adapter object's methods."""
    for name in OPTIONS:
        if getattr(args, name) is not None and name not in takes:
            listed = ", ".join(f"--{t}" for t in takes) or "none"
            raise _BadInput(f"--{name} does not apply to --variant {variant} (its options: {listed})")
    obj = _resolve(args.impl, "IMPL")
    out = {"impl": _as_callable(obj, args.impl, "IMPL")}
    for name in takes:
        spec = getattr(args, name)
        if spec is not None:
            out[name] = _as_callable(_resolve(spec, f"--{name}"), spec, f"--{name}")
        elif not inspect.isroutine(obj) and callable(getattr(obj, name, None)):
            out[name] = getattr(obj, name)                          # the adapter object's method
    return out


def _names(value: str | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise _BadInput(f"{what} must be a comma-separated list of names, got {value!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from ..testing import CHECKS

    try:
        variant = VARIANTS.get(args.variant, args.variant)
        check = CHECKS[variant]
        takes = tuple(p.name for p in inspect.signature(check).parameters.values()
                      if p.kind is p.KEYWORD_ONLY and p.name in OPTIONS)
        problem = seed_problem(args.seed)
        if problem:
            raise _BadInput(problem)
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.insert(0, str(Path.cwd()))                     # as `python -m` does
        kwargs: dict[str, Any] = _callables(args, takes, args.variant)
        dtypes, properties = _names(args.dtypes, "--dtypes"), _names(args.properties, "--properties")
        if dtypes is not None:
            kwargs["dtypes"] = dtypes
        if properties is not None:
            kwargs["properties"] = properties
        try:
            report = check(**kwargs, seed=args.seed)
        except (ValueError, TypeError) as exc:                      # the check's own argument validation
            raise _BadInput(" ".join(str(exc).split())) from None
    except _BadInput as exc:
        print(f"lora-ref conform: {exc}", file=sys.stderr)
        return 2
    print(report)
    verdict = "conforms" if report.ok else "does NOT conform"
    print(f"lora-ref conform: {args.impl} {verdict} ({args.variant}: {report.summary()})")
    return 0 if report.ok else 1
