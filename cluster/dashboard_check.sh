#!/usr/bin/env bash
# What a user watching a run sees, checked in a real browser: a local Ray head with its dashboard and metrics
# port, a short SFT stage submitted with `ray job submit`, Prometheus (Debian's `prometheus`) scraping Ray's
# metrics endpoint, and headless Chromium (Debian's `chromium`) taking screenshots of the dashboard's job
# pages and of Prometheus' graph of the stage's loss. Screenshots go to docs/img/ (or $OUT).
#
#   apt-get install -y chromium prometheus   # once
#   source .venv/bin/activate                # the environment the head and the job run in
#   bash cluster/dashboard_check.sh
#
# Fails if the job fails or Prometheus holds no ray_unipipe_sft_loss sample for the job's run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/img}
WORK=$(mktemp -d /tmp/unipipe-dash-XXXX)
METRICS_PORT=${METRICS_PORT:-8080}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # a local, loopback-only head; clusters use the token
for tool in chromium prometheus ray; do
  command -v "$tool" > /dev/null || { echo "dashboard_check: $tool not found (see the header)" >&2; exit 2; }
done
mkdir -p "$OUT"

cleanup() {
  [ -n "${PROM_PID:-}" ] && kill "$PROM_PID" 2> /dev/null || true
  ray stop > /dev/null 2>&1 || true
}
trap cleanup EXIT

echo "dashboard_check: starting a local head (dashboard :8265, metrics :$METRICS_PORT)"
ray start --head --num-cpus=4 --dashboard-host=127.0.0.1 --metrics-export-port="$METRICS_PORT" > "$WORK/head.log"

cat > "$WORK/prometheus.yml" <<YAML
global: {scrape_interval: 2s}
scrape_configs:
  - job_name: ray
    static_configs: [{targets: ["127.0.0.1:$METRICS_PORT"]}]
YAML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address=127.0.0.1:9090 > "$WORK/prometheus.log" 2>&1 &
PROM_PID=$!

RUN="$WORK/sft"
echo "dashboard_check: ray job submit (a short SFT stage on the tiny model, output_dir $RUN)"
ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
  --submission-id "unipipe-dashboard-check-$$" -- \
  python -m unipipe_ray.cli sft model=tiny "output_dir=$RUN" data.task_size=800 data.eval_size=8 \
  data.max_length=64 train.batch_size=2 train.max_steps=300 train.log_every=2 train.lr=1e-3 | tee "$WORK/job.log"
sleep 5   # one more scrape

QUERY="ray_unipipe_sft_loss{run=\"$RUN\"}"
# A gauge leaves the endpoint when its worker exits: ask for its last value of the last ten minutes
python - "last_over_time($QUERY[10m])" <<'PY'
import json, sys, urllib.parse, urllib.request
q = urllib.parse.quote(sys.argv[1])
series = json.load(urllib.request.urlopen(f"http://127.0.0.1:9090/api/v1/query?query={q}"))["data"]["result"]
if not series:
    sys.exit(f"dashboard_check: Prometheus has no {sys.argv[1]}")
print("dashboard_check: Prometheus has", sys.argv[1], "=", series[0]["value"][1])
PY

shot() {  # shot NAME URL: a 1400x900 screenshot once the page's scripts have run
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900 \
    --virtual-time-budget=15000 --screenshot="$OUT/$1.png" "$2" > /dev/null 2>&1
  echo "dashboard_check: $OUT/$1.png <- $2"
}
JOB=$(ray job list --address http://127.0.0.1:8265 2>/dev/null | grep -o "job_id='[0-9a-f]*'" | head -1 | cut -d"'" -f2)
shot ray-dashboard-jobs "http://127.0.0.1:8265/#/jobs"
shot ray-dashboard-job "http://127.0.0.1:8265/#/jobs/$JOB"
shot ray-dashboard-metrics "http://127.0.0.1:8265/#/metrics"
ENC=$(python -c "import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))" "$QUERY")
shot prometheus-sft-loss "http://127.0.0.1:9090/graph?g0.expr=$ENC&g0.tab=0&g0.range_input=2m"
echo "dashboard_check: done ($WORK has the logs)"
