"""Several Ray nodes with different IP addresses on one machine, as on a real cluster: the driver's node
(the machine's own IP, 0 CPUs) and two worker nodes at 127.0.0.2 and 127.0.0.3 (every 127.x address reaches
this machine's loopback). Each run's driver is a child process connected to that cluster.

A group that meets at the driver's IP while its rank 0 runs on 127.0.0.2 still connects here (the rendezvous
store listens on every interface), so the tests check the address a group met at, not only that it ran."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unipipe_ray.core.models import tiny_model_dir

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def nodes():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    from tests.s3_local import use_credentials

    use_credentials()  # the nodes' processes reach the local S3 server with them

    def start():
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for ip in ("127.0.0.2", "127.0.0.3"):
                cluster.add_node(num_cpus=2, node_ip_address=ip)
            cluster.wait_for_nodes()
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    try:
        cluster = start()
    except RuntimeError:  # once seen here under heavy load: a node timed out reaching the new GCS
        cluster = start()
    yield cluster
    cluster.shutdown()


def drive(cluster, body: str, tmp_path) -> dict:
    """Run ``body`` as the driver of ``cluster`` in a child process; it leaves a JSON dict in out.json."""
    result = str(tmp_path / "out.json")
    script = (f"import json, ray\nray.init(address={cluster.address!r})\nout = {{}}\n{textwrap.dedent(body)}\n"
              f"open({result!r}, 'w').write(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def test_sft_with_two_workers_on_two_nodes(nodes, tmp_path):
    out = drive(nodes, f"""
        from unipipe_ray.config import SFTConfig, load_config
        from unipipe_ray.stages.sft import run_sft
        result = run_sft(load_config(SFTConfig, overrides=[
            "model=tiny", "output_dir={tmp_path}/sft", "data.task_size=80", "data.eval_size=4",
            "data.max_length=64", "train.num_workers=2", "train.batch_size=2", "train.max_steps=3"]))
        out["step"] = result["metrics"]["step"]
        # the GCS's actor table (the state API would need the dashboard, which this cluster does not run)
        from ray._private import state
        workers = [a for a in state.actors().values() if "RayTrainWorker" in a["ActorClassName"]]
        out["worker_nodes"] = sorted(set(a["Address"]["IPAddress"] for a in workers))
        out["driver_ip"] = ray.util.get_node_ip_address()
    """, tmp_path)
    assert out["step"] == 3
    assert out["worker_nodes"] == ["127.0.0.2", "127.0.0.3"]  # one worker per node: the group spans two IPs


def test_ppo_groups_meet_at_rank_0s_node_and_sync_weights_across_nodes(nodes, tmp_path):
    """Two policy trainers (a torch process group) and a vLLM engine joined to policy rank 0 over the
    collective weight group; rank 0 runs on 127.0.0.2/3, the driver on the machine's IP."""
    tiny = tiny_model_dir(tie_word_embeddings=False)
    out = drive(nodes, f"""
        from unipipe_ray.config import PPOConfig, load_config
        from unipipe_ray.core.models import load_tokenizer
        from unipipe_ray.ppo.controller import run_ppo
        from unipipe_ray.ppo.groups import build_groups, join_weight_group
        overrides = ["model={tiny}", "output_dir={tmp_path}/ppo", "data.task_size=60", "data.eval_size=4",
                     "max_new_tokens=8", "prompts_per_iter=4", "samples_per_prompt=2", "minibatch_size=4",
                     "estimator=grpo", "iterations=2", "train.num_workers=2", "engine=vllm",
                     "weight_sync=collective", "reward_model={tiny}"]
        cfg = load_config(PPOConfig, overrides=overrides)
        paths = {{"policy": "{tiny}", "reference": "{tiny}", "reward": "{tiny}", "critic": "{tiny}"}}
        groups, placement = build_groups(cfg, paths, load_tokenizer("{tiny}").pad_token_id, 1)
        out["policy"] = ray.get([a.placement.remote() for a in groups["policy"].actors])
        out["weight_group"] = ray.get(groups["policy"].actors[0].meeting_point.remote())
        for g in groups.values():
            g.kill()
        ray.util.remove_placement_group(placement)
        result = run_ppo(cfg)
        rows = json.load(open("{tmp_path}/ppo/history.json"))
        out["iterations"] = [h["iteration"] for h in rows]
        out["logp_diff"] = [h["ppo/engine_trainer_logp_max_diff"] for h in rows]
        out["driver_ip"] = ray.util.get_node_ip_address()
    """, tmp_path)
    (ip0, met0), (_, met1) = out["policy"]
    assert ip0 in ("127.0.0.2", "127.0.0.3") and out["driver_ip"] not in ("127.0.0.2", "127.0.0.3")
    assert met0[0] == met1[0] == ip0  # both ranks met at rank 0's node, not the driver's
    assert out["weight_group"][0] == ip0
    assert out["iterations"] == [1, 2]
    from tests.floors import LOGP_ATOL

    assert all(d < LOGP_ATOL for d in out["logp_diff"])  # the engine got the trainer's weights each time


def test_sft_with_checkpoints_in_s3_resumes_on_another_node_when_its_node_dies(nodes, tmp_path):
    """No shared filesystem needed: the only copy of the checkpoints is in the bucket (moto's S3 server), the
    worker's node is removed from the cluster after a checkpoint, and Ray Train restarts the worker on the
    other node, which reads that checkpoint from the bucket."""
    pytest.importorskip("moto")
    from tests.s3_local import s3_endpoint

    with s3_endpoint() as s3:
        uri = s3("multinode/sft")
        seen = tmp_path / "worker_ips.json"
        script = textwrap.dedent(f"""
            import json, threading, time, ray
            ray.init(address={nodes.address!r})
            from ray._private import state
            from unipipe_ray.config import SFTConfig, load_config
            from unipipe_ray.stages.sft import run_sft
            ips = []
            def watch():  # the nodes the training worker ran on, in order
                while True:
                    for a in state.actors().values():
                        ip = a["Address"]["IPAddress"]
                        if "RayTrainWorker" in a["ActorClassName"] and ip not in ips:
                            ips.append(ip)
                            open({str(seen)!r}, "w").write(json.dumps(ips))
                    time.sleep(0.2)
            threading.Thread(target=watch, daemon=True).start()
            result = run_sft(load_config(SFTConfig, overrides=[
                "model=tiny", "output_dir={tmp_path}/sft", "data.task_size=200", "data.eval_size=4",
                "data.max_length=64", "train.num_workers=1", "train.batch_size=2", "train.max_steps=60",
                "train.checkpoint_every=5", "train.max_failures=2"]), storage={uri!r})
            open({str(tmp_path / "out.json")!r}, "w").write(json.dumps(result, default=str))
        """)
        driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        removed = None
        try:
            import time

            import pyarrow.fs as pafs

            fs, root = pafs.FileSystem.from_uri(uri)
            deadline = time.time() + 300
            while time.time() < deadline and driver.poll() is None:
                listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
                names = [i.path for i in listed]
                # two checkpoints uploaded: the first one is registered by then (reports come in order)
                if seen.exists() and sum(n.endswith("trainer_state.pt") for n in names) >= 2:
                    break
                time.sleep(0.2)
            if not seen.exists() or driver.poll() is not None:
                driver.kill()
                pytest.fail(f"no worker or checkpoint seen: {driver.communicate()[0][-4000:]}")
            first_ip = json.loads(seen.read_text())[0]
            removed = next(n for n in nodes.worker_nodes if n.node_ip_address == first_ip)
            nodes.remove_node(removed)  # the node and every process on it die
            log, _ = driver.communicate(timeout=480)
            assert driver.returncode == 0, log[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()
            if removed is not None:  # the other tests of this module expect both worker nodes
                nodes.add_node(num_cpus=2, node_ip_address=removed.node_ip_address)
                nodes.wait_for_nodes()
        result = json.loads((tmp_path / "out.json").read_text())
        ips = json.loads(seen.read_text())
    assert len(ips) == 2 and ips[0] == first_ip, ips  # the worker ran on one node, then on the other
    assert result["metrics"]["step"] == 60 and result["metrics"]["resumed_at_step"] >= 5, result["metrics"]
    assert result["checkpoint"].startswith(uri.split("?")[0] + "/sft/checkpoint_")
    assert not list(tmp_path.glob("**/checkpoint_*"))  # nothing was kept on a local disk
