"""What every ``mlprune`` command shares: a progress bar, the model (and corpus) loaded as
the flags say, and JSON and figures written atomically with one ``wrote PATH`` line each.

Heavy imports (torch, transformers, plotly) stay inside the functions: the first line of a
command is printed before any of them (see :func:`mlprune.cli.main`).
"""

from __future__ import annotations

import json
import sys

from mlprune import MlpruneError, Progress
from mlprune.storage import atomic_write_json, atomic_write_text


def progress_bar() -> Progress:
    """A :data:`mlprune.Progress` drawing one tqdm bar on stderr, its text the stage. Stages
    carry their counts ("calibration (mt:fr-en), batch 3/8"), so the text changes within a
    stage; the bar starts afresh, clock included, when the fraction goes back: a new stage."""
    from tqdm import tqdm

    bar: tqdm | None = None
    last = 0.0

    def update(stage: str, fraction: float) -> None:
        nonlocal bar, last
        if bar is None or fraction < last:
            if bar is not None:
                bar.close()
            bar = tqdm(total=100, leave=False, file=sys.stderr, desc=stage,  # drawn at once
                       bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
        last = fraction
        bar.set_description_str(stage, refresh=False)
        bar.n = round(fraction * 100)
        bar.refresh()

    return update


def say_model(loaded) -> None:
    """One line on stderr: the model's name, size, layers, dtype and device."""
    f = loaded.facts()
    note = f" (weights de-quantized from {f['dequantized_from']})" if f["dequantized_from"] else ""
    print(f"model: {f['model']}: {f['parameters'] / 1e6:.0f}M parameters, {f['layers']} layers, "
          f"hidden {f['hidden_size']}, {f['dtype']} on {f['device']}{note}", file=sys.stderr)


def model_from_args(args, spec: str | None):
    """The model ``spec`` (a --model or --pruned value) as the command's --dtype, --device,
    --device-map, --max-memory, --offload-folder, --trust-remote-code and --allow-pickle say,
    with a progress bar; summarised on stderr. With a device map, the memory plan is printed
    first (one line), and a model that cannot fit even streamed is refused before loading."""
    from mlprune.models import load_model, parse_device_map, parse_max_memory, plan_load

    device_map = parse_device_map(getattr(args, "device_map", None))
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    offload_folder = getattr(args, "offload_folder", None)
    if device_map is None and (max_memory or offload_folder):
        raise MlpruneError("--max-memory and --offload-folder place a model with a device "
                           "map: add --device-map auto.")
    common = dict(dtype=getattr(args, "dtype", None),
                  trust_remote_code=getattr(args, "trust_remote_code", False),
                  allow_pickle=getattr(args, "allow_pickle", False))
    if device_map is not None:
        plan = plan_load(spec, max_memory=max_memory, offload_folder=offload_folder,
                         samples=getattr(args, "samples", None) or 0,
                         batch_size=getattr(args, "batch_size", 8), **common)
        print(plan, file=sys.stderr)
        plan.check()
    loaded = load_model(spec, device=getattr(args, "device", None), device_map=device_map,
                        max_memory=max_memory, offload_folder=offload_folder, progress=progress_bar(),
                        **common)
    say_model(loaded)
    return loaded


def model_and_corpus(args):
    """The command's model (--model) and corpus (--corpus, when the command takes one)."""
    from mlprune.corpus import read_corpus

    loaded = model_from_args(args, args.model)
    corpus = read_corpus(args.corpus) if getattr(args, "corpus", None) is not None else None
    return loaded, corpus


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically, and say so on stderr."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False))
    print(f"wrote {path}", file=sys.stderr)


def write_strict_json(path: str, data: dict) -> None:
    """Write JSON that strict readers accept (NaN, e.g. an undefined RankC, as null)."""
    atomic_write_json(path, data)
    print(f"wrote {path}", file=sys.stderr)


def write_figure(fig, path: str) -> None:
    """Write a plotly figure: .html as is, any other suffix as an image (needs kaleido)."""
    if path.endswith(".html"):
        fig.write_html(path, include_plotlyjs="cdn")
    else:
        try:
            fig.write_image(path)
        except Exception as e:
            raise MlpruneError(f"Could not write {path} as an image ({type(e).__name__}); "
                               "write .html instead, or install kaleido.") from e
    print(f"wrote {path}", file=sys.stderr)


def csv_values(text: str | None, cast=str) -> tuple | None:
    """A comma list typed on the command line, each item ``cast`` (None stays None)."""
    return None if text is None else tuple(cast(x.strip()) for x in text.split(",") if x.strip())
