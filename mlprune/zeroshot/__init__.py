"""Zero-shot multilingual multiple choice: tasks, scoring, consistency, significance, power.

The modules, from the bottom up:

    tasks        items, tasks, task files, the paper's XNLI and MARC templates
    loaders      task sources: built-in, JSONL, XNLI/MARC files in published formats, the hub
    scoring      each choice's log-likelihood (prompt + continuation, or whole sequence)
    statistics   RankC, the paired bootstrap, the detectable difference (power)
    results      one model's accuracy/RankC per language (and back from its stored dict);
                 two models compared
    reports      text tables and JSON-ready dicts (strict JSON itself is mlprune.storage's)
    sweep        zero-shot columns for every row of a pruning sweep
    lmeval       lm-evaluation-harness on an exported model

Everything public is importable from here (``from mlprune import zeroshot as zs``).
"""

from mlprune.zeroshot.lmeval import (
    LM_EVAL_BENCHMARKS,
    check_lm_eval_ready,
    lm_eval_command,
    lm_eval_installed,
    lm_eval_tasks,
    read_lm_eval_results,
    resolve_model_dir,
    run_lm_eval,
)
from mlprune.zeroshot.loaders import (
    MARC_LABELS,
    MARC_LANGS,
    XNLI_LABELS,
    XNLI_LANGS,
    load_from_hub,
    load_records,
    load_task,
    read_records,
    records_to_items,
)
from mlprune.zeroshot.reports import (
    format_comparison,
    format_result,
    json_safe,
    rankc_note,
    result_dict,
    strict_json,
)
from mlprune.zeroshot.results import TaskResult, compare_results, evaluate_task
from mlprune.zeroshot.scoring import NORMS, ItemScores, score_items, split_tokens
from mlprune.zeroshot.statistics import (
    Significance,
    assumed_discordance,
    detectable_difference,
    paired_bootstrap,
    rankc,
    rankc_item,
    rankc_weights,
    top_j,
)
from mlprune.zeroshot.sweep import SweepEval, sweep_eval
from mlprune.zeroshot.tasks import (
    BUILTIN_TASKS,
    CHOICE_SLOT,
    MAX_TASK_BYTES,
    REFERENCE_LANG,
    TEMPLATES,
    Task,
    TaskItem,
    Template,
    builtin_task_path,
    parse_task,
    rankc_unaligned,
    render_items,
    template_for,
    write_task,
)

__all__ = [
    "BUILTIN_TASKS", "CHOICE_SLOT", "LM_EVAL_BENCHMARKS", "MARC_LABELS", "MARC_LANGS",
    "MAX_TASK_BYTES", "NORMS", "REFERENCE_LANG", "TEMPLATES", "XNLI_LABELS", "XNLI_LANGS",
    "ItemScores", "Significance", "SweepEval", "Task", "TaskItem", "TaskResult", "Template",
    "assumed_discordance", "builtin_task_path", "check_lm_eval_ready", "compare_results",
    "detectable_difference", "evaluate_task", "format_comparison", "format_result", "json_safe",
    "lm_eval_command", "lm_eval_installed", "lm_eval_tasks", "load_from_hub", "load_records",
    "load_task", "paired_bootstrap", "parse_task", "rankc", "rankc_item", "rankc_note",
    "rankc_unaligned", "rankc_weights", "read_lm_eval_results", "read_records",
    "records_to_items", "render_items", "resolve_model_dir", "result_dict", "run_lm_eval",
    "score_items", "split_tokens", "strict_json", "sweep_eval", "template_for", "top_j",
    "write_task",
]
