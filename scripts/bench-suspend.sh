#!/bin/bash
# Our overhead around a suspend and a resume, measured through the
# coordinator (BENCHMARKS.md, "Suspend and resume"): a real coordinator on
# the local batch system, real pilots on simulated nodes whose saves and
# restores take a set time per GB, one lease suspended and resumed N times
# with the CLI. Per cycle, from the coordinator's timeline:
#   suspend: request (`suspending`) -> `suspended`, minus the node's save time
#   resume:  request (`resuming`)   -> `running`,   minus the node's restore time
# (the node's times are the pilot's own, from vm_suspended / vm_resumed),
# and the wall time the client waited (`workspace suspend|resume --wait`);
# for a resume also how long until the restore is sent (the new slot's
# batch job submitted, its pilot started, its memory reserved).
# Prints medians; --json FILE writes every sample.
#   scripts/bench-suspend.sh                      # 10 cycles, 1 VM of 1024 MB, 1000 ms/GB both ways
#   scripts/bench-suspend.sh --repeats 20 --vms 2 --memory-mb 512
#   WSP_BIN=target/debug scripts/bench-suspend.sh # the debug binaries, no release build
# Starts only its own processes (a coordinator, its batch jobs) in a temp dir,
# and stops them on exit. Needs jq and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

REPEATS=10 VMS=1 MEMORY_MB=1024 SAVE_MS_PER_GB=1000 RESTORE_MS_PER_GB=1000 JSON=""
while [ $# -gt 0 ]; do
  case "$1" in
    --repeats) REPEATS=$2; shift 2 ;;
    --vms) VMS=$2; shift 2 ;;
    --memory-mb) MEMORY_MB=$2; shift 2 ;;
    --save-ms-per-gb) SAVE_MS_PER_GB=$2; shift 2 ;;
    --restore-ms-per-gb) RESTORE_MS_PER_GB=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    *) echo "usage: $0 [--repeats N] [--vms N] [--memory-mb MB] [--save-ms-per-gb MS] [--restore-ms-per-gb MS] [--json FILE]" >&2; exit 2 ;;
  esac
done
for tool in jq curl sha256sum; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install $tool)" >&2; exit 2; }
done
if [ -z "${WSP_BIN:-}" ]; then
  cargo build --release --bins -q
  WSP_BIN=target/release
fi
BIN=$(cd "$WSP_BIN" && pwd)
for b in workspace workspace-coordinator workspace-pilot; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b is missing (cargo build --bins)" >&2; exit 2; }
done

ROOT=$(mktemp -d /tmp/wsp-bench-suspend-XXXXXX)
COORD=""
cleanup() {
  if [ -n "$COORD" ] && kill -0 "$COORD" 2>/dev/null; then
    kill -TERM "$COORD" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$COORD" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$COORD" 2>/dev/null || true
  fi
  rm -rf "$ROOT"
}
trap cleanup EXIT

TOKEN="bench-suspend-$$-$RANDOM"
PORT=$(( 20000 + RANDOM % 20000 ))
NODES=$(( VMS > 2 ? VMS : 2 ))
NODE_MB=$(( MEMORY_MB + 2048 ))
mkdir -p "$ROOT/checkpoints"
cat > "$ROOT/node.toml" <<EOF
[checkpoints]
dir = "$ROOT/checkpoints"
EOF
cat > "$ROOT/coordinator.toml" <<EOF
listen = "127.0.0.1:$PORT"
data_dir = "$ROOT/coordinator"
lrm = "local"
checkpoint_dir = "$ROOT/checkpoints"

[local]
nodes = $NODES
cores_per_node = 2
memory_mb_per_node = $NODE_MB
kill_grace_s = 8

[pilot]
program = "$BIN/workspace-pilot"
hypervisor = "sim"
node_config = "$ROOT/node.toml"
state_dir = "$ROOT/nodes/%n/state"
sim_dir = "$ROOT/nodes/%n/sim"

[[users]]
name = "bench"
token_sha256 = "$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)"
EOF
RUST_LOG=warn "$BIN/workspace-coordinator" serve --config "$ROOT/coordinator.toml" \
  >/dev/null 2>"$ROOT/coordinator.log" &
COORD=$!
for _ in $(seq 200); do
  [ -s "$ROOT/coordinator/coordinator.url" ] && break
  kill -0 "$COORD" 2>/dev/null || { cat "$ROOT/coordinator.log" >&2; exit 1; }
  sleep 0.1
done
export WORKSPACE_URL="http://127.0.0.1:$PORT" WORKSPACE_TOKEN="$TOKEN"
# The nodes' saves and restores take their time (no guest runs yet).
for i in $(seq "$NODES"); do
  "$BIN/workspace-pilot" sim init --force --dir "$ROOT/nodes/node$i/sim" \
    --memory-mb "$NODE_MB" --cpus 2 \
    --save-ms-per-gb "$SAVE_MS_PER_GB" --restore-ms-per-gb "$RESTORE_MS_PER_GB" >/dev/null
done

cat > "$ROOT/spec.toml" <<EOF
name = "bench-suspend"
duration = 86400
[[group]]
name = "vm"
count = $VMS
memory_mb = $MEMORY_MB
image = "debian-12"
EOF
ID=$("$BIN/workspace" create -q --wait --timeout 120 --file "$ROOT/spec.toml" 2>"$ROOT/client.log") ||
  { cat "$ROOT/client.log" "$ROOT/coordinator.log" >&2; exit 1; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
: > "$ROOT/walls"
for r in $(seq "$REPEATS"); do
  t0=$(now_ms)
  "$BIN/workspace" suspend "$ID" --wait --timeout 120 >/dev/null 2>"$ROOT/client.log" ||
    { cat "$ROOT/client.log" >&2; exit 1; }
  t1=$(now_ms)
  "$BIN/workspace" resume "$ID" --wait --timeout 120 >/dev/null 2>"$ROOT/client.log" ||
    { cat "$ROOT/client.log" >&2; exit 1; }
  t2=$(now_ms)
  echo "$(( t1 - t0 )) $(( t2 - t1 ))" >> "$ROOT/walls"
  printf '\rcycle %d/%d' "$r" "$REPEATS" >&2
done
echo >&2
curl -sf -H "Authorization: Bearer $TOKEN" \
  "$WORKSPACE_URL/api/v1/workspaces/$ID/events?after=0" > "$ROOT/events.json"
"$BIN/workspace" destroy "$ID" >/dev/null

# One sample per cycle: the coordinator's request-to-state time and the
# slowest VM's own save (restore) time, from the timeline's words
# ("... in 1024 ms ...").
jq -n --slurpfile ev "$ROOT/events.json" --rawfile walls "$ROOT/walls" \
  --argjson vms "$VMS" --argjson mb "$MEMORY_MB" \
  --argjson save "$SAVE_MS_PER_GB" --argjson restore "$RESTORE_MS_PER_GB" '
  def ms: capture(" in (?<ms>[0-9]+) ms") | .ms | tonumber;
  def median: sort | if length == 0 then null
    elif length % 2 == 1 then .[length / 2 | floor]
    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def cycles(start; node; done):
    reduce $ev[0].events[] as $e ({out: [], cur: null};
      if $e.phase == start then .cur = {t0: $e.ts_ms, node_ms: 0}
      elif .cur == null then .
      elif $e.phase == "vm_start_sent" and .cur.slot_up_ms == null then .cur.slot_up_ms = ($e.ts_ms - .cur.t0)
      elif $e.phase == node then .cur.node_ms = ([.cur.node_ms, ($e.detail | ms)] | max)
      elif $e.phase == done then .out += [.cur + {total_ms: ($e.ts_ms - .cur.t0)}] | .cur = null
      else . end) | .out | map(. + {overhead_ms: (.total_ms - .node_ms)});
  # The first "running" is the create; resume cycles start at "resuming".
  ([$walls | split("\n")[] | select(length > 0) | split(" ") | map(tonumber)]) as $w
  | (cycles("suspending"; "vm_suspended"; "suspended")) as $s
  | (cycles("resuming"; "vm_resumed"; "running")) as $r
  | {vms: $vms, memory_mb: $mb, save_ms_per_gb: $save, restore_ms_per_gb: $restore,
     suspend: {samples: $s, client_wall_ms: [$w[][0]]},
     resume: {samples: $r, client_wall_ms: [$w[][1]]},
     median: {
       suspend_total_ms: ([$s[].total_ms] | median), suspend_node_ms: ([$s[].node_ms] | median),
       suspend_overhead_ms: ([$s[].overhead_ms] | median), suspend_client_wall_ms: ([$w[][0]] | median),
       resume_total_ms: ([$r[].total_ms] | median), resume_node_ms: ([$r[].node_ms] | median),
       resume_slot_up_ms: ([$r[].slot_up_ms] | median),
       resume_overhead_ms: ([$r[].overhead_ms] | median), resume_client_wall_ms: ([$w[][1]] | median)}}
' > "$ROOT/result.json"
[ -n "$JSON" ] && cp "$ROOT/result.json" "$JSON"
jq -r '
  "\(.vms) VM(s) of \(.memory_mb) MB, save \(.save_ms_per_gb) ms/GB, restore \(.restore_ms_per_gb) ms/GB; medians of \(.suspend.samples | length) cycles (ms):",
  "          request->state  node  ours (overhead)  request->state / node  client wall",
  "suspend   \(.median.suspend_total_ms)  \(.median.suspend_node_ms)  \(.median.suspend_overhead_ms)  x\(.median.suspend_total_ms / .median.suspend_node_ms * 1000 | round / 1000)  \(.median.suspend_client_wall_ms)",
  "resume    \(.median.resume_total_ms)  \(.median.resume_node_ms)  \(.median.resume_overhead_ms)  x\(.median.resume_total_ms / .median.resume_node_ms * 1000 | round / 1000)  \(.median.resume_client_wall_ms)",
  "(resume: new slot submitted, its pilot started and reserved, restore sent after \(.median.resume_slot_up_ms) ms)"
' "$ROOT/result.json"
