"""Several Ray nodes with different IP addresses on one machine, as on a real cluster: the driver's node
(the machine's own IP, 0 CPUs) and two worker nodes at 127.0.0.2 and 127.0.0.3 (every 127.x address reaches
this machine's loopback). Each run's driver is a child process connected to that cluster.

A group that meets at the driver's IP while its rank 0 runs on 127.0.0.2 still connects here (the rendezvous
store listens on every interface), so the tests check the address a group met at, not only that it ran.

Each node has its own Ray temp dir and its own model cache (UNIPIPE_CACHE), and the driver a third one. On one
machine a process could still open another node's path, so the tests check that every node made its own copy
of the model (generated, or downloaded from the bucket), which it would not if it read the driver's."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.floors import assert_identical
from unipipe_ray.core import models, storage
from unipipe_ray.ppo import state as ppo_state

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).parents[2]


NODE_IPS = ("127.0.0.2", "127.0.0.3")
# Short paths: Ray's sockets live under a node's temp dir, and a socket path has at most 107 bytes.
LOCAL = Path(tempfile.gettempdir()) / f"unipipe-nodes-{os.getpid()}"


def node_cache(ip: str) -> Path:
    return LOCAL / f"cache-{ip}"


def add_worker_node(cluster, ip: str):
    """A worker node with its own temp dir and model cache, as on a machine of its own."""
    (LOCAL / f"ray-{ip}").mkdir(parents=True, exist_ok=True)
    return cluster.add_node(num_cpus=2, node_ip_address=ip, temp_dir=str(LOCAL / f"ray-{ip}"),
                            env_vars={"UNIPIPE_CACHE": str(node_cache(ip))})


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
            for ip in NODE_IPS:
                add_worker_node(cluster, ip)
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
    shutil.rmtree(LOCAL, ignore_errors=True)


def driver_env() -> dict:
    return {**os.environ, "UNIPIPE_CACHE": str(LOCAL / "cache-driver")}


def drive(cluster, body: str, tmp_path) -> dict:
    """Run ``body`` as the driver of ``cluster`` in a child process; it leaves a JSON dict in out.json."""
    result = str(tmp_path / "out.json")
    script = (f"import json, ray\nray.init(address={cluster.address!r})\nout = {{}}\n{textwrap.dedent(body)}\n"
              f"open({result!r}, 'w').write(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=540,
                          env=driver_env())
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
    for ip in NODE_IPS:  # each node generated the tiny model itself instead of reading the driver's cache path
        assert (node_cache(ip) / models.tiny_model_dir().name / "model.safetensors").is_file()


def test_ppo_groups_meet_at_rank_0s_node_and_sync_weights_across_nodes(nodes, tmp_path):
    """Two policy trainers (a torch process group) and a vLLM engine joined to policy rank 0 over the
    collective weight group; rank 0 runs on 127.0.0.2/3, the driver on the machine's IP. The model comes from
    the bucket and the checkpoints go there: each node downloads the model into its own cache."""
    pytest.importorskip("moto")
    from tests.s3_local import s3_endpoint

    with s3_endpoint() as s3:
        model, store = s3("multinode/models/tiny-untied"), s3("multinode/ppo")
        storage.upload_dir(models.tiny_model_dir(tie_word_embeddings=False), model)
        out = drive(nodes, f"""
            from unipipe_ray.config import PPOConfig, load_config
            from unipipe_ray.core.models import load_tokenizer
            from unipipe_ray.ppo.controller import run_ppo
            from unipipe_ray.ppo.groups import build_groups, join_weight_group
            model = {model!r}
            overrides = ["model=" + model, "output_dir={tmp_path}/ppo", "data.task_size=60", "data.eval_size=4",
                         "max_new_tokens=8", "prompts_per_iter=4", "samples_per_prompt=2", "minibatch_size=4",
                         "estimator=grpo", "iterations=2", "train.num_workers=2", "engine=vllm",
                         "weight_sync=collective", "reward_model=" + model, "train.checkpoint_every=1",
                         "sync_check_every=1"]
            cfg = load_config(PPOConfig, overrides=overrides)
            paths = {{"policy": model, "reference": model, "reward": model, "critic": model}}
            groups, placement = build_groups(cfg, paths, load_tokenizer(model).pad_token_id, 1)
            out["policy"] = ray.get([a.placement.remote() for a in groups["policy"].actors])
            out["weight_group"] = ray.get(groups["policy"].actors[0].meeting_point.remote())
            for g in groups.values():
                g.kill()
            ray.util.remove_placement_group(placement)
            result = run_ppo(cfg, storage={store!r})
            rows = json.load(open("{tmp_path}/ppo/history.json"))
            out["iterations"] = [h["iteration"] for h in rows]
            out["logp_diff"] = [h["ppo/engine_trainer_logp_max_diff"] for h in rows]
            out["checkpoint"] = result["checkpoint"]
            out["driver_ip"] = ray.util.get_node_ip_address()
            from ray._private import state
            roles = ("PolicyTrainer", "CriticTrainer", "ReferenceModel", "RewardScorer", "RolloutWorker")
            out["role_nodes"] = sorted(set(a["Address"]["IPAddress"] for a in state.actors().values()
                                           if a["ActorClassName"] in roles))
        """, tmp_path)
        committed = ppo_state.find(storage.join(store, "checkpoint"))
    (ip0, met0), (_, met1) = out["policy"]
    assert ip0 in NODE_IPS and out["driver_ip"] not in NODE_IPS
    assert met0[0] == met1[0] == ip0  # both ranks met at rank 0's node, not the driver's
    assert out["weight_group"][0] == ip0
    assert out["iterations"] == [1, 2]
    from tests.floors import LOGP_ATOL

    assert all(d < LOGP_ATOL for d in out["logp_diff"])  # the engine got the trainer's weights each time
    assert committed == storage.join(store, "checkpoint", "iteration-000001")  # the last one is final-000002
    assert out["checkpoint"] == storage.join(store, "final-000002")
    assert not list(tmp_path.glob("ppo/**/controller.json"))  # checkpoints only in the bucket
    assert ip0 in out["role_nodes"] and set(out["role_nodes"]) <= set(NODE_IPS), out["role_nodes"]
    for ip in out["role_nodes"]:  # every node that ran a role downloaded the model into its own cache
        assert any((d / "config.json").is_file() for d in (node_cache(ip) / "remote").iterdir()), ip


@pytest.mark.timeout(900)  # a second try of the scenario when the first restarted from scratch
def test_sft_with_checkpoints_in_s3_resumes_on_another_node_when_its_node_dies(nodes, tmp_path):
    """No shared filesystem needed: the only copy of the checkpoints is in the bucket (moto's S3 server), the
    worker's node is removed from the cluster after a checkpoint, and Ray Train restarts the worker on the
    other node, which reads that checkpoint from the bucket."""
    pytest.importorskip("moto")
    from tests.s3_local import s3_endpoint

    overrides = ["model=tiny", "data.task_size=200", "data.eval_size=4", "data.max_length=64",
                 "train.num_workers=1", "train.batch_size=2", "train.max_steps=60", "train.checkpoint_every=5",
                 "train.max_failures=2"]
    # The scenario gets a second try (one of the two must resume from the bucket): it failed before only
    # because the watcher below read dead workers of earlier runs, now filtered out; kept as a guard against
    # a kill that lands between Ray Train's report and its registration of the checkpoint.
    for attempt in range(2):
        work = tmp_path / f"try{attempt}"
        work.mkdir()
        with s3_endpoint() as s3:
            uri = s3(f"multinode/sft{attempt}")
            seen = work / "worker_ips.json"
            script = textwrap.dedent(f"""
                import json, threading, time, ray
                ray.init(address={nodes.address!r})
                from ray._private import state
                from unipipe_ray.config import SFTConfig, load_config
                from unipipe_ray.stages.sft import run_sft
                ips = []
                job = ray.get_runtime_context().get_job_id()
                def watch():  # the nodes this run's training worker ran on, in order
                    while True:
                        for a in state.actors().values():
                            ip = a["Address"]["IPAddress"]
                            # only this driver's live workers: the actor table also lists the dead workers
                            # of the module's earlier runs, on either node (reading one of those first made
                            # the test kill the node the worker was not on, and the run never resumed)
                            if ("RayTrainWorker" in a["ActorClassName"] and a["JobID"] == job
                                    and a["State"] == "ALIVE" and ip not in ips):
                                ips.append(ip)
                                open({str(seen)!r}, "w").write(json.dumps(ips))
                        time.sleep(0.2)
                threading.Thread(target=watch, daemon=True).start()
                result = run_sft(load_config(SFTConfig, overrides={overrides + [f"output_dir={work}/sft"]!r}),
                                 storage={uri!r})
                open({str(work / "out.json")!r}, "w").write(json.dumps(result, default=str))
            """)
            driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=driver_env())
            removed = None
            try:
                import time

                import pyarrow.fs as pafs

                fs, root = pafs.FileSystem.from_uri(uri)
                deadline = time.time() + 300
                while time.time() < deadline and driver.poll() is None:
                    listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
                    names = [i.path for i in listed]
                    # a checkpoint registered by Ray Train's controller (it writes its snapshot then): an upload
                    # alone is not enough, the controller polls reports and a death before that loses them
                    if seen.exists() and any(n.endswith("checkpoint_manager_snapshot.json") for n in names):
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
                    add_worker_node(nodes, removed.node_ip_address)
                    nodes.wait_for_nodes()
            result = json.loads((work / "out.json").read_text())
            ips = json.loads(seen.read_text())
            resumed = load_file(f"{storage.localize(result['checkpoint'])}/model.safetensors")
        if result["metrics"]["resumed_at_step"] >= 5:
            break
        (work / "driver.log").write_text(log)
        import logging
        logging.getLogger(__name__).warning("attempt %d restarted from scratch (log in %s); trying again",
                                            attempt, work / "driver.log")
    assert len(ips) == 2 and ips[0] == first_ip, ips  # the worker ran on one node, then on the other
    final = result["metrics"]
    assert final["step"] == 60 and final["resumed_at_step"] >= 5, (final, log[-6000:])
    assert result["checkpoint"].startswith(uri.split("?")[0] + "/sft/checkpoint_")
    assert not list(tmp_path.glob("**/checkpoint_*"))  # nothing was kept on a local disk

    uninterrupted = drive(nodes, f"""
        from unipipe_ray.config import SFTConfig, load_config
        from unipipe_ray.stages.sft import run_sft
        out.update(run_sft(load_config(SFTConfig, overrides={overrides + [f"output_dir={tmp_path}/whole"]!r})))
    """, tmp_path)
    assert uninterrupted["metrics"]["resumed_at_step"] == 0
    # same layout (one worker): the resumed run is the uninterrupted one bit for bit (tests/floors.py)
    assert_identical(resumed, load_file(f"{uninterrupted['checkpoint']}/model.safetensors"))
