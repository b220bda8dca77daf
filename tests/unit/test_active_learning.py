"""The active-learning experiment (experiments/active_learning.py): its head training on a problem with a known
answer, and its smoke mode end to end on a tiny model and a small HH-format file."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "active_learning.py"


@pytest.fixture(scope="module")
def al():
    spec = importlib.util.spec_from_file_location("active_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _separable(n, h=8, seed=0):
    """Pairs whose chosen side is higher along a known direction: a linear head can rank all of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, h, generator=g, dtype=torch.float64)
    direction = torch.zeros(h, dtype=torch.float64)
    direction[0] = 1.0
    flip = (x[:, 0] @ direction) < (x[:, 1] @ direction)
    x[flip] = x[flip].flip(1)  # put the higher one first: chosen
    return x


def test_train_head_learns_a_linear_preference(al):
    """Bradley-Terry on separable pairs: held-out accuracy near 1, and the head points along the true
    direction. Swapping chosen and rejected flips every margin (accuracy 1 - acc)."""
    train, test = _separable(200), _separable(200, seed=1)
    w = al.train_head(train, weight_decay=0.01)
    assert al.accuracy(w, test) > 0.95
    assert w[0] / w.norm() > 0.9
    assert al.accuracy(w, test.flip(1)) == pytest.approx(1 - al.accuracy(w, test))


def test_weight_decay_shrinks_the_head(al):
    x = _separable(50)
    assert al.train_head(x, 100.0).norm() < 0.2 * al.train_head(x, 0.01).norm()


def test_choose_picks_only_unlabelled_and_respects_budget(al):
    pool = _separable(60)
    args = type("Args", (), {"weight_decay": 1.0, "ensemble": 3})
    labelled, unlabelled = list(range(10)), list(range(10, 60))
    for arm in al.ARMS:
        picked = al.choose(arm, labelled, unlabelled, 7, pool, args, np.random.default_rng(0))
        assert len(picked) == len(set(picked)) == 7 and set(picked) <= set(unlabelled)


def test_margin_arm_picks_the_smallest_margins(al):
    """The margin arm labels the pairs the current head is least sure about: recompute and compare."""
    pool = _separable(40)
    args = type("Args", (), {"weight_decay": 1.0, "ensemble": 3})
    labelled, unlabelled = list(range(8)), list(range(8, 40))
    picked = al.choose("margin", labelled, unlabelled, 5, pool, args, np.random.default_rng(0))
    m = np.abs(al.pair_margins(al.train_head(pool[labelled], 1.0), pool[unlabelled]))
    assert sorted(picked) == sorted(np.array(unlabelled)[np.argsort(m)[:5]].tolist())


def test_smoke_mode_end_to_end(al, tmp_path):
    """Tiny model, 36 HH-format pairs, 2 seeds: every arm and k reported, per-seed accuracies in [0, 1],
    paired comparisons present; the second run reuses the cached features."""
    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: A helpful, careful answer number {i}.",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no {i}"} for i in range(36)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--data", str(data), "--model", "tiny", "--pool", "20", "--test", "12", "--seed-size", "4",
            "--ks", "4", "8", "--rounds", "2", "--seeds", "2", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out" / "al"), "--threads", "1"]
    result = al.main(argv)
    assert set(result["summary"]["arms"]) == set(al.ARMS)
    for arm in al.ARMS:
        for k in (4, 8):
            assert all(0 <= s[arm][k] <= 1 for s in result["per_seed"])
    assert set(result["summary"]["vs_random"]["ensemble"]) == {4, 8}
    saved = json.loads((tmp_path / "out" / "al.json").read_text())
    assert saved["settings"]["ks"] == [4, 8] and (tmp_path / "out" / "al_table.md").exists()
    assert al.main(argv)["data"]["cache"] == result["data"]["cache"]
