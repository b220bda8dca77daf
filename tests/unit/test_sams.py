import io
import math
import subprocess
import sys

import pytest
import torch

from unipipe_ray.core.sams import (
    SamsScheduler,
    SamsSettings,
    arm_labels,
    batch_reward,
    layer_features,
    sample_reward,
)
from unipipe_ray.core.sams_nets import downsample

torch.set_num_threads(1)

D, L = 8, 3  # policy hidden size and layer count of the synthetic batches
TINY = dict(
    encoder="learned",
    connector_width=16,
    context_size=8,
    encoder_layers=1,
    encoder_heads=2,
    encoder_ff_width=16,
    depth=2,
    width=16,
    explore_downsample=4,
    train_steps=2,
    replay_batches=4,
    pool_size=5,
)


def tiny(seed=0, **overrides):
    return SamsScheduler(hidden_size=D, num_layers=L, config=SamsSettings(**{**TINY, **overrides}), seed=seed)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def batch(gen, n=8, T=6):
    """Random (chosen_hidden, rejected_hidden, chosen_mask, rejected_mask) with right padding of varied length."""
    chosen = tuple(torch.randn(n, T, D, generator=gen) for _ in range(L))
    rejected = tuple(torch.randn(n, T, D, generator=gen) for _ in range(L))
    lengths = torch.randint(1, T + 1, (2, n), generator=gen)
    positions = torch.arange(T)
    return chosen, rejected, positions < lengths[0, :, None], positions < lengths[1, :, None]


def features(gen, n=8):
    return layer_features(*batch(gen, n))


def test_batch_reward_two_rounds_hand_values():
    """Round 1: M0 = -0.5, M1 = -0.6: r_B = 0.1 / 0.6 = 1/6, no past -> s = 1/6, sigma_B = sigmoid(50/6 + 0.5)
    = sigmoid(8.8333) = 0.99985. Round 2: M2 = -0.54: r_B = -0.06 / 0.6 = -0.1, past mean 1/6 ->
    s = -0.05 + 1/12 = 1/30, sigma_B = sigmoid(50/30 + 0.5) = sigmoid(2.1667) = 0.897216.
    Both M = 0: r_B = 0 (guard), sigma_B = sigmoid(0.5) = 0.62246."""
    reward, raw = batch_reward(-0.5, -0.6)
    assert raw == pytest.approx(1 / 6) and reward == pytest.approx(0.9998542, abs=1e-6)
    reward, raw = batch_reward(-0.6, -0.54, past_mean=1 / 6)
    assert raw == pytest.approx(-0.1) and reward == pytest.approx(0.8972160, abs=1e-6)
    assert batch_reward(0.0, 0.0) == (pytest.approx(0.6224593), 0.0)


def test_sample_reward_hand_values_and_constant_batch_guard():
    """margins [0, 1, 2] -> g = [0, .5, 1]; chosen_logps [-3, -1, -2] -> g = [0, 1, .5], 1 - g = [1, 0, .5];
    r_S = 0.5 g + 0.5 (1 - g) = [0.5, 0.25, 0.75]. Constant margins [1, 1, 1] -> g = 0.5 (guard):
    r_S = 0.25 + 0.5 [1, 0, .5] = [0.75, 0.25, 0.5]."""
    chosen_logps = torch.tensor([-3.0, -1.0, -2.0])
    torch.testing.assert_close(
        sample_reward(torch.tensor([0.0, 1.0, 2.0]), chosen_logps), torch.tensor([0.5, 0.25, 0.75])
    )
    torch.testing.assert_close(sample_reward(torch.ones(3), chosen_logps), torch.tensor([0.75, 0.25, 0.5]))


def test_arm_labels_hand_values():
    """gamma 0.5: 0.5 * 0.8 + 0.5 * [0.5, 0.25] = [0.65, 0.525]; gamma 0.2: 0.16 + 0.8 * [0.5, 0.25] = [0.56, 0.36]."""
    r_s = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(arm_labels(0.8, r_s), torch.tensor([0.65, 0.525]))
    torch.testing.assert_close(arm_labels(0.8, r_s, gamma=0.2), torch.tensor([0.56, 0.36]))


def test_scheduler_labels_follow_running_mean_over_two_rounds():
    """Constant margins logit(0.5), logit(0.6), logit(0.54) give M = -0.5, -0.6, -0.54 (the two-round example
    above). Constant margins -> g = 0.5; chosen_logps symmetric over the batch -> mean(1 - g) = 0.5, so the mean
    label over all pairs is 0.5 sigma_B + 0.5 (0.25 + 0.25) = 0.5 sigma_B + 0.25."""
    sched, gen = tiny(label_all_pairs=True), torch.Generator().manual_seed(0)
    chosen_logps = torch.linspace(-4, -1, 8)
    seen = []
    for p in (0.5, 0.6, 0.54):
        margins = torch.full((8,), math.log(p / (1 - p)))
        _, metrics = sched.step(features(gen), margins, chosen_logps, k=4)
        seen.append(metrics)
    assert seen[0] == {}
    for metrics, expected in zip(seen[1:], (sigmoid(50 / 6 + 0.5), sigmoid(50 / 30 + 0.5))):
        assert metrics["sams/batch_reward"] == pytest.approx(expected, abs=1e-5)
        assert metrics["sams/label_mean"] == pytest.approx(0.5 * expected + 0.25, abs=1e-5)


def test_layer_features_hand_value():
    """Layer 1: chosen [1, 2, 100 (pad)] -> 1.5, rejected [3, 5, 7] -> 5; feature 0.5 (1.5 + 5) = 3.25.
    Layer 2 is layer 1 times 10 -> 32.5."""
    chosen, rejected = torch.tensor([[[1.0], [2.0], [100.0]]]), torch.tensor([[[3.0], [5.0], [7.0]]])
    masks = torch.tensor([[True, True, False]]), torch.ones(1, 3, dtype=torch.bool)
    out = layer_features((chosen, 10 * chosen), (rejected, 10 * rejected), *masks)
    torch.testing.assert_close(out, torch.tensor([[[3.25], [32.5]]]))


def test_contexts_ignore_padding_and_have_unit_norm():
    gen = torch.Generator().manual_seed(1)
    chosen, rejected, chosen_mask, rejected_mask = batch(gen)
    noisy = [
        tuple(torch.where(m[..., None], h, torch.randn(h.shape, generator=gen) * 100) for h in hs)
        for hs, m in ((chosen, chosen_mask), (rejected, rejected_mask))
    ]
    noisy[0][0][~chosen_mask] = float("nan")  # a nan in padding must not leak either
    sched = tiny()
    first = sched.contexts(layer_features(chosen, rejected, chosen_mask, rejected_mask))
    second = sched.contexts(layer_features(noisy[0], noisy[1], chosen_mask, rejected_mask))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(8))


def test_topk_selection_keeps_the_highest_scores():
    sched, gen = tiny(), torch.Generator().manual_seed(2)
    contexts = sched.contexts(features(gen, n=12))
    keep = sched.select(contexts, 5)
    assert keep.tolist() == sorted(set(keep.tolist())) and len(keep) == 5
    assert set(keep.tolist()) == set(sched.scores(contexts).topk(5).indices.tolist())
    with pytest.raises(ValueError):
        sched.select(contexts, 13)


def test_softmax_selection_is_seeded():
    contexts = torch.nn.functional.normalize(torch.randn(32, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    picks = [tiny(seed, selection="softmax").select(contexts, 16).tolist() for seed in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2]
    for keep in picks:
        assert len(set(keep)) == 16 and all(0 <= i < 32 for i in keep)


def test_lagged_update_trains_and_fills_the_pool():
    """Fixed batch, margins fixed, chosen log-probs constant -> fixed labels
    y = 0.5 sigmoid(0.5) + 0.5 (0.5 g(margins) + 0.25) (r_B = 0 every round). f_S's eval MSE must drop, and below
    the labels' variance (it learns more than their mean)."""
    sched = tiny(label_all_pairs=True, lr=1e-2, train_steps=8, dropout=0.0)
    gen = torch.Generator().manual_seed(4)
    feats, margins, chosen_logps = features(gen, n=16), torch.randn(16, generator=gen), torch.full((16,), -2.0)
    contexts = sched.contexts(feats)
    labels = arm_labels(sigmoid(0.5), sample_reward(margins, chosen_logps))

    def mse():
        return torch.nn.functional.mse_loss(sched.nets["exploit"](contexts)[0], labels).item()

    before = mse()
    for _ in range(20):
        sched.step(feats, margins, chosen_logps, k=8)
    assert mse() < 0.2 * before and mse() < 0.5 * labels.var(unbiased=False).item()
    assert len(sched.pool) == 5 and sched.pool[0][0].shape == (16, 8)


def run_rounds(sched, gen, rounds):
    outputs = []
    for _ in range(rounds):
        outputs.append(sched.step(features(gen), torch.randn(8, generator=gen), -torch.rand(8, generator=gen), k=4))
    return outputs


def test_state_dict_round_trip_continues_identically():
    settings = dict(selection="softmax", dropout=0.3)
    sched, gen = tiny(seed=0, **settings), torch.Generator().manual_seed(5)
    run_rounds(sched, gen, 3)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    other = tiny(seed=99, **settings)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    probe = sched.contexts(features(torch.Generator().manual_seed(6)))
    torch.testing.assert_close(sched.scores(probe), other.scores(probe), rtol=0, atol=0)
    (keep_a, metrics_a), (keep_b, metrics_b) = (
        run_rounds(s, torch.Generator().manual_seed(7), 2)[-1] for s in (sched, other)
    )
    assert keep_a.tolist() == keep_b.tolist() and metrics_a == metrics_b and "sams/exploit_mse" in metrics_a
    torch.testing.assert_close(sched.scores(probe), other.scores(probe), rtol=0, atol=0)
    with pytest.raises(ValueError):
        tiny(selection="topk").load_state_dict(sched.state_dict())


def test_score_is_exploit_plus_lambda_explore_and_exploit_alone_without_it():
    contexts = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(8)), dim=-1)
    off = tiny(explore=False)
    assert "explore" not in off.nets
    torch.testing.assert_close(off.scores(contexts), off.nets["exploit"](contexts)[0])
    on = tiny(explore_weight=0.5)
    exploit, hidden = on.nets["exploit"](contexts)
    expected = exploit + 0.5 * on.nets["explore"](downsample(hidden, 4))[0]
    torch.testing.assert_close(on.scores(contexts), expected)


def test_scheduler_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    run_rounds(tiny(selection="softmax"), torch.Generator().manual_seed(9), 2)
    assert torch.equal(before, torch.get_rng_state())


def test_trained_parameters_change():
    """Unfrozen connector: the lagged update moves connector and f_S but not the frozen encoder.
    pretrain_step moves connector, encoder and f_S, never f_S'."""
    sched = tiny(freeze_connector=False)

    def snapshot():
        return {name: [p.detach().clone() for p in sched.nets[name].parameters()] for name in sched.nets}

    def changed(old):
        return {
            name
            for name, ps in old.items()
            if any(not torch.equal(a, b) for a, b in zip(ps, sched.nets[name].parameters()))
        }

    old = snapshot()
    run_rounds(sched, torch.Generator().manual_seed(10), 2)
    assert changed(old) == {"connector", "exploit", "explore"}
    old = snapshot()
    sched.pretrain_step(features(torch.Generator().manual_seed(11)), torch.rand(8))
    assert changed(old) == {"connector", "encoder", "exploit"}


def test_bad_settings_rejected():
    with pytest.raises(ValueError):
        SamsSettings(selection="greedy")
    with pytest.raises(ValueError):
        SamsSettings(depth=3, width=10, explore_downsample=4)
    with pytest.raises(ValueError, match="encoder"):
        SamsSettings(encoder="bert")


def test_import_pulls_no_heavy_framework():
    code = (
        "import sys, unipipe_ray.core.sams; "
        "print([m for m in ('ray', 'deepspeed', 'vllm', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
