"""Entries, corpus BLEU from sentence statistics, paired comparisons and the report table (eval/summary.py)."""

import math

import numpy as np
import pytest
import sacrebleu

from unipipe_ray.eval.summary import (
    bleu_from_stats,
    bleu_stats,
    compare,
    compare_scores,
    corpus_bleu_entry,
    entry,
    markdown_table,
    without_scores,
)

PREDS = ["the cat sat on the mat", "A quick brown fox jumps.", "", "completely different words",
         "a dog ran in the park today", "it is raining"]
REFS = ["the cat sat on a mat", "The quick brown fox jumped over the dog", "something", "nothing alike here",
        "the dog ran in the park", "it is raining heavily outside now"]


def test_bleu_from_stats_hand_value():
    """One sentence, stats [sys 6, ref 6, correct 5 3 2 1, total 6 5 4 3]: BP = 1,
    BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25. A system of 3 tokens against a
    6-token reference with every n-gram right gets BP = exp(1 - 6/3) = e^-1. Any order with no match: 0."""
    assert bleu_from_stats([6, 6, 5, 3, 2, 1, 6, 5, 4, 3]) == pytest.approx(100 * (1 / 12) ** 0.25)
    assert bleu_from_stats([3, 6, 3, 2, 1, 1, 3, 2, 1, 1]) == pytest.approx(100 * math.exp(-1))
    assert bleu_from_stats([6, 6, 5, 3, 2, 0, 6, 5, 4, 3]) == 0.0
    assert bleu_from_stats([0, 4, 0, 0, 0, 0, 0, 0, 0, 0]) == 0.0


@pytest.mark.parametrize("rows", [slice(None), slice(0, 2), slice(1, 6), [0, 0, 4, 5, 5]])
def test_corpus_bleu_from_pooled_sentence_stats_equals_sacrebleu(rows):
    """Summing per-sentence statistics over any subset (repeats included, as in a bootstrap resample)
    reproduces sacrebleu's corpus BLEU of that subset."""
    idx = np.arange(len(PREDS))[rows]
    table = bleu_stats(PREDS, REFS)
    expected = sacrebleu.corpus_bleu([PREDS[i] for i in idx], [[REFS[i] for i in idx]]).score
    assert bleu_from_stats(table[idx].sum(0)) == pytest.approx(expected)


def test_corpus_bleu_entry_estimate_is_sacrebleu_and_inside_interval():
    e = corpus_bleu_entry(PREDS * 5, REFS * 5, n_resamples=300)
    assert e["estimate"] == pytest.approx(sacrebleu.corpus_bleu(PREDS * 5, [REFS * 5]).score)
    assert e["low"] < e["estimate"] < e["high"] and e["n"] == 30 and "scores" not in e


def test_entry_fields_and_binary_check():
    e = entry([1, 0, 1, 1], n_resamples=200, binary=True, note="x")
    assert e["estimate"] == 0.75 and e["n"] == 4 and e["scores"] == [1.0, 0.0, 1.0, 1.0]
    assert e["binary"] is True and e["note"] == "x" and e["low"] <= 0.75 <= e["high"]
    assert "binary" not in entry([0.2, 0.4], n_resamples=50)
    with pytest.raises(ValueError, match="not all 0 or 1"):
        entry([1, 0.5], binary=True)
    with pytest.raises(ValueError):
        entry([])


def test_compare_scores_binary_uses_mcnemar_hand_case():
    """b = 10 (A right, B wrong), c = 2 -> exact McNemar p = 2 * (1 + 12 + 66) / 4096 (see test_eval_stats);
    diff = (7 - 15) / 20 = -0.4."""
    a = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 3
    b = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 3
    c = compare_scores(a, b, n_resamples=500)
    assert c["test"] == "mcnemar" and c["p_value"] == pytest.approx(2 * 79 / 4096)
    assert c["diff"] == pytest.approx(-0.4) and c["significant"]
    assert c["low"] < -0.4 < c["high"] < 0


def test_compare_scores_continuous_uses_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(100)
    c = compare_scores(a, a + 0.001 * rng.standard_normal(100), n_resamples=500)
    assert c["test"] == "paired_bootstrap" and not c["significant"]
    c = compare_scores(a, a + 0.2, n_resamples=500)
    assert c["diff"] == pytest.approx(0.2) and c["significant"] and c["p_value"] == pytest.approx(1 / 501)


def test_compare_uses_entry_kind_and_skips_what_it_cannot_pair():
    """token F1 that happens to be all 0/1 is still compared by bootstrap: the entry says what it is."""
    f1_a, f1_b = entry([0, 0, 1, 1] * 5, n_resamples=50), entry([1, 1, 1, 1] * 5, n_resamples=50)
    em_a, em_b = entry([0, 0, 1, 1] * 5, binary=True, n_resamples=50), entry([1] * 20, binary=True, n_resamples=50)
    a = {"f1": f1_a, "em": em_a, "bleu": {"estimate": 1.0, "low": 0.5, "high": 1.5, "n": 20},
         "short": entry([1, 0], n_resamples=50), "only_a": f1_a}
    b = {"f1": f1_b, "em": em_b, "bleu": {"estimate": 2.0, "low": 1.5, "high": 2.5, "n": 20},
         "short": entry([1, 0, 1], n_resamples=50)}
    out = compare(a, b, n_resamples=200)
    assert set(out) == {"f1", "em"}
    assert out["f1"]["test"] == "paired_bootstrap" and out["em"]["test"] == "mcnemar"
    assert out["em"]["p_value"] == pytest.approx(2 / 2**10)  # b = 0, c = 10: exact, 2 * P(X <= 0)


def test_markdown_table_marks_non_significant_differences():
    base = {"em": entry([1, 0] * 30, binary=True, n_resamples=200), "bleu": corpus_bleu_entry(PREDS, REFS, 100)}
    better = {"em": entry([1, 1] * 30, binary=True, n_resamples=200)}  # 30 discordant pairs, all for B
    # 60 discordant pairs, 30 each way: chi-square (|30 - 30| - 1)^2 / 60 = 1/60, p = erfc(sqrt(1/120)) = 0.897
    same = {"em": entry([0, 1] * 30, binary=True, n_resamples=200)}
    table = markdown_table({"base": base, "better": better, "same": same}, baseline="base")
    lines = table.splitlines()
    assert lines[0] == "| metric | base | better | same |"
    em = next(line for line in lines if line.startswith("| em |"))
    cells = [c.strip() for c in em.strip("|").split("|")]
    assert cells[1].startswith("0.500 [") and "(" not in cells[1]  # the baseline gets no difference
    assert "+0.500" in cells[2] and "n.s." not in cells[2]
    assert f"+0.000, p={math.erfc(math.sqrt(1 / 120)):.3g}, n.s." in cells[3]
    bleu = next(line for line in lines if line.startswith("| bleu |"))
    assert bleu.rstrip().endswith("|  |  |")  # the other models have no BLEU
    assert without_scores(base)["em"].keys() == {"estimate", "low", "high", "n", "binary"}
