"""Two ways to take a layer primitive's gradient, shared by the layer and attention tests."""

from __future__ import annotations

import autograd
import autograd.numpy


def both_grads(layer, args, argnum, g):
    """d/d args[argnum] of sum(layer(*args) * g): (hand-written VJP, autograd.numpy on .fun)."""
    def through(fn):
        def f(a):
            full = list(args)
            full[argnum] = a
            return autograd.numpy.sum(fn(*full) * g)
        return autograd.grad(f)(args[argnum])
    return through(layer), through(lambda *a: layer.fun(*a, cache=None))


def grads(layer, args, argnums, g):
    """The hand VJPs of ``layer`` at upstream gradient g, for each argnum (any backend)."""
    vjp, _ = autograd.make_vjp(lambda *a: layer(*a), argnum=tuple(argnums))(*args)
    return vjp(g)
