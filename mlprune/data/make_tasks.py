"""Build the word-order and sentence-completion tasks from the team's parallel sentences.

    python -m mlprune.data.make_tasks            # rewrites mlprune/data/tasks/*.jsonl
    python mlprune/data/make_tasks.py --out DIR  # writes them elsewhere

The source is ``tasks/source.tsv``: a header ``id`` + language codes, then one sentence per
cell, the same sentence translated along each row (written by the mlprune team, Apache-2.0,
disjoint from the calibration corpus ``parallel.tsv``). Two task files come out of it, in the
format ``mlprune.zeroshot`` reads (one JSON object per item and language):

- ``wordorder.jsonl``: which of two whole sentences is the real one? One choice is the
  sentence as written, the other the same sentence with two adjacent words swapped (for
  Chinese, written without spaces, two adjacent characters). The swap never touches the
  first or the last word and never a word with punctuation at its edge, so the two choices
  hold the same words, capitals and punctuation and differ only in order. The prompt is
  empty: each sentence is scored whole after the BOS token, BLiMP's minimal-pair protocol.
- ``completion.jsonl``: the first half of a sentence (split at the word boundary nearest its
  middle; by characters for Chinese) is the prompt; the choices are its true second half and
  the second halves of ``N_COMPLETION_CHOICES - 1`` other sentences (a cloze in the manner of
  StoryCloze and HellaSwag).

Items stay aligned across languages: everything random (which choice comes first, which
sentences lend the wrong endings) is drawn once per item id with a seeded generator and
shared by all languages; only where the swap falls depends on the language's words. The
output is a pure function of ``source.tsv``, so the shipped files can be checked by rebuilding.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import unicodedata
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SOURCE = TASKS_DIR / "source.tsv"
SEED = 11
N_COMPLETION_CHOICES = 3
# Languages written without spaces between words: split by characters instead.
UNSPACED = {"zh", "ja", "th"}


def read_source(path: Path = SOURCE) -> tuple[list[str], list[dict[str, str]]]:
    """The language codes and the rows ({"id": ..., lang: sentence}) of a source TSV."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    if not header or header[0] != "id":
        raise ValueError(f"{path.name}: the header must start with 'id'.")
    langs = header[1:]
    records, seen = [], set()
    for n, cells in enumerate(body, start=2):
        if len(cells) != len(header):
            raise ValueError(f"{path.name} line {n}: {len(cells)} cells, expected {len(header)}.")
        if cells[0] in seen:
            raise ValueError(f"{path.name} line {n}: id {cells[0]} repeats.")
        seen.add(cells[0])
        if any(not c.strip() or c != c.strip() for c in cells):
            raise ValueError(f"{path.name} line {n}: an empty cell or stray spaces.")
        records.append(dict(zip(header, cells)))
    return langs, records


def _units(sentence: str, lang: str) -> tuple[list[str], str]:
    """The units a sentence is cut into (words, or characters where words have no spaces)
    and the string that joins them back."""
    if lang in UNSPACED:
        return list(sentence), ""
    return sentence.split(" "), " "


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def _swappable(unit: str, lang: str) -> bool:
    """A unit that can move without carrying punctuation along (inner hyphens are fine)."""
    if lang in UNSPACED:
        return not _is_punct(unit) and not unit.isspace()
    return not _is_punct(unit[0]) and not _is_punct(unit[-1])


def swap_adjacent(sentence: str, lang: str, rng: random.Random) -> str:
    """The sentence with two adjacent units swapped, neither of them the first or the last."""
    units, glue = _units(sentence, lang)
    candidates = [i for i in range(1, len(units) - 2)
                  if _swappable(units[i], lang) and _swappable(units[i + 1], lang)
                  and units[i].casefold() != units[i + 1].casefold()]
    if not candidates:
        raise ValueError(f"No two adjacent words can be swapped in ({lang}) {sentence!r}.")
    i = rng.choice(candidates)
    units[i], units[i + 1] = units[i + 1], units[i]
    return glue.join(units)


def split_middle(sentence: str, lang: str) -> tuple[str, str]:
    """(first half, second half) at the unit boundary nearest the middle; the second half
    keeps its leading space, so prompt + ending is the sentence, and never starts with
    punctuation."""
    units, glue = _units(sentence, lang)
    cut = len(units) // 2
    while cut < len(units) - 1 and _is_punct(units[cut][0]):
        cut += 1
    return glue.join(units[:cut]), glue + glue.join(units[cut:])


def _item(item_id: str, lang: str, prompt: str, choices: list[str], label: int) -> str:
    if len(set(choices)) != len(choices):
        raise ValueError(f"Item {item_id} ({lang}) has two equal choices: {choices}.")
    return json.dumps({"id": item_id, "lang": lang, "prompt": prompt, "choices": choices,
                       "label": label}, ensure_ascii=False)


def wordorder_lines(langs: list[str], records: list[dict[str, str]]) -> list[str]:
    """Grammatical vs word-swapped sentence, one line per item and language."""
    lines = []
    for rec in records:
        label = random.Random(f"{SEED}:wordorder:{rec['id']}").randrange(2)
        for lang in langs:
            good = rec[lang]
            bad = swap_adjacent(good, lang, random.Random(f"{SEED}:swap:{rec['id']}:{lang}"))
            choices = [good, bad] if label == 0 else [bad, good]
            lines.append(_item(f"wo-{rec['id']}", lang, "", choices, label))
    return lines


def completion_lines(langs: list[str], records: list[dict[str, str]],
                     n_choices: int = N_COMPLETION_CHOICES) -> list[str]:
    """First half as prompt; the true second half among those of other sentences."""
    lines = []
    for k, rec in enumerate(records):
        rng = random.Random(f"{SEED}:completion:{rec['id']}")
        others = rng.sample([j for j in range(len(records)) if j != k], n_choices - 1)
        label = rng.randrange(n_choices)
        sources = others[:label] + [k] + others[label:]
        for lang in langs:
            prompt = split_middle(rec[lang], lang)[0]
            choices = [split_middle(records[j][lang], lang)[1] for j in sources]
            lines.append(_item(f"cmp-{rec['id']}", lang, prompt, choices, label))
    return lines


def build(source: Path = SOURCE, out_dir: Path = TASKS_DIR) -> list[Path]:
    """Write wordorder.jsonl and completion.jsonl from ``source`` into ``out_dir``."""
    langs, records = read_source(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lines in (("wordorder", wordorder_lines(langs, records)),
                        ("completion", completion_lines(langs, records))):
        path = out_dir / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="the parallel source TSV")
    parser.add_argument("--out", type=Path, default=TASKS_DIR, help="folder for the task files")
    args = parser.parse_args(argv)
    for path in build(args.source, args.out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
