"""evaluate_generations / win rate by hand, evaluate_model without generation, and `unipipe eval` end to end on
tiny models (the CLI's main())."""

import json

import pytest
import sacrebleu
import torch

from unipipe_ray.cli import main
from unipipe_ray.core.models import load_tokenizer, tiny_model_dir
from unipipe_ray.data import get_task
from unipipe_ray.eval.evaluate import evaluate_generations, evaluate_model, judge_scores, win_rate_of


@pytest.fixture(scope="module")
def arith():
    task = get_task("arith", n=40, seed=3)
    return task, task.sft_examples()[:4]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """The tiny Llama with a seeded random reward head, saved like an RM-stage checkpoint."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir(), num_labels=1).save_pretrained(out)
    load_tokenizer("tiny").save_pretrained(out)
    return str(out)


def test_evaluate_generations_hand_values(arith):
    """Completions: the reference itself; the reference with its final answer changed; the last line only
    ('#### n', right answer); nothing. Exact match (task checker on '#### n'): [1, 0, 1, 0].
    Token F1 of the reference against itself is 1; of '' against anything 0 (SQuAD rule)."""
    task, examples = arith
    refs = [ex.response for ex in examples]
    wrong = refs[1].rsplit("####", 1)[0] + f"#### {int(examples[1].meta['answer']) + 1}"
    completions = [refs[0], wrong, f"#### {examples[2].meta['answer']}", ""]
    out = evaluate_generations(completions, examples, task, n_resamples=200)
    assert out["exact_match"]["scores"] == [1.0, 0.0, 1.0, 0.0] and out["exact_match"]["binary"]
    assert out["exact_match"]["estimate"] == 0.5
    assert out["token_f1"]["scores"][0] == 1.0 and out["token_f1"]["scores"][3] == 0.0
    assert out["rouge1"]["scores"][0] == pytest.approx(1.0)
    assert out["sentence_bleu"]["scores"][0] == pytest.approx(100.0)
    assert out["bleu"]["estimate"] == pytest.approx(sacrebleu.corpus_bleu(completions, [refs]).score)
    assert "scores" not in out["bleu"]
    for e in out.values():
        assert e["low"] <= e["estimate"] <= e["high"] and e["n"] == 4


def test_evaluate_generations_without_checker_or_references(arith):
    task, examples = arith
    no_checker = evaluate_generations(["x"] * 4, examples, task=None, n_resamples=50)
    assert "exact_match" not in no_checker and "token_f1" in no_checker
    prompts = task.prompts()[:4]  # PromptExample: no response, no meta["solution"] -> checker only
    only_em = evaluate_generations(["#### 0"] * 4, prompts, task, n_resamples=50)
    assert set(only_em) == {"exact_match"}
    with pytest.raises(ValueError, match="3 completions for 4 examples"):
        evaluate_generations(["a"] * 3, examples, task)


def test_win_rate_hand_case():
    """A vs B judge scores (1, 0), (0, 0), (1, 0), (1, 1): wins [1, 0.5, 1, 0.5] -> 0.75; sign test on the
    2 non-ties, both A's: p = 2 * P(X <= 0 | 2, 1/2) = 0.5."""
    out = win_rate_of([1, 0, 1, 1], [0, 0, 0, 1], n_resamples=200)
    assert out["scores"] == [1.0, 0.5, 1.0, 0.5] and out["estimate"] == 0.75
    assert (out["wins"], out["losses"], out["ties"], out["p_value"]) == (2, 0, 2, 0.5)


def test_judge_needs_rm_or_checker(arith):
    task, examples = arith
    assert judge_scores(examples[:2], [examples[0].response, "no"], task=task).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs a judge"):
        judge_scores(examples[:2], ["a", "b"])


def test_evaluate_model_with_given_completions(arith, reward_model):
    """No generation when completions are given. A DPO policy equal to its reference has implicit reward 0
    for every response: every pair ties, accuracy exactly 0.5 and margin 0."""
    task, examples = arith
    pairs = task.preference_pairs()[:3]
    tiny = str(tiny_model_dir())
    out = evaluate_model(tiny, task, examples, pairs=pairs, reward_model=reward_model, ref_model=tiny,
                         completions=[ex.response for ex in examples], n_resamples=100, progress=False)
    assert out["exact_match"]["estimate"] == 1.0 and out["token_f1"]["estimate"] == 1.0
    assert out["implicit_accuracy"]["scores"] == [0.5, 0.5, 0.5] and out["implicit_accuracy"]["margin_mean"] == 0
    assert out["rm_accuracy"]["n"] == 3 and out["rm_score"]["n"] == 4


def test_unipipe_eval_end_to_end(tmp_path, reward_model, capsys):
    """Model A = tiny (seed 0), B = another tiny (seed 1), judged by the tiny RM: every figure has an
    interval, comparisons and the win rate have p-values, JSON + markdown are written."""
    out = tmp_path / "res" / "eval.json"
    a, b = str(tiny_model_dir()), str(tiny_model_dir(seed=1))
    argv = ["eval", "--model", a, "--task", "arith", "--n", "6", "--max-new-tokens", "8", "--reward-model",
            reward_model, "--baseline-model", b, "--ref-model", b, "--n-resamples", "200", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    metrics = record["metrics"]["A"]
    assert {"exact_match", "token_f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rm_score", "rm_accuracy",
            "implicit_accuracy"} <= set(metrics)
    for name, e in [*metrics.items(), *record["metrics"]["B"].items()]:
        assert e["low"] <= e["estimate"] <= e["high"], name
        assert e["n"] == (6 if name not in ("rm_accuracy", "implicit_accuracy") else e["n"])
    assert "rm_accuracy" not in record["metrics"]["B"]
    comparison = record["comparison_A_minus_B"]
    assert comparison["exact_match"]["test"] == "mcnemar" and comparison["chrf"]["test"] == "paired_bootstrap"
    assert all(0 < c["p_value"] <= 1 for c in comparison.values())
    win = record["win_rate_A_over_B"]
    assert win["judge"] == reward_model and win["wins"] + win["losses"] + win["ties"] == 6
    assert len(record["completions"]["A"]) == 6
    markdown = out.with_suffix(".md").read_text()
    assert "| exact_match |" in markdown and "win rate of A over B" in markdown
    chrf_line = next(line for line in markdown.splitlines() if line.startswith("| chrf |"))
    assert f"p={comparison['chrf']['p_value']:.3g}" in chrf_line  # the table and the JSON agree
    assert "# unipipe eval: arith, 6 held-out examples" in capsys.readouterr().out


def test_unipipe_eval_held_out_split_matches_the_stages():
    """`--n N --seed S` evaluates the stages' own held-out examples (stage_examples' eval split)."""
    from argparse import Namespace

    from unipipe_ray.config import DataConfig
    from unipipe_ray.data.stage_data import stage_examples
    from unipipe_ray.eval.cli import _held_out

    args = Namespace(task="arith", task_path=None, n=16, seed=0, reward_model=None, ref_model=None, pairs=None)
    _, examples, pairs = _held_out(args)
    stage_eval = stage_examples(DataConfig(), "sft")[1]  # the stages' defaults: eval_size 64, seed 0
    assert [ex.source for ex in examples] == [ex.source for ex in stage_eval[:16]] and pairs is None


def test_unipipe_eval_bad_input_exit_2(tmp_path, capsys):
    assert main(["eval", "--model", "tiny", "--task", "gsm8k", "--n", "2"]) == 2
    assert "--task gsm8k reads a data file: pass --task-path" in capsys.readouterr().err
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    assert main(["eval", "--model", "tiny", "--task", "arith", "--n", "2", "--reward-model", "tiny",
                 "--pairs", str(bad), "--max-new-tokens", "2", "--no-progress", "--out",
                 str(tmp_path / "e.json")]) == 2
    assert f"{bad}:2: missing field 'rejected'" in capsys.readouterr().err


def test_greedy_answers_load_the_weights_in_the_dtype_asked(arith, monkeypatch):
    """evaluate_model(dtype=...) reaches the engine that answers: the report's eval_dtype is not a label only."""
    import unipipe_ray.ppo.rollout as rollout

    engines = []
    real = rollout.make_rollout_engine

    def recording(*args, **kwargs):
        engines.append(real(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(rollout, "make_rollout_engine", recording)
    task, examples = arith
    for dtype in ("bfloat16", "float32"):
        out = evaluate_model("tiny", task, examples, max_new_tokens=4, progress=False, dtype=dtype)
        assert out["exact_match"]["n"] == len(examples)
        assert engines[-1].model.dtype == getattr(torch, dtype)


def test_auto_inference_dtype_follows_the_hardware(monkeypatch):
    from unipipe_ray.runtime.devices import inference_dtype

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"),
                                       (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert inference_dtype("auto", cpu) == expected
    assert inference_dtype("float32", cpu) == "float32" and inference_dtype("bfloat16", cpu) == "bfloat16"
    with pytest.raises(ValueError, match="unknown dtype"):
        inference_dtype("float8", cpu)
