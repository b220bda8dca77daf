"""The non-finite guard: which metrics stop a stage, and the message a user sees."""

import math

import pytest

from unipipe_ray.runtime.loop import NonFiniteLoss, check_finite, non_finite


def test_only_losses_and_gradient_norms_that_are_nan_or_inf_count():
    metrics = {"dpo/loss": math.nan, "dpo/grad_norm": math.inf, "dpo/eval_loss": 0.7, "dpo/lr": math.nan,
               "ppo/value_loss": -math.inf, "step": 3}
    assert set(non_finite(metrics)) == {"dpo/loss", "dpo/grad_norm", "ppo/value_loss"}
    assert non_finite({"sft/loss": 2.3, "sft/grad_norm": 0.4}) == {}


def test_check_finite_names_the_stage_the_key_and_the_step():
    check_finite("sft", 5, {"sft/loss": 1.0})
    with pytest.raises(NonFiniteLoss, match=r"rm: non-finite rm/grad_norm=inf at step 7; stopped without saving"):
        check_finite("rm", 7, {"rm/loss": 0.5, "rm/grad_norm": math.inf})
