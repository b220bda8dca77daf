#!/usr/bin/env bash
# Stress check for tests that once failed at random or on one CPU vendor (not run by CI: ~35 min on 2 cores).
#
#   bash tests/stress.sh [engine_runs=20] [resume_runs=5]
#
# Runs the DeepSpeed/DDP engine tests (tests/component/test_engine.py, every ZeRO stage: a rank that aborts
# at exit fails mp.spawn) engine_runs times, and the resume tests (killed worker, restarted job, PPO's
# stopped run) resume_runs times, each as a fresh pytest process, then prints the pass counts with the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
engine_runs=${1:-20}
resume_runs=${2:-5}
py=${PY:-.venv/bin/python}
log_dir=$(mktemp -d)
export RAY_AUTH_MODE=disabled

count() {  # name runs pytest-args...
  local name=$1 runs=$2 ok=0
  shift 2
  for i in $(seq 1 "$runs"); do
    if "$py" -m pytest -q -p no:cacheprovider "$@" > "$log_dir/$name.$i.log" 2>&1; then
      ok=$((ok + 1))
    else
      echo "stress: $name run $i failed: $(tail -1 "$log_dir/$name.$i.log") (log: $log_dir/$name.$i.log)"
    fi
  done
  echo "stress: $name $ok/$runs green"
}

echo "stress: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, logs in $log_dir"
count engine "$engine_runs" tests/component/test_engine.py
count resume "$resume_runs" tests/ray/test_stages_ray.py tests/ray/test_ppo_ray.py \
  -k "killed_worker or restarted_job or stopped_run"
