"""Shared fixtures: tiny random models, a byte tokenizer and a small parallel corpus."""

from __future__ import annotations

import pandas as pd
import pytest
from tiny import byte_tokenizer, save_tiny, tiny_model

from mlprune.corpus import ParallelCorpus
from mlprune.models import LoadedModel

EN = ["The cat sleeps on the sofa.", "It is sunny today.", "I would like a coffee.",
      "Where is the station?", "We go to the market tomorrow.", "My brother works in Paris.",
      "The soup is too hot.", "She reads a book every week.", "The train leaves at noon.",
      "Our garden is full of flowers.", "He forgot his umbrella.", "The museum opens at nine.",
      "Children play in the park.", "The shop is closed on Sunday.", "I lost my keys again.",
      "The river is very calm.", "They bought a new car.", "Dinner is ready.",
      "The baby is sleeping.", "We need more bread."]
FR = ["Le chat dort sur le canapé.", "Il fait beau aujourd'hui.", "Je voudrais un café.",
      "Où est la gare ?", "Nous allons au marché demain.", "Mon frère travaille à Paris.",
      "La soupe est trop chaude.", "Elle lit un livre chaque semaine.", "Le train part à midi.",
      "Notre jardin est plein de fleurs.", "Il a oublié son parapluie.", "Le musée ouvre à neuf heures.",
      "Les enfants jouent au parc.", "Le magasin est fermé le dimanche.", "J'ai encore perdu mes clés.",
      "La rivière est très calme.", "Ils ont acheté une nouvelle voiture.", "Le dîner est prêt.",
      "Le bébé dort.", "Il nous faut plus de pain."]


@pytest.fixture(scope="session")
def corpus() -> ParallelCorpus:
    return ParallelCorpus(pd.DataFrame({"en": EN, "fr": FR}), "test")


@pytest.fixture
def tok():
    return byte_tokenizer()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def loaded(llama, tok) -> LoadedModel:
    return LoadedModel(llama, tok, "tiny-llama", "local")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny llama saved as a Hugging Face folder (config, safetensors, tokenizer)."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "enfr.tsv"
    path.write_text("en\tfr\n" + "\n".join(f"{e}\t{f}" for e, f in zip(EN, FR)) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def private_cache(request, tmp_path_factory, monkeypatch):
    """Each test gets its own mlprune cache, except real-model tests, which reuse the
    converted embedded model (converting it again would take ~2 min)."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("MLPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))



REPRODUCE_TASK = [
    {"id": f"t{i}", "lang": lang, "prompt": p, "choices": [" yes", " no"], "label": i % 2}
    for i in range(6) for lang, p in (("en", f"Item {i} is true?"), ("fr", f"L'item {i} est vrai ?"))
]


def tiny_grid(folder):
    """A reproduce grid small enough for a tiny model: one direction, three methods at 50%."""
    import json

    from mlprune.reproduce import Grid

    task = folder / "tiny_task.jsonl"
    task.write_text("".join(json.dumps(line) + "\n" for line in REPRODUCE_TASK), encoding="utf-8")
    return Grid(langs=("fr",), analysis_samples=2, samples=2,
                methods=("wanda-mono", "wanda-mt", "magnitude"), patterns=("0.5",),
                translation_limit=2, tasks=(str(task),), zeroshot_patterns=("0.5",),
                resamples=200)


@pytest.fixture(scope="session")
def finished_report(tmp_path_factory, corpus):
    """One tiny `mlprune reproduce` run, made once per test session:
    (loaded, grid, out folder, report, progress stages seen)."""
    from mlprune import reproduce

    folder = tmp_path_factory.mktemp("reproduce")
    loaded = LoadedModel(tiny_model("llama"), byte_tokenizer(), "tiny-llama", "local")
    grid, stages = tiny_grid(folder), []
    report = reproduce.run(loaded, corpus, folder / "run", grid,
                           progress=lambda s, f: stages.append(s))
    return loaded, grid, folder / "run", report, stages
