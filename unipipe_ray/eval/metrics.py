"""Per-example evaluation metrics: exact match, token F1, BLEU, chrF, ROUGE, preference accuracy, win rate.

Every function returns one score per example (corpus BLEU/chrF also a corpus number), so the statistics in
``eval/stats.py`` (bootstrap intervals, paired tests) can run over examples. sacrebleu and rouge-score are
imported inside the functions that use them: importing the package stays cheap.

Scales: exact match, token F1, ROUGE, preference accuracy and win rate are in [0, 1]; BLEU and chrF keep
sacrebleu's 0-100 scale so they match numbers reported with sacrebleu.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (Rajpurkar et al., 2016, official eval script): lowercase, drop punctuation,
    drop the articles a/an/the, collapse whitespace. Same order as the script (punctuation before articles)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _check_lengths(a: Sequence, b: Sequence) -> None:
    # sacrebleu's corpus functions would score misaligned pairs or fail obscurely; fail loudly instead.
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")


def exact_match(
    predictions: Sequence[str], references: Sequence, checker: Callable[[str, object], bool] | None = None
) -> list[float]:
    """1.0 / 0.0 per example. With ``checker(pred, ref) -> bool`` (a task's own answer check, e.g. GSM8K
    compares the number after ``####``) that decides; otherwise SQuAD-normalised string equality."""
    if checker is None:
        return [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references, strict=True)]
    return [float(bool(checker(p, r))) for p, r in zip(predictions, references, strict=True)]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the bag of normalised tokens.
    If either side normalises to nothing, the score is 1.0 when both do and 0.0 otherwise (SQuAD v2 rule)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """``token_f1`` per example."""
    return [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (Papineni et al., 2002) via sacrebleu defaults (13a tokenizer, one reference per example),
    0-100. Corpus BLEU is not the mean of sentence BLEU: n-gram counts are pooled before the geometric mean."""
    import sacrebleu

    _check_lengths(predictions, references)
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def sentence_bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Sentence BLEU per example (sacrebleu.sentence_bleu: exp smoothing, effective order), 0-100."""
    import sacrebleu

    return [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references, strict=True)]


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (Popovic, 2015) via sacrebleu defaults (character 6-grams, beta 2), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score


def sentence_chrf_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """chrF per example (sacrebleu.sentence_chrf), 0-100."""
    import sacrebleu

    return [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(predictions, references, strict=True)]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ROUGE F-measures (Lin, 2004) for rouge1, rouge2, rougeL, via rouge-score with the Porter
    stemmer. rougeL is sentence-level LCS (not rougeLsum)."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)  # rouge-score's order is (target, prediction)
        for k in keys:
            out[k].append(float(scores[k].fmeasure))
    return out


def _compare(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """1.0 where a > b, 0.5 where a == b, 0.0 where a < b."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def preference_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> list[float]:
    """Per pair: 1.0 if the model scores the chosen response above the rejected one, 0.0 if below.
    Ties count 0.5: a reward model that scores everything equal then sits at chance (0.5), not at 0 or 1."""
    return _compare(chosen_scores, rejected_scores)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float]) -> list[float]:
    """Per prompt, from A's side: 1.0 if the judge scores A's response higher, 0.5 on a tie, 0.0 if lower.
    The mean is A's win rate against B with ties split evenly."""
    return _compare(scores_a, scores_b)
