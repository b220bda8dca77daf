import re

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from unipipe_ray.eval.metrics import (
    bleu,
    chrf,
    exact_match,
    normalize_answer,
    preference_accuracy,
    rouge_scores,
    sentence_bleu_scores,
    sentence_chrf_scores,
    token_f1,
    token_f1_scores,
    win_rate,
)

PREDS = ["the cat sat on the mat", "A quick brown fox jumps.", "", "completely different words"]
REFS = ["the cat sat on a mat", "The quick brown fox jumped over the dog", "something", "nothing alike here"]


def test_normalize_answer_squad_rules():
    """lowercase, punctuation out, articles out (whole words only: 'theatre' stays), whitespace collapsed."""
    assert normalize_answer("  The  Cat's   hat, an apple!  ") == "cats hat apple"
    assert normalize_answer("theatre another") == "theatre another"
    assert normalize_answer("") == ""
    assert normalize_answer("the a an ...") == ""


def test_exact_match_normalised_and_edge_cases():
    preds = ["The Answer.", "paris", "", "the", "42"]
    refs = ["answer", "Paris!", "", "", "forty-two"]
    # 'The Answer.' -> 'answer'; 'the' normalises to '' like the empty reference; 42 != forty-two.
    assert exact_match(preds, refs) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_exact_match_with_checker_gsm8k_style():
    """A task checker decides, not string equality: compare the number after '####'."""

    def checker(pred, ref):
        m = re.search(r"####\s*(-?[\d,]+)", pred)
        return m is not None and m.group(1).replace(",", "") == ref.split("####")[-1].strip()

    preds = ["so 3 + 4 = 7 #### 7", "#### 1,000", "the answer is 7"]
    refs = ["3 + 4 = 7\n#### 7", "#### 1000", "#### 7"]
    assert exact_match(preds, refs, checker=checker) == [1.0, 1.0, 0.0]


def test_token_f1_hand_values():
    """'The cat sat' vs 'a cat sat down': tokens [cat, sat] vs [cat, sat, down]; common 2,
    P = 2/2, R = 2/3, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
    'cat cat dog' vs 'cat dog dog': bag overlap min counts cat 1 + dog 1 = 2, P = R = 2/3, F1 = 2/3."""
    assert token_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert token_f1("Paris.", "paris") == 1.0
    assert token_f1("red", "blue") == 0.0


def test_token_f1_empty_sides():
    """SQuAD v2 rule: if either side normalises to no tokens, F1 = 1 when both do, else 0."""
    assert token_f1("", "") == 1.0
    assert token_f1("the", "an.") == 1.0
    assert token_f1("", "paris") == 0.0
    assert token_f1("paris", "the") == 0.0
    assert token_f1_scores(["The cat sat", ""], ["a cat sat down", ""]) == pytest.approx([0.8, 1.0])


def test_bleu_hand_value():
    """'the cat sat on the mat' vs 'the cat sat on a mat' (13a tokens, same length so BP = 1).
    Clipped n-gram precisions: 1-gram 5/6 ('the' twice, once in ref), 2-gram 3/5, 3-gram 2/4, 4-gram 1/3.
    BLEU = 100 * (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25 = 53.7285.
    No n-gram order has zero matches, so sentence BLEU's smoothing changes nothing."""
    assert bleu([PREDS[0]], [REFS[0]]) == pytest.approx(100 * (1 / 12) ** 0.25)
    assert sentence_bleu_scores([PREDS[0]], [REFS[0]]) == pytest.approx([100 * (1 / 12) ** 0.25])
    assert bleu(["same words here today"], ["same words here today"]) == pytest.approx(100.0)


def test_bleu_and_chrf_match_sacrebleu():
    assert bleu(PREDS, REFS) == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert chrf(PREDS, REFS) == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    assert sentence_bleu_scores(PREDS, REFS) == pytest.approx(
        [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS)]
    )
    assert sentence_chrf_scores(PREDS, REFS) == pytest.approx(
        [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(PREDS, REFS)]
    )
    assert sentence_chrf_scores(["identical text"], ["identical text"]) == pytest.approx([100.0])


def test_rouge_hand_values_and_stemming():
    """'the cat sat' vs reference 'the cat sat on the mat':
    rouge1 P = 3/3, R = 3/6, F = 2 * 1 * 0.5 / 1.5 = 2/3; rouge2 bigrams 2 of 2 vs 2 of 5, F = 2 * 0.4 / 1.4 = 4/7;
    rougeL LCS = 3 so the same as rouge1, 2/3. With the Porter stemmer 'cats running' == 'cat run'."""
    out = rouge_scores(["the cat sat", "cats running"], ["the cat sat on the mat", "cat run"])
    assert out["rouge1"] == pytest.approx([2 / 3, 1.0])
    assert out["rouge2"] == pytest.approx([4 / 7, 1.0])
    assert out["rougeL"] == pytest.approx([2 / 3, 1.0])


def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = rouge_scores(PREDS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert out[key] == pytest.approx([scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS)])


def test_preference_accuracy_and_win_rate_with_ties():
    """chosen vs rejected [2>1, 0<3, 1==1] -> [1, 0, 0.5]; mean 0.5. Same rule for the judge's A vs B scores."""
    assert preference_accuracy([2.0, 0.0, 1.0], [1.0, 3.0, 1.0]) == [1.0, 0.0, 0.5]
    assert win_rate([9, 4, 7, 7], [3, 8, 7, 1]) == [1.0, 0.0, 0.5, 1.0]


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        win_rate([1.0], [])
