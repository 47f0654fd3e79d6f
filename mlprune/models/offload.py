"""Offloaded weights: find accelerate's offload hooks, hold a module's weights on its device
while they are read or written (:func:`onloaded`), and say where a device-mapped model's inputs
go and where its modules are.

A model loaded with a ``device_map`` keeps offloaded weights as meta tensors that accelerate's
hooks fill for each forward; whatever reads weights directly does it inside :func:`onloaded`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def offload_hook(module: nn.Module, paused: bool = False) -> Any | None:
    """accelerate's hook that keeps this module's own weights offloaded (on meta, filled from
    its ``weights_map`` for each forward), or None when its weights are real tensors.
    ``paused=True`` also finds the hook of a module held by :func:`onloaded`."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook chains several
        if type(h).__name__ == "AlignDevicesHook" and (
                getattr(h, "offload", False) or paused and getattr(h, _PAUSED, False)):
            return h
    return None


_PAUSED = "mlprune_onloaded"  # marks an offload hook that onloaded() holds paused


def is_offloaded(model: nn.Module) -> bool:
    """Whether any of the model's weights are offloaded (to the CPU or disk) by accelerate."""
    return any(offload_hook(m) is not None for m in model.modules())


@contextlib.contextmanager
def onloaded(module: nn.Module, recurse: bool = True) -> Iterator[nn.Module]:
    """Inside, every offloaded weight of ``module`` (and of its submodules unless ``recurse``
    is False) is a real tensor on its execution device, and stays put through forwards; on
    leaving, the weights go back to meta and any change made to them inside is dropped (the
    offloaded copy is never written).

    accelerate's own ``align_module_device`` fills the weights too, but leaves the hook on, so
    the next forward would load the offloaded copy again over anything written meanwhile (the
    masks of a sequential pass): here the hook is paused while the weights are held, as
    llm-compressor's sequential pipeline does. A module with nothing offloaded is left as is.
    """
    held = []
    try:
        for sub in module.modules() if recurse else [module]:
            hook = offload_hook(sub)
            if hook is not None:
                hook.pre_forward(sub)  # fills the weights from the offloaded copy
                hook.offload = False  # forwards now use them as they are
                setattr(hook, _PAUSED, True)
                held.append((sub, hook))
        yield module
    finally:
        for sub, hook in reversed(held):
            hook.offload = True
            delattr(hook, _PAUSED)
            hook.post_forward(sub, None)  # back to meta: the filled copy is freed


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its first parameter's device, or for a model placed by a
    device map, the execution device of its input embeddings (offloaded weights are meta)."""
    first = next(model.parameters()).device
    if getattr(model, "hf_device_map", None) is None and first.type != "meta":
        return first
    embeddings = model.get_input_embeddings()
    for hook in (offload_hook(embeddings), getattr(embeddings, "_hf_hook", None)):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    weight = embeddings.weight
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def placement(model: nn.Module) -> str | None:
    """Where a device-mapped model's modules are, e.g. "cuda:0 + cpu + disk" (None when the
    model was not placed by a device map)."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or len(set(device_map.values())) < 2 and not is_offloaded(model):
        return None
    seen = []
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        if name not in seen:
            seen.append(name)
    return " + ".join(seen)

