"""Evaluation with statistics, and active selection of pairs to annotate.

    metrics.py     per-example exact match, token F1, BLEU / chrF (sacrebleu), ROUGE (rouge-score), ...
    stats.py       bootstrap intervals (percentile, BCa), paired bootstrap, McNemar, sign test
    summary.py     entries (figure + 95% interval + per-example scores), compare, markdown_table
    scoring.py     reward-model scores, sequence log-probs, DPO implicit rewards of (prompt, response) lists
    evaluate.py    generate_completions, evaluate_generations, preference / implicit-reward accuracy,
                   win rate, evaluate_model
    select.py      uncertainty (ensemble disagreement, margin near zero) and top-k selection
    cli.py         `unipipe eval` and `unipipe select`
    generation.py  greedy generation (the SFT demo's answer accuracy)

API for a report that evaluates several models (e.g. every stage's checkpoint) on one held-out set:

    from unipipe_ray.eval.evaluate import evaluate_model
    from unipipe_ray.eval.summary import compare, markdown_table, without_scores

    results = {name: evaluate_model(path, task, examples, pairs=pairs, reward_model=rm_path,
                                    ref_model=sft_path if name == "dpo" else None)
               for name, path in {"sft": sft_path, "dpo": dpo_path}.items()}
    table = markdown_table(results, baseline="sft")        # "n.s." marks differences with p >= 0.05
    diffs = compare(results["sft"], results["dpo"])        # {metric: {diff, low, high, p_value, test, significant}}
    json.dump({k: without_scores(r) for k, r in results.items()}, f)

evaluate_model(...) -> {metric: {"estimate", "low", "high", "n", "scores", ...}}: metrics exact_match (tasks
with a gold checker), token_f1, bleu (corpus), sentence_bleu, chrf, rouge1, rouge2, rougeL, and with a
reward model rm_score / rm_accuracy, with a reference model implicit_accuracy. Intervals are 95% percentile
bootstrap intervals over examples; comparisons are paired over the same examples (McNemar for exact match,
paired bootstrap otherwise). summary.py, stats.py and metrics.py need only numpy (sacrebleu / rouge-score
inside the functions); scoring.py and select.py import torch, and transformers where they load models.
"""
