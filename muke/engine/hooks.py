"""Forward hooks: add memory shifts δ to a decoder layer's output, capture module inputs/outputs.

A decoder layer returns a tensor in transformers ≥ 5 and a tuple `(hidden, ...)` before; every hook
here accepts both and returns the same kind it received.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output, tensor or tuple."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """`output` with its hidden state replaced, keeping its kind (tensor or tuple)."""
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def shift(hidden: torch.Tensor, positions: Sequence[int], deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """hidden[:, p] + δ for each (p, δ); δ is (d,) for every batch row or (batch, d) per row."""
    out = hidden.clone()
    for p, d in zip(positions, deltas):
        out[:, p] = out[:, p] + d.to(hidden.dtype)
    return out


@contextmanager
def forward_hook(module: nn.Module, hook: Callable, pre: bool = False, **options) -> Iterator[None]:
    """`hook` registered on `module` (a forward hook, or with pre=True a forward pre-hook) inside the block."""
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(hook, **options)
    try:
        yield
    finally:
        handle.remove()


def shifts(layer: nn.Module, positions: Sequence[int], deltas: Sequence[torch.Tensor]):
    """Add δ_k at token position p_k of `layer`'s output for every forward pass inside the block."""
    return forward_hook(
        layer, lambda _module, _inputs, output: with_hidden(output, shift(hidden_of(output), positions, deltas))
    )


@contextmanager
def capture(
    module: nn.Module, what: str = "output", sink: Callable[[torch.Tensor], None] | None = None, detach: bool = True
) -> Iterator[list[torch.Tensor]]:
    """Record the module's first input ("input") or its (hidden) output ("output") on each call.

    With `sink`, each captured tensor is passed to it instead of being kept (for streaming statistics);
    detach=False keeps the captured tensor in the autograd graph.
    """
    if what not in ("input", "output"):
        raise ValueError(f"capture what={what!r}: expected 'input' or 'output'")
    seen: list[torch.Tensor] = []
    keep = sink or seen.append

    def hook(_module, inputs, output):
        x = inputs[0] if what == "input" else hidden_of(output)
        keep(x.detach() if detach else x)

    with forward_hook(module, hook):
        yield seen


class _StopForward(Exception):
    pass


@contextmanager
def stop_after(module: nn.Module, outputs: list | None = None) -> Iterator[None]:
    """End the forward pass inside the block right after `module` runs, appending its raw output
    (tensor or tuple) to `outputs`; the layers above it never run."""

    def hook(_module, _inputs, output):
        if outputs is not None:
            outputs.append(output)
        raise _StopForward

    with forward_hook(module, hook):
        try:
            yield
        except _StopForward:
            pass


@contextmanager
def replay_lower_layers(
    layers: nn.ModuleList, top: int, hidden: torch.Tensor, as_tuple: bool = False
) -> Iterator[None]:
    """Skip decoder layers 0..top: layer `top` returns the recorded `hidden` (its output, which no
    memory shift changes), the layers below it pass their input through untouched.

    The upper layers then see exactly the states of a full forward pass, at a fraction of the cost;
    masks and position embeddings are still built by the model itself, so this works for any
    architecture the adapter knows. `as_tuple`: the real layers return tuples (older transformers).
    """
    originals = []

    def wrap(h):
        return (h,) if as_tuple else h

    def passthrough(hidden_states, *args, **kwargs):
        return wrap(hidden_states)

    def replay(hidden_states, *args, **kwargs):
        return wrap(hidden.expand(hidden_states.shape[0], -1, -1))

    try:
        for k in range(top + 1):
            layer = layers[k]
            originals.append(layer)
            layer.forward = replay if k == top else passthrough
        yield
    finally:
        for layer in originals:
            del layer.forward


def restores(module: nn.Module, clean: torch.Tensor, mask: torch.Tensor):
    """Replace `module`'s (hidden) output by `clean` where `mask` is True, for every forward pass inside
    the block (causal tracing's restoration). clean: (T, d) or (batch, T, d); mask: (batch, T) bool."""

    def hook(_module, _inputs, output):
        hidden = hidden_of(output)
        m = mask.to(hidden.device)[..., None]
        return with_hidden(output, torch.where(m, clean.to(hidden.device, hidden.dtype), hidden))

    return forward_hook(module, hook)
