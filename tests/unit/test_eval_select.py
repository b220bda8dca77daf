"""Active selection: uncertainty math by hand, candidate parsing with file:line errors, model scores checked
against an unbatched recomputation, and `unipipe select` on tiny models."""

import json

import numpy as np
import pytest
import torch

from unipipe_ray.cli import main
from unipipe_ray.core.models import load_tokenizer, tiny_model_dir
from unipipe_ray.data import DataError
from unipipe_ray.eval.scoring import load_policy, load_reward_model, reward_scores, text_response_logps
from unipipe_ray.eval.select import (
    Candidate,
    ensemble_disagreement,
    margin_uncertainty,
    parse_candidate,
    read_candidates,
    top_k,
)

PROMPT = [{"role": "user", "content": "How do I stay safe online?"}]
PAIRS = [
    {"prompt": "How do I stay safe online?", "responses": ["Use strong passwords.", "I will not help."]},
    {"prompt": "Tell me a joke", "chosen": "Why did the chicken cross the road?", "rejected": "No."},
    {"chosen": "\n\nHuman: hi\n\nAssistant: Hello! How can I help you today?",
     "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "responses": ["4", "It is 4, of course, as "
                                                                           "everyone learns in school."]},
    {"prompt": "Name a colour", "responses": ["Blue", "Red"], "id": 7},
]


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    """Two tiny reward models: the tiny Llama body with differently seeded random heads, saved like the
    RM stage's checkpoints (so every load gives the same head)."""
    from transformers import AutoModelForSequenceClassification

    paths = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"rm{seed}")
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir(), num_labels=1)
        model.save_pretrained(out)
        load_tokenizer("tiny").save_pretrained(out)
        paths.append(str(out))
    return paths


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_ensemble_disagreement_hand_case():
    """Model 1 margins [1, -1, 1, -1], model 2 [1, 1, -1, -1]: both have std 1, so scaling keeps them.
    Per pair the two models say (1, 1), (-1, 1), (1, -1), (-1, -1): sample std 0, sqrt(2), sqrt(2), 0.
    Multiplying one model's margins by 10 changes nothing (scaled by its own spread)."""
    margins = np.array([[1.0, -1, 1, -1], [1, 1, -1, -1]])
    np.testing.assert_allclose(ensemble_disagreement(margins), [0, np.sqrt(2), np.sqrt(2), 0], atol=1e-12)
    np.testing.assert_allclose(ensemble_disagreement(margins * [[1], [10]]), [0, np.sqrt(2), np.sqrt(2), 0],
                               atol=1e-12)
    with pytest.raises(ValueError):
        ensemble_disagreement(margins[:1])


def test_margin_uncertainty_and_top_k():
    """-|margin|: [-3, 0.1, 2] -> [-3, -0.1, -2]; the most uncertain first: indices 1, 2, 0.
    Ties keep input order."""
    scores = margin_uncertainty([-3.0, 0.1, 2.0])
    np.testing.assert_allclose(scores, [-3, -0.1, -2])
    assert top_k(scores, 2).tolist() == [1, 2]
    assert top_k([0.5, 1.0, 1.0, 0.5], 4).tolist() == [1, 2, 0, 3]
    assert top_k([1.0], 5).tolist() == [0]
    with pytest.raises(ValueError):
        top_k([1.0], 0)


def test_parse_candidate_formats():
    a = parse_candidate(PAIRS[0], "c.jsonl:1")
    assert (a.response_a, a.response_b, a.source) == ("Use strong passwords.", "I will not help.", "c.jsonl:1")
    assert a.prompt == tuple(PROMPT)
    b = parse_candidate(PAIRS[2], "c.jsonl:3")  # HH full text: labels ignored, order kept
    assert b.response_a.startswith("Hello!") and b.response_b == "go away"
    assert parse_candidate(PAIRS[4], "c.jsonl:5").meta == {"id": 7}
    p = parse_candidate({"prompt": "just a prompt"}, "c.jsonl:6")
    assert p.response_a is None and p.response_b is None


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "responses": ["only one"]}, "expected a list of two non-empty strings"),
    ({"prompt": "x", "responses": ["same", " same "]}, "identical"),
    ({"responses": ["a", "b"]}, "missing field 'prompt'"),
    ("[1, 2", "malformed JSON"),
])
def test_bad_candidate_names_file_and_line(tmp_path, record, message):
    path = _write(tmp_path / "cands.jsonl", [PAIRS[0], record])
    with pytest.raises(DataError, match=message) as e:
        read_candidates(path)
    assert f"{path}:2" in str(e.value)


def test_reward_scores_match_unbatched_recomputation(reward_models):
    """Batched, length-sorted scoring == one sequence at a time, pooled by hand at the last token."""
    model, tok = load_reward_model(reward_models[0])
    prompts = [tuple(PROMPT), ({"role": "user", "content": "hi"},), tuple(PROMPT)]
    responses = ["A long answer " * 5, "short", "medium length answer"]
    batched = reward_scores(model, tok, prompts, responses, progress=False)
    from unipipe_ray.data.tokenize import prompt_ids, response_ids

    for p, r, got in zip(prompts, responses, batched):
        ids = torch.tensor([prompt_ids(p, tok) + response_ids(r, tok)])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            assert got == pytest.approx(float(model.score(hidden)), abs=1e-5)


def test_response_logps_match_unbatched_recomputation():
    """Sum of log p(response tokens + EOS | prompt) from one plain forward per sequence."""
    model, tok = load_policy(str(tiny_model_dir()))
    from unipipe_ray.data.tokenize import prompt_ids, response_ids

    prompts, responses = [tuple(PROMPT)] * 2, ["Use strong passwords and a password manager.", "No."]
    batched = text_response_logps(model, tok, prompts, responses, progress=False)
    for p, r, got in zip(prompts, responses, batched):
        prompt, response = prompt_ids(p, tok), response_ids(r, tok)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].log_softmax(-1)
        expected = sum(float(logits[len(prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(response))
        assert got == pytest.approx(expected, abs=1e-3)


def test_select_ensemble_cli_writes_top_k(tmp_path, reward_models, capsys):
    from unipipe_ray.eval.select import ensemble_disagreement, rm_margins

    src = _write(tmp_path / "cands.jsonl", PAIRS)
    out = tmp_path / "picked" / "top.jsonl"
    argv = ["select", "--input", src, "--k", "3", "--out", str(out), "--reward-models", *reward_models,
            "--no-progress"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert all(rows[i]["score"] >= rows[i + 1]["score"] for i in range(2))
    # The chosen rows are the 3 largest disagreements, recomputed from the two models' margins.
    candidates = read_candidates(src)
    expected = ensemble_disagreement(rm_margins(candidates, reward_models, progress=False))
    assert [r["source"] for r in rows] == [candidates[i].source for i in np.argsort(-expected, kind="stable")[:3]]
    assert [r["score"] for r in rows] == pytest.approx(sorted(expected, reverse=True)[:3])
    assert rows[0]["prompt"][-1]["role"] == "user" and len(rows[0]["margins"]) == 2
    assert "wrote the 3 most uncertain of 5 candidates" in capsys.readouterr().out


def test_select_margin_dpo_policy_equal_to_reference_is_all_ties(tmp_path):
    """policy == reference: every implicit margin is exactly 0, so every score is -0 and the ranking is the
    input order (stable ties)."""
    src = _write(tmp_path / "cands.jsonl", PAIRS)
    out = tmp_path / "top.jsonl"
    tiny = str(tiny_model_dir())
    assert main(["select", "--input", src, "--k", "5", "--out", str(out), "--method", "margin", "--model", tiny,
                 "--ref-model", tiny, "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == [f"{src}:{i}" for i in range(1, 6)]
    assert all(r["margins"] == [0.0] and r["score"] == 0.0 for r in rows)


def test_select_samples_pairs_for_prompts(tmp_path, reward_models):
    src = _write(tmp_path / "prompts.jsonl", [{"prompt": "Say something"}, {"prompt": "Name a fruit"}])
    out = tmp_path / "top.jsonl"
    assert main(["select", "--input", src, "--k", "1", "--out", str(out), "--method", "margin",
                 "--reward-models", reward_models[0], "--model", str(tiny_model_dir()), "--max-new-tokens", "6",
                 "--no-progress"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["response_a"] != row["response_b"] and row["rank"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--reward-models", "x"], "--method ensemble needs at least 2 --reward-models"),
    (["--method", "margin"], "--method margin needs --model and --ref-model"),
    (["--k", "0", "--reward-models", "a", "b"], "--k must be >= 1"),
])
def test_select_bad_options_exit_2(tmp_path, capsys, extra, message):
    src = _write(tmp_path / "c.jsonl", PAIRS)
    argv = ["select", "--input", src, "--k", "2", "--out", str(tmp_path / "o.jsonl"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_select_bad_input_exit_2_naming_line(tmp_path, capsys, reward_models):
    src = _write(tmp_path / "c.jsonl", [PAIRS[0], {"prompt": "needs sampling"}])
    argv = ["select", "--input", src, "--k", "1", "--out", str(tmp_path / "o.jsonl"),
            "--reward-models", *reward_models]
    assert main(argv) == 2
    assert f"{src}:2: a prompt without responses: pass --model" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.jsonl", [PAIRS[0], PAIRS[1], '{"prompt": "x", "responses": 3}'])
    assert main(["select", "--input", bad, "--k", "1", "--out", str(tmp_path / "o.jsonl"),
                 "--reward-models", *reward_models]) == 2
    assert f"{bad}:3: field 'responses'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_candidate_is_frozen():
    c = Candidate(tuple(PROMPT), "a", "b", "x:1")
    with pytest.raises(AttributeError):
        c.response_a = "z"
