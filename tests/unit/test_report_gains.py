"""The report's per-stage verdicts: each policy against the one it started from, paired (McNemar)."""

from unipipe_ray.eval.summary import entry
from unipipe_ray.pipeline.report import stage_gains


def _em(correct: list[int]) -> dict:
    return {"exact_match": entry(correct, binary=True)}


def test_each_stage_is_compared_with_its_input_and_says_plainly_when_it_did_not_help():
    n = 40
    base = [0] * n
    sft = [1] * 20 + [0] * 20          # +0.5 over base: 20 discordant pairs, all one way
    ppo = [1] * 20 + [1, 0] + [0] * 18  # one more right: not significant
    dpo = [1] * 10 + [0] * 30           # 11 fewer right than ppo: significant, the wrong way
    gains = stage_gains({"base": _em(base), "sft": _em(sft), "ppo": _em(ppo), "dpo": _em(dpo)})
    assert [(g["stage"], g["input"]) for g in gains] == [("sft", "base"), ("ppo", "sft"), ("dpo", "ppo")]
    assert [g["verdict"] for g in gains] == ["helped", "no significant change", "hurt"]
    assert abs(gains[0]["diff"] - 0.5) < 1e-12 and gains[0]["p_value"] < 1e-4
    assert gains[1]["p_value"] == 1.0 and gains[1]["low"] <= 0 <= gains[1]["high"]
    assert gains[2]["before"] == 0.525 and gains[2]["after"] == 0.25


def test_policies_without_exact_match_are_left_out():
    assert stage_gains({"base": {"rougeL": entry([0.1, 0.2])}, "sft": {"rougeL": entry([0.3, 0.4])}}) == []
