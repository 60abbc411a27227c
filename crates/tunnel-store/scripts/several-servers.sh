#!/usr/bin/env bash
# Several `tunnel serve` processes on one PostgreSQL database, with real `tunnel runner`s
# (the built-in echo agent) spread across them. Submits TASKS tasks round-robin to the servers
# (two thirds in 100 conversations, each with a webhook answer to one of four webhooks), kills every PostgreSQL
# connection of the database halfway through, then checks in the database and at the webhook
# sink: every task succeeded, each was offered and run exactly once, each conversation ran in
# order, and every answer was delivered exactly once.
#
#   cargo build -p tunnel && crates/tunnel-store/scripts/several-servers.sh
#
# Env: TUNNEL_BIN (target/debug/tunnel), TUNNEL_TEST_PG_URL (postgres://postgres@127.0.0.1:5432/postgres),
# TASKS (5000), SERVERS (3), RUNNERS_PER_SERVER (1), MAX_CONCURRENT (8), DB_PREFIX (tunnel_several:
# the database is DB_PREFIX_<pid>, created and dropped here).
set -euo pipefail

BIN=${TUNNEL_BIN:-target/debug/tunnel}
ADMIN_URL=${TUNNEL_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
TASKS=${TASKS:-5000}
SERVERS=${SERVERS:-3}
RUNNERS_PER_SERVER=${RUNNERS_PER_SERVER:-1}
export MAX_CONCURRENT=${MAX_CONCURRENT:-8}
DB=${DB_PREFIX:-tunnel_several}_$$
URL=${ADMIN_URL%/*}/$DB
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

sql() { psql "$URL" -Atc "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

psql "$ADMIN_URL" -qc "CREATE DATABASE $DB"
export WORKER_TOKEN=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')

# The webhook sink: records the task id of every POST it receives.
SINK_PORT=$(free_port)
cat > "$WORK/sink.py" <<'PY'
import http.server, json, sys
out = open(sys.argv[2], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        out.write(json.loads(body)["task"]["id"] + "\n")
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$WORK/sink.py" "$SINK_PORT" "$WORK/delivered" & PIDS+=($!)
# Four webhooks (four destinations, each delivered in order, in parallel with the others).
for w in 0 1 2 3; do
    export TUNNEL_WEBHOOK_SINK${w}_URL=http://127.0.0.1:$SINK_PORT/ TUNNEL_WEBHOOK_SINK${w}_SECRET=sink-secret
done

URLS=()
for i in $(seq 1 "$SERVERS"); do
    port=$(free_port)
    mkdir -p "$WORK/s$i"
    XDG_DATA_HOME=$WORK/s$i DATABASE_URL=$URL RUST_LOG=warn \
        "$BIN" serve --port "$port" --log-format json 2>"$WORK/s$i.log" & PIDS+=($!)
    URLS+=("http://127.0.0.1:$port")
done
for u in "${URLS[@]}"; do
    for _ in $(seq 1 100); do curl -fs "$u/readyz" >/dev/null && break; sleep 0.2; done
done
echo "servers: ${URLS[*]} on $DB"
n=0
for u in "${URLS[@]}"; do
    for k in $(seq 1 "$RUNNERS_PER_SERVER"); do
        n=$((n + 1)); mkdir -p "$WORK/r$n"
        XDG_DATA_HOME=$WORK/r$n WORKER_URL=$u RUST_LOG=warn \
            "$BIN" runner --name "r$n" 2>"$WORK/r$n.log" & PIDS+=($!)
    done
done

start=$(date +%s.%N)
seq 1 "$TASKS" | while read -r i; do
    u=${URLS[$((i % SERVERS))]}
    if ((i % 3)); then conv=",\"conversation\":\"c$((i % 100))\""; else conv=""; fi
    echo "$u {\"agent\":\"echo\",\"prompt\":\"task $i\"$conv,\"reply_to\":{\"platform\":\"webhook\",\"channel\":\"sink$((i % 4))\"}}"
done | xargs -d '\n' -P 8 -n 1 sh -c 'curl -fsS -o /dev/null -H "authorization: Bearer $WORKER_TOKEN" -H "content-type: application/json" "${1%% *}/v1/tasks" -d "${1#* }" || echo "submit failed: $1" >&2' _
echo "submitted $TASKS in $(echo "$(date +%s.%N) - $start" | bc) s"

killed=0
for _ in $(seq 1 3000); do
    done_n=$(sql "SELECT count(*) FROM tasks WHERE finished_at IS NOT NULL" 2>/dev/null || echo 0)
    if ((killed == 0 && done_n >= TASKS / 2)); then
        k=$(psql "$ADMIN_URL" -Atc "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '$DB' AND pid <> pg_backend_pid()")
        echo "killed $k PostgreSQL connections at $done_n finished tasks"
        killed=1
    fi
    delivered=$(sort -u "$WORK/delivered" 2>/dev/null | wc -l)
    ((done_n >= TASKS && delivered >= TASKS)) && break
    sleep 0.5
done
took=$(echo "$(date +%s.%N) - $start" | bc)
echo "all tasks finished $(sql "SELECT (max(finished_at) - min(created_at)) / 1000.0 FROM tasks") s after the first submit"

echo "--- after ${took} s"
sql "SELECT state, attempt, count(*) FROM tasks GROUP BY 1, 2 ORDER BY 1, 2"
ok=1
check() { # name, actual, expected
    if [[ "$2" == "$3" ]]; then echo "ok   $1: $2"; else echo "FAIL $1: $2 (expected $3)"; ok=0; fi
}
# runs = offers acked; an offer whose ack failed (e.g. while the connections were killed) is
# offered again after the ack timeout, so attempt may be 2, but the task ran once.
check "tasks succeeded, run once (runs = 1)" "$(sql "SELECT count(*) FROM tasks WHERE state = 'succeeded' AND runs = 1")" "$TASKS"
echo "info tasks offered more than once (an offer not acked in time): $(sql "SELECT count(*) FROM tasks WHERE attempt > 1")"
check "tasks run more than once (running events != 1)" "$(sql "SELECT count(*) FROM (SELECT t.seq FROM tasks t LEFT JOIN task_events e ON e.task_seq = t.seq AND e.kind = 'state' AND e.data::jsonb->>'state' = 'running' GROUP BY t.seq HAVING count(e.seq) <> 1) x")" 0
check "conversation order violations" "$(sql "SELECT count(*) FROM tasks a JOIN tasks b ON a.session_key = b.session_key AND a.seq < b.seq WHERE b.started_at < a.finished_at")" 0
check "runners that ran tasks" "$(sql "SELECT count(DISTINCT runner) FROM tasks")" "$((SERVERS * RUNNERS_PER_SERVER))"
check "answers delivered" "$(sort -u "$WORK/delivered" | wc -l)" "$TASKS"
check "answers delivered twice" "$(sort "$WORK/delivered" | uniq -d | wc -l)" 0
check "outbox rows not sent" "$(sql "SELECT count(*) FROM outbox WHERE state <> 'sent'")" 0
echo "tasks per runner: $(sql "SELECT string_agg(runner || '=' || n, ' ') FROM (SELECT runner, count(*) n FROM tasks GROUP BY 1 ORDER BY 1) x")"
((ok)) || { echo "--- server logs (errors)"; grep -h '"ERROR"' "$WORK"/s*.log | tail -20; exit 1; }
