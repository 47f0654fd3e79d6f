"""The lm-evaluation-harness bridge: run its multilingual benchmarks on an exported model.

lm-eval downloads the benchmarks' data from the Hugging Face hub, so this needs
``pip install lm-eval`` and a reachable hub; it runs as a subprocess, zero-shot.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from mlprune import MlpruneError

LM_EVAL_BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "xnli": ("xnli_{}", ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr",
                         "ur", "vi", "zh")),
    "xstorycloze": ("xstorycloze_{}", ("ar", "en", "es", "eu", "hi", "id", "my", "ru", "sw",
                                       "te", "zh")),
    "xcopa": ("xcopa_{}", ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")),
    "pawsx": ("paws_{}", ("de", "en", "es", "fr", "ja", "ko", "zh")),
}


def lm_eval_tasks(benchmarks: Iterable[str], langs: Iterable[str] | None = None) -> list[str]:
    """lm-eval task names for benchmarks, restricted to ``langs`` where given."""
    wanted = [lang.strip() for lang in langs] if langs is not None else None
    out = []
    for bench in benchmarks:
        bench = bench.strip().lower()
        if bench not in LM_EVAL_BENCHMARKS:
            raise MlpruneError(f"Unknown benchmark '{bench}': use {', '.join(LM_EVAL_BENCHMARKS)}.")
        pattern, available = LM_EVAL_BENCHMARKS[bench]
        chosen = [lang for lang in available if wanted is None or lang in wanted]
        if not chosen:
            raise MlpruneError(f"{bench} has none of the languages {', '.join(wanted or [])}; it "
                               f"has {', '.join(available)}.")
        out += [pattern.format(lang) for lang in chosen]
    return out


def lm_eval_command(model: str | Path, tasks: Sequence[str], *, output_path: str | Path,
                    batch_size: int = 8, device: str | None = None, dtype: str | None = None,
                    limit: int | None = None, trust_remote_code: bool = False) -> list[str]:
    """The argv that runs lm-evaluation-harness zero-shot on a model folder or hub id."""
    model_args = f"pretrained={model}"
    if dtype:
        model_args += f",dtype={dtype}"
    if trust_remote_code:
        model_args += ",trust_remote_code=True"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
           "--tasks", ",".join(tasks), "--num_fewshot", "0", "--batch_size", str(batch_size),
           "--output_path", str(output_path)]
    if device:
        cmd += ["--device", device]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def check_lm_eval_ready() -> None:
    """Raise one sentence unless lm-eval is installed and the hub (its data) can be reached."""
    from mlprune.models import hub_reachable

    if not lm_eval_installed():
        raise MlpruneError("lm-evaluation-harness is not installed; install it with "
                           "'pip install lm-eval' to evaluate on xnli, xstorycloze, xcopa or pawsx.")
    if not hub_reachable():
        raise MlpruneError("The Hugging Face hub cannot be reached from this machine, and "
                           "lm-evaluation-harness downloads the xnli, xstorycloze, xcopa and "
                           "pawsx data from it; run this where the hub is reachable.")


def read_lm_eval_results(output_path: str | Path) -> dict[str, dict[str, float]]:
    """Metrics per task from the newest results JSON lm-eval wrote under ``output_path``."""
    found = sorted(glob.glob(os.path.join(str(output_path), "**", "results*.json"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise MlpruneError(f"lm-eval wrote no results file under {output_path}.")
    data = json.loads(Path(found[-1]).read_text(encoding="utf-8"))
    out = {}
    for task, metrics in data.get("results", {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and "stderr" not in k}
    return out


def run_lm_eval(model: str | Path, benchmarks: Iterable[str], *, output_path: str | Path,
                langs: Iterable[str] | None = None, batch_size: int = 8,
                device: str | None = None, dtype: str | None = None, limit: int | None = None,
                runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> dict:
    """Evaluate a model folder (e.g. an mlprune export) with lm-evaluation-harness.

    Needs ``pip install lm-eval`` and a reachable Hugging Face hub (the benchmarks' data come
    from it). Runs zero-shot; returns {task: {metric: value}} (e.g. ``acc``).
    """
    check_lm_eval_ready()
    tasks = lm_eval_tasks(benchmarks, langs)
    cmd = lm_eval_command(model, tasks, output_path=output_path, batch_size=batch_size,
                          device=device, dtype=dtype, limit=limit)
    done = runner(cmd, check=False)
    if done.returncode != 0:
        raise MlpruneError(f"lm-eval stopped with exit status {done.returncode}; its messages "
                           "above say why.")
    return read_lm_eval_results(output_path)


def resolve_model_dir(spec: str | Path | None) -> str:
    """A folder or hub id lm-eval can load: the embedded model's converted folder for the
    default spec, the path itself for a folder, the id itself for a hub id."""
    from mlprune.models import DEFAULT_MODEL, _embedded_folder

    text = str(spec or DEFAULT_MODEL).strip()
    if text in (DEFAULT_MODEL, "embedded", "default"):
        return str(_embedded_folder(lambda f, m: None))
    if text.lower().endswith(".gguf"):
        raise MlpruneError("lm-eval cannot read a .gguf file here; export the model first "
                           "(mlprune prune --out DIR) and give that folder.")
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MlpruneError(f"{path} has no config.json, so lm-eval cannot load it as a model.")
        return str(path.resolve())
    return text

