"""Forward hooks registered as one set and removed as one, however the work ends.

Capture, the layer-by-layer replay and interventions all hook a model for the length of a
block: a hook left behind would keep summing statistics or editing the residual stream of
every later forward. :class:`Hooks` collects the handles as the hooks are registered and
removes every one on leaving its ``with`` block, by an exception too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """A set of forward hooks on modules, removed together by :meth:`remove` or on leaving
    ``with Hooks() as hooks:`` (however the block ends)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(module, args, output)`` to run after ``module``'s forward."""
        handle = module.register_forward_hook(hook)
        self._handles.append(handle)
        return handle

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any], *,
                    with_kwargs: bool = False) -> RemovableHandle:
        """Register ``hook(module, args)`` (``hook(module, args, kwargs)`` with
        ``with_kwargs``) to run before ``module``'s forward."""
        handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook registered so far (the set may be filled again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
