"""One helper every layer file shares: a forward with a cache, made an autograd primitive.

llm.c's shape, ``forward(*args, cache) -> out`` with the backward reading what the forward kept,
on autograd's engine: :func:`cached_primitive` wraps such a forward so that each call gets a fresh
cache dict that its VJPs (``defvjp`` on ``.primitive``) receive too. Used by layers.py,
attention.py and the fast op set; it knows nothing about any layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from autograd.extend import primitive

__all__ = ["cached_primitive"]


def cached_primitive(forward: Callable[..., Any], check: Callable[..., tuple] | None = None) -> Callable[..., Any]:
    """Make ``forward(*args, cache=None)`` an autograd primitive called with a fresh cache dict.

    The returned function has ``.fun`` (the bare forward, traceable by autograd.numpy) and
    ``.primitive`` (the autograd primitive, on which the VJPs are defined with ``defvjp``). The
    VJP makers receive the same ``cache`` dict the forward filled, so nothing is computed twice;
    a new dict per call, so nothing is shared between calls or threads. With ``check``, each call
    first runs ``check(*args)``, which validates the arguments and returns them (scalars as
    Python types); ``.fun`` stays unchecked.
    """
    p = primitive(forward)

    if check is None:
        @functools.wraps(forward)
        def layer(*args: Any) -> Any:
            return p(*args, cache={})
    else:
        @functools.wraps(forward)
        def layer(*args: Any) -> Any:
            return p(*check(*args), cache={})

    layer.fun = forward
    layer.primitive = p
    return layer
