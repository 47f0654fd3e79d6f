"""Memory: what a model needs and what this machine has, before anything is loaded.

:func:`memory_plan` says from a model's config alone whether it fits, streams one decoder layer
at a time, or cannot run here (:class:`MemoryPlan`); :func:`check_fits` refuses weights larger
than the memory available; :func:`free_memory`, :func:`parse_max_memory` and
:func:`parse_device_map` read what each device has and what the user caps.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlprune import MlpruneError
from mlprune.models.precision import parse_dtype
from mlprune.models.sites import decoder_layers, hidden_size

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


STREAM_ADVICE = ("load it with --device-map auto and an --offload-folder to stream it one "
                 "layer at a time, or pick a smaller model")


def check_fits(weight_bytes: int, what: str, headroom: float = 1.2,
               advice: str = "pick a smaller model or a machine with more memory") -> None:
    """Refuse, before loading, a model whose weights cannot fit in the memory available."""
    need, have = int(weight_bytes * headroom), available_memory()
    if need > have:
        raise MlpruneError(
            f"{what} needs about {need / 2**30:.1f} GiB to load but only {have / 2**30:.1f} GiB "
            f"of memory is available; {advice}."
        )

FITS, STREAMS, CANNOT_FIT = "fits", "streams", "cannot fit"


@dataclass(frozen=True)
class MemoryPlan:
    """How a model would run here, from its config and the memory free (bytes throughout).

    ``fits``: every weight stays on the devices that run it (the GPUs, or the CPU without
    one). ``streams``: weights wait on the CPU and/or disk and one decoder layer at a time comes
    to ``device``, with the cached inputs of sequential calibration (what llm-compressor's
    sequential pipeline does). ``cannot fit``: not even that; :meth:`check` says why.

    ``free`` is what each device has; ``caps`` (accelerate's ``max_memory``) bound only
    where weights may wait, as in accelerate: cached inputs and activations use what is free.
    """

    name: str
    parameters: int
    dtype: str
    n_layers: int
    layer_bytes: int  # the largest decoder layer
    outside_bytes: int  # embeddings, LM head, final norm: everything outside the layers
    largest_outside: int  # the largest single module outside the layers (the embeddings)
    cache_bytes: int  # sequential calibration's cached layer inputs and outputs
    work_bytes: int  # one batch's activations through one layer, in float32
    free: dict[str, int]  # device ("cuda:0", "cpu", "disk") -> bytes free
    device: str  # where layers run: the first GPU, else the CPU
    caps: dict[str, int] = field(default_factory=dict)  # device -> most bytes of weights

    @property
    def weight_bytes(self) -> int:
        """Bytes of all the model's weights in the planned dtype."""
        return self.n_layers * self.layer_bytes + self.outside_bytes

    @property
    def stream_bytes(self) -> int:
        """What streaming holds on ``device`` at once: the largest module, inputs, a batch."""
        return max(self.layer_bytes, self.largest_outside) + self.cache_bytes + self.work_bytes

    def room(self, devices: list[str] | None = None) -> int:
        """Bytes of weights these devices (default: all) may hold: free, or capped."""
        return sum(min(self.free[d], self.caps.get(d, self.free[d]))
                   for d in (self.free if devices is None else devices) if d in self.free)

    @property
    def runners(self) -> list[str]:
        """The devices that run layers: every GPU, or the CPU without one."""
        return [d for d in self.free if d.startswith("cuda")] or ["cpu"]

    @property
    def verdict(self) -> str:
        """Whether the model fits the devices that run layers, fits only by streaming, or
        cannot fit (:data:`FITS`, :data:`STREAMS`, :data:`CANNOT_FIT`)."""
        everything = self.weight_bytes + self.cache_bytes + self.work_bytes
        if self.weight_bytes <= self.room(self.runners) and \
                everything <= sum(self.free.get(d, 0) for d in self.runners):
            return FITS
        if self.stream_bytes <= self.free.get(self.device, 0) and \
                self.weight_bytes <= self.room():
            return STREAMS
        return CANNOT_FIT

    def __str__(self) -> str:
        free = ", ".join(f"{k} {_size(v)}" + (f" (weights capped at {_size(self.caps[k])})"
                                               if k in self.caps else "")
                         for k, v in self.free.items())
        outcome = {FITS: f"fits in memory on {' + '.join(self.runners)}",
                   STREAMS: f"streams one layer at a time through {self.device} (needs "
                            f"{_size(self.stream_bytes)} there)",
                   CANNOT_FIT: "cannot fit"}[self.verdict]
        return (f"memory plan: {_count(self.parameters)} parameters in {self.dtype} = "
                f"{_size(self.weight_bytes)} ({self.n_layers} layers of up to "
                f"{_size(self.layer_bytes)}, {_size(self.outside_bytes)} outside them); cached "
                f"layer inputs {_size(self.cache_bytes)}; free: {free} -> {outcome}")

    def check(self) -> MemoryPlan:
        """The plan itself, or MlpruneError saying in one sentence why the model cannot run."""
        if self.verdict != CANNOT_FIT:
            return self
        have = self.free.get(self.device, 0)
        if self.stream_bytes > have:
            raise MlpruneError(
                f"{self.name} cannot run here even one layer at a time: its largest module "
                f"({_size(max(self.layer_bytes, self.largest_outside))}) with the cached layer "
                f"inputs ({_size(self.cache_bytes)}) and one batch's activations "
                f"({_size(self.work_bytes)}) needs {_size(self.stream_bytes)} on {self.device}, "
                f"which has {_size(have)}; use fewer samples, a smaller dtype or a larger device.")
        raise MlpruneError(
            f"{self.name} does not fit: its weights ({_size(self.weight_bytes)}) need more than "
            f"the {_size(self.room())} that {', '.join(self.free)} can hold; give an "
            "--offload-folder on a disk with room, raise --max-memory, or load a smaller dtype.")


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def memory_plan(config: PretrainedConfig, dtype: torch.dtype | str | None = None, *,
                free: dict[str, int], caps: dict | None = None, samples: int = 0,
                tokens_per_sample: int = 512, batch_size: int = 8,
                name: str = "This model") -> MemoryPlan:
    """The :class:`MemoryPlan` of a model with this config (a transformers config) in this
    dtype (default: the config's, else float32), given what each device has free (``free``,
    as :func:`free_memory` gives it; keys "cuda:0", "cpu", "disk"), the caps on where weights
    may wait (``caps``: accelerate's ``max_memory``, {0: "20GiB", "cpu": "60GiB"}), and the
    sequential calibration it will run (``samples`` prompts of up to ``tokens_per_sample``
    tokens, ``batch_size`` at a time).

    Parameter bytes come from the architecture itself, built on the meta device (no memory,
    a fraction of a second): per decoder layer, and the rest. The cached inputs are the hidden
    states entering a layer and leaving it, in the model's dtype; one batch's activations are
    counted in float32 (the statistics are summed in float32), four copies of the widest
    activation (the MLP's inner width).
    """
    from transformers import AutoModelForCausalLM

    dtype = parse_dtype(dtype) or parse_dtype(str(getattr(config, "dtype", None) or
                                                  getattr(config, "torch_dtype", None) or
                                                  "float32"))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture transformers cannot build from its config alone
        raise MlpruneError(f"Could not lay out {name} from its config to plan its memory: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    size = torch.empty((), dtype=dtype).element_size()
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    layer_bytes = max(sum(p.numel() for p in layer.parameters()) for layer in layers) * size
    params = list(model.parameters())  # each shared (tied) parameter once
    outside = [p for p in params if id(p) not in in_layers]
    largest_outside = max((sum(p.numel() for p in m.parameters(recurse=False)
                               if id(p) not in in_layers)
                           for m in model.modules()), default=0) * size
    hidden = hidden_size(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    inner = max(hidden, int(getattr(text, "intermediate_size", 0) or
                            getattr(text, "ffn_dim", 0) or 4 * hidden))
    gpus = [k for k in free if k.startswith("cuda")]
    return MemoryPlan(
        name=name, parameters=sum(p.numel() for p in params),
        dtype=str(dtype).replace("torch.", ""), n_layers=len(layers), layer_bytes=layer_bytes,
        outside_bytes=sum(p.numel() for p in outside) * size, largest_outside=largest_outside,
        cache_bytes=2 * samples * tokens_per_sample * hidden * size,
        work_bytes=4 * min(samples, batch_size) * tokens_per_sample * inner * 4,
        free=dict(free), device=gpus[0] if gpus else "cpu",
        caps={_device_name(k): _bytes(v) for k, v in (caps or {}).items()})


def free_memory(offload_folder: str | Path | None = None) -> dict[str, int]:
    """Bytes each device has free now: every GPU's free memory, the CPU's available memory,
    and the free disk space where ``offload_folder`` is (when there is one)."""
    free: dict[str, int] = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free[f"cuda:{i}"] = torch.cuda.mem_get_info(i)[0]
    free["cpu"] = available_memory()
    if offload_folder is not None:
        folder = Path(offload_folder).expanduser()
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        free["disk"] = shutil.disk_usage(existing).free
    return free


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` from "0=20GiB,cpu=60GiB" (GPU index or cuda:N, cpu, disk;
    sizes in GiB/MiB/GB/MB or bytes)."""
    if not text:
        return None
    out: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or not key or not value.strip():
            raise MlpruneError(f"'{part.strip()}' is not a memory cap: write DEVICE=SIZE, e.g. "
                               "0=20GiB,cpu=60GiB.")
        if key.startswith("cuda"):
            key = key.partition(":")[2] or "0"
        if not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise MlpruneError(f"'{key}' is not a device: use a GPU number (0, 1...), cpu or disk.")
        out[int(key) if key.isdigit() else key] = _bytes(value.strip())
    return out


def parse_device_map(text: str | None) -> str | dict | None:
    """A --device-map value: auto, balanced, sequential, one device (cpu, cuda:0, disk), or a
    JSON object {module: device}."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise MlpruneError(f"--device-map is not valid JSON: {e}.") from e
        if not isinstance(value, dict):
            raise MlpruneError("--device-map must be a JSON object {module: device}.")
        return value
    return text


def _device_name(key: int | str) -> str:
    return f"cuda:{key}" if isinstance(key, int) or str(key).isdigit() else str(key)


def _bytes(size: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    refusal = f"'{size}' is not a size: write it as 20GiB, 500MB or bytes."
    try:
        value = convert_file_size_to_int(size if isinstance(size, int) or not str(size).isdigit()
                                          else int(size))
    except ValueError as e:
        raise MlpruneError(refusal) from e
    if value < 0:
        raise MlpruneError(refusal)
    return value
