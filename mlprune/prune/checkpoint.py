"""Per-layer checkpoints: a sequential run or a ranking saved layer by layer, to resume.

A :class:`LayerCheckpoint` is a folder: ``run.json`` names the run (:func:`run_key`, a digest
of everything that decides its layers), and one safetensors file per finished layer holds
that layer's statistics and masks (a sequential run) or its modules' row orders (a ranking).
Every file is written atomically, so a run stopped at any point resumes from the last whole
layer; a folder of another run is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlprune import MlpruneError
from mlprune.capture import ActivationStats
from mlprune.mwanda import MWanda
from mlprune.prompts import PromptSet
from mlprune.prune.masks import _PROTECTED, MaskSet, _read_safetensors
from mlprune.storage import atomic_save, atomic_write


def run_key(dense: ActivationStats, other: ActivationStats | None,
            texts: PromptSet | list[str], settings: dict) -> str:
    """What decides a sequential run's layers, as a digest: its settings, its prompts and the
    dense statistics it starts from (which the model's weights and the prompts decide)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update("\x00".join(texts.texts if isinstance(texts, PromptSet) else texts).encode())
    for stats in (dense, other):
        if stats is None:
            continue
        h.update(f"{stats.n_tokens}/{stats.n_prompts}".encode())
        h.update(stats.hidden_norms.float().contiguous().numpy().tobytes())
        for name in sorted(stats.input_sqnorms):
            h.update(name.encode())
            h.update(stats.input_sqnorms[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def mwanda_key(mwanda: MWanda | None) -> tuple | None:
    """The M-Wanda settings as they enter a run's settings (and so its key)."""
    if mwanda is None:
        return None
    return sorted(mwanda.parts), mwanda.variance_weight, mwanda.prob_weight


class LayerCheckpoint:
    """A folder holding a sequential run or a ranking layer by layer, so that a run that stops
    resumes there.

    ``run.json`` says which run it is (:func:`run_key`); ``layer-007.safetensors`` holds layer
    7's module statistics (per part of a calibration mix) and masks, written atomically when
    the layer is done; a ranking's files hold each module's row order (``what="ranking"``,
    in the ``ranking`` folder of a run's checkpoint folder). A folder of another run is
    refused rather than mixed in; another checkpoint folder inside it is no obstacle.
    """

    MANIFEST = "run.json"

    def __init__(self, folder: str | Path, key: str, n_layers: int,
                 what: str = "sequential run"):
        self.folder = Path(folder).expanduser()
        manifest = self.folder / self.MANIFEST
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text(encoding="utf-8")).get("run")
            except (OSError, ValueError, AttributeError):
                found = None
            if found != key:
                raise MlpruneError(
                    f"{self.folder} holds the layers of another {what} (another model, "
                    "calibration or setting); give an empty folder, or delete it to start over.")
        elif self.folder.is_dir() and any(not (p / self.MANIFEST).is_file()
                                          for p in self.folder.iterdir()):
            raise MlpruneError(f"{self.folder} is not empty and holds no {what}; give an "
                               "empty or new folder for the per-layer checkpoints.")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(manifest, json.dumps({"run": key, "layers": n_layers}).encode())

    @classmethod
    def for_run(cls, folder: str | Path, settings: dict, dense: ActivationStats | None,
                other: ActivationStats | None, texts: PromptSet | list[str], n_layers: int,
                what: str = "sequential run") -> LayerCheckpoint:
        """The checkpoint in ``folder`` of the run that ``settings``, ``texts`` and the
        statistics decide (:func:`run_key`); refused if the folder holds another run."""
        return cls(folder, run_key(dense, other, texts, settings), n_layers, what=what)

    def path(self, layer: int) -> Path:
        """The file of one layer."""
        return self.folder / f"layer-{layer:03d}.safetensors"

    def _save(self, layer: int, tensors: dict[str, torch.Tensor], header: dict) -> Path:
        """One layer's file, written atomically: a stopped run never leaves half a layer."""
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        metadata = {"mlprune_layer": json.dumps(header)}
        return atomic_save(self.path(layer),
                           lambda partial: save_file(tensors, str(partial), metadata=metadata))

    def _load(self, layer: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """One layer's tensors and header, or None when it is not saved (or unreadable: it
        is then computed and written again)."""
        try:
            tensors, meta = _read_safetensors(self.path(layer), "layer")
            return tensors, json.loads(meta["mlprune_layer"])
        except (MlpruneError, KeyError, ValueError):
            return None

    def write_orders(self, layer: int, orders: dict[str, torch.Tensor]) -> Path:
        """Save one ranked layer: each module's row order."""
        return self._save(layer, orders, {"layer": layer})

    def read_orders(self, layer: int, names: list[str]) -> dict[str, torch.Tensor] | None:
        """A ranked layer's row orders, or None when they are not all saved."""
        found = self._load(layer)
        return found[0] if found is not None and all(n in found[0] for n in names) else None

    def write(self, layer: int, sqnorms: dict[str, torch.Tensor],
              active: dict[str, torch.Tensor], masks: MaskSet | None,
              other: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
              ) -> Path:
        """Save one finished layer: its modules' [groups, in] statistics and its masks (and
        ``other``: the second set's statistics, (sqnorms, active), when it is replayed)."""
        tensors = {f"sq/{n}": v for n, v in sqnorms.items()}
        tensors.update({f"act/{n}": v for n, v in active.items()})
        header: dict = {"layer": layer, "masks": None, "other": other is not None}
        if other is not None:
            tensors.update({f"osq/{n}": v for n, v in other[0].items()})
            tensors.update({f"oact/{n}": v for n, v in other[1].items()})
        if masks is not None:
            tensors.update({f"cols/{n}": c for n, c in masks.pruned_cols.items()})
            tensors.update({f"{_PROTECTED}{n}": p for n, p in masks.protected.items()
                            if n in masks.pruned_cols})
            header["masks"] = {"modules": masks.modules, "in_features": masks.in_features,
                               "target": masks.target, "pattern": masks.pattern,
                               "meta": masks.meta}
        return self._save(layer, tensors, header)

    def read(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                        MaskSet | None] | None:
        """A saved layer's statistics and masks, or None when it is not done (or its file is
        unreadable: it is then computed and written again)."""
        found = self._load(layer)
        if found is None:
            return None
        tensors, header = found
        sq, act = _under(tensors, "sq/"), _under(tensors, "act/")
        saved = header["masks"]
        if saved is None:
            return sq, act, None
        names = saved["modules"]
        masks = MaskSet({n: tensors[f"cols/{n}"] for n in names},
                        {n: saved["in_features"][n] for n in names}, float(saved["target"]),
                        saved["pattern"], saved["meta"],
                        {n: tensors[f"{_PROTECTED}{n}"] for n in names
                         if f"{_PROTECTED}{n}" in tensors})
        return sq, act, masks

    def read_other(self, layer: int) -> tuple[dict[str, torch.Tensor],
                                              dict[str, torch.Tensor]] | None:
        """A saved layer's second-set statistics (sqnorms, active), or None when the layer
        is not saved or was saved without them."""
        found = self._load(layer)
        if found is None or not found[1].get("other"):
            return None
        return _under(found[0], "osq/"), _under(found[0], "oact/")


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with ``prefix``, keyed by the rest (the module name)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
