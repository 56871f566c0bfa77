"""Ctrl-C that acts within seconds, even in the middle of a long backward pass.

Python runs a signal handler (``KeyboardInterrupt`` for Ctrl-C) only when the main thread executes Python
code. ``loss.backward()`` is one call into the autograd engine, which runs every backward node in C++ on
the calling thread (CPU tensors), so a step of a large network at a large batch (82–221 s measured for a
64-px ResNet-18 on a laptop CPU) ignored Ctrl-C until it was over. A tensor hook is Python code the
engine calls during backward: a no-op hook on the output of every block gives the interpreter a chance to
run the handler between blocks, and the ``KeyboardInterrupt`` raised there leaves ``backward()`` at once.
The forward pass is Python between modules already. Cost: one Python call per hooked module and step
(tens per step; ~1 µs each), and nothing changes in what is computed.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["interruptible_backward"]

#: Modules this deep below the model get a hook (method → backbone → stage → block): every ResNet
#: block, every transformer block, every head layer.
HOOK_DEPTH = 4


def _noop(grad: Tensor) -> None:
    return None


def _hook_output(module: nn.Module, inputs: object, output: object) -> None:
    if isinstance(output, Tensor) and output.requires_grad:
        output.register_hook(_noop)


def interruptible_backward(model: nn.Module, depth: int = HOOK_DEPTH) -> list[RemovableHandle]:
    """Make Ctrl-C act between the blocks of ``model``'s backward pass; returns the hooks' handles."""
    handles = []
    stack: list[tuple[nn.Module, int]] = [(model, 0)]
    while stack:
        module, level = stack.pop()
        if level > 0:
            handles.append(module.register_forward_hook(_hook_output))
        if level < depth:
            stack.extend((child, level + 1) for child in module.children())
    return handles
