"""A few tests on the embedded Gemma 3 270M (weights de-quantized from Q4_K_M).

Marked ``real``: they load the real model (the first run converts the GGUF, ~2 min; later
runs read the cached safetensors copy), and they still run in CI.
"""

from __future__ import annotations

import pytest
import torch

from mlprune.capture import capture
from mlprune.corpus import builtin_corpus
from mlprune.evaluate import evaluate_translation, generate
from mlprune.features import detect
from mlprune.pipeline import PruneSpec, prune
from mlprune.prompts import eval_items, translation_prompts
from mlprune.prune import pruned

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def gemma():
    from mlprune.models import load_model

    return load_model()


def test_embedded_model_loads_with_its_facts(gemma):
    facts = gemma.facts()
    assert facts["layers"] == 18 and facts["hidden_size"] == 640
    assert facts["dequantized_from"] == "Q4_K_M" and facts["source"] == "embedded"
    assert facts["linear_modules"] == 18 * 7


def test_translating_shows_dimensions_hundreds_of_times_the_median(gemma):
    stats = capture(gemma.model, gemma.tokenizer,
                    translation_prompts(builtin_corpus(), "fr", "en", shots=4, samples=8))
    table = detect(stats, "ratio:100")
    middle = table[(table.layer >= 4) & (table.layer <= 12)]
    assert len(middle) >= 5 and middle.ratio_to_median.max() > 300
    # a handful of dimensions, not a smear: at most 5 per layer pass 100x the median
    assert table.groupby("layer").size().max() <= 5


def test_it_translates_and_pruning_changes_it_reversibly(gemma):
    corpus = builtin_corpus()
    items = eval_items(corpus, "fr", "en", shots=4, limit=3)
    dense = generate(gemma.model, gemma.tokenizer, [it.prompt for it in items], max_new_tokens=32)
    assert all(g.text and "\n" not in g.text for g in dense)
    result = prune(gemma, corpus, PruneSpec(pair="fr-en", sparsity=0.5, samples=4, mode="one-shot"))
    weights = {k: v.clone() for k, v in gemma.model.state_dict().items() if "layers.5." in k}
    with pruned(gemma.model, result.masks):
        sparse = generate(gemma.model, gemma.tokenizer, [it.prompt for it in items], max_new_tokens=32)
    assert [g.text for g in sparse] != [g.text for g in dense]
    assert all(torch.equal(weights[k], v) for k, v in gemma.model.state_dict().items() if k in weights)


def test_few_shot_translation_scores_well_dense(gemma):
    metrics = evaluate_translation(gemma.model, gemma.tokenizer, builtin_corpus(), "fr", "en",
                                   limit=6, max_new_tokens=48)
    assert metrics["chrf"] > 35 and metrics["target_language_rate"] >= 0.8
    assert 1 < metrics["perplexity"] < 200


def test_bfloat16_translates_as_float32_does(gemma):
    """The faster precision the dashboard offers (model@bfloat16) against the fp32 reference:
    greedy translations of 8 held-out sentences mostly identical, chrF within 3 points (the
    bench measures more sentences: bench/live.py, section 6)."""
    from mlprune.evaluate import chrf
    from mlprune.models import load_model

    half = load_model("embedded@bfloat16")
    assert half.facts()["dtype"] == "bfloat16"
    items = eval_items(builtin_corpus(), "fr", "en", shots=4, limit=8)
    prompts, refs = [it.prompt for it in items], [it.reference for it in items]
    full = [g.text for g in generate(gemma.model, gemma.tokenizer, prompts, max_new_tokens=48)]
    fast = [g.text for g in generate(half.model, half.tokenizer, prompts, max_new_tokens=48)]
    assert sum(a == b for a, b in zip(full, fast)) >= 6
    assert abs(chrf(fast, refs) - chrf(full, refs)) < 3


def test_the_few_row_kernel_translates_as_nn_linear_does(gemma):
    """Decoding through kernels.few_rows (every decoder linear a FewRowLinear, the head a
    WeightMajorHead) against nn.Linear's forward everywhere: the same greedy translations,
    batched and one at a time (bench/decode.py measures the speed)."""
    from mlprune.kernels import FewRowLinear, WeightMajorHead

    model = gemma.model
    head = model.get_output_embeddings()
    assert type(head) is WeightMajorHead
    assert head.weight is model.get_input_embeddings().weight  # still tied
    linears = [m for m in model.modules() if type(m) is FewRowLinear]
    assert len(linears) == 18 * 7  # q, k, v, o, gate, up, down in each of 18 layers
    items = eval_items(builtin_corpus(), "fr", "en", shots=4, limit=4)
    prompts = [it.prompt for it in items]

    def texts():
        return ([g.text for g in generate(model, gemma.tokenizer, prompts, max_new_tokens=32)]
                + [generate(model, gemma.tokenizer, prompts[:1], max_new_tokens=32)[0].text])

    fast = texts()
    for m in [head, *linears]:
        m.__class__ = torch.nn.Linear
    try:
        plain = texts()
    finally:
        head.__class__ = WeightMajorHead
        for m in linears:
            m.__class__ = FewRowLinear
    assert fast == plain


def test_the_converted_tokenizer_is_autotokenizers(gemma):
    """The embedded model's tokenizer is built straight from its tokenizer.json (3x faster
    than AutoTokenizer, bench/live.py section 7): the same class, settings and ids."""
    from pathlib import Path

    from transformers import AutoTokenizer

    ours = gemma.tokenizer
    theirs = AutoTokenizer.from_pretrained(Path(ours.name_or_path))
    assert type(ours) is type(theirs) and len(ours) == len(theirs)
    for attr in ("special_tokens_map", "all_special_ids", "padding_side", "model_max_length",
                 "add_bos_token", "chat_template"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    corpus = builtin_corpus()
    texts = [t for lang in corpus.languages for t in corpus.sentences(lang)]
    texts += ["<bos>Hi<eos>\n\nFrench: été ça 你好 🙂  x\t\ty", "", " <start_of_turn>user\nhi"]
    assert ours(texts)["input_ids"] == theirs(texts)["input_ids"]
