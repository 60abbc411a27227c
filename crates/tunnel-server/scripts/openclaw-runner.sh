#!/usr/bin/env bash
# The original openclaw-tunnel runner (runner/worker.js, unchanged) against `tunnel serve`.
#
# Usage: crates/tunnel-server/scripts/openclaw-runner.sh /path/to/openclaw-tunnel
#   (a checkout of github.com/AliceLJY/openclaw-tunnel; TUNNEL_BIN defaults to target/debug/tunnel)
#
# It submits what the original plugin submits (two /cc prompts in one session, a shell command,
# a file write) with the shared WORKER_TOKEN, lets the original runner (CLI mode, a stand-in
# `claude` that echoes its prompt) poll, run and report, and checks: each result reads the same
# twice, the session's second prompt resumed the first's session, the plugin's
# callbackBotToken is nowhere in the database, and the answer is posted to a Discord stand-in
# exactly once: by the runner with its own bot token, or, when the server has a bot
# (CALLBACK_BOT_TOKEN), by the server and not by the runner. Exits non-zero on any failure.
set -euo pipefail
seed=${1:?usage: $0 /path/to/openclaw-tunnel}
root=$(cd "$(dirname "$0")/../../.." && pwd)
tunnel=${TUNNEL_BIN:-$root/target/debug/tunnel}
[ -x "$tunnel" ] || { echo "build it first: cargo build -p tunnel" >&2; exit 2; }
command -v node >/dev/null && command -v npm >/dev/null || { echo "needs node and npm" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The runner as published, with its one dependency it needs without the Agent SDK.
mkdir -p "$work/runner" "$work/bin" "$work/home"
cp "$seed/runner/worker.js" "$work/runner/"
printf '{"name":"openclaw-runner-check","type":"module","private":true}\n' >"$work/runner/package.json"
(cd "$work/runner" && npm install --silent --no-audit --no-fund https-proxy-agent@7 >/dev/null)
cat >"$work/bin/claude" <<'EOF'
#!/bin/sh
for a; do last="$a"; done
echo "answer to: $last"
EOF
chmod +x "$work/bin/claude"

# A Discord stand-in that records what it is sent (the runner sends chunked bodies).
cat >"$work/discord.py" <<'EOF'
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.headers.get('transfer-encoding', '').lower() == 'chunked':
            body = b''
            while True:
                n = int(self.rfile.readline().strip().split(b';')[0], 16)
                if n == 0:
                    self.rfile.readline(); break
                body += self.rfile.read(n); self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get('content-length') or 0))
        with open(sys.argv[2], 'a') as f:
            f.write(json.dumps({"path": self.path, "auth": self.headers.get('authorization'),
                                "content": json.loads(body or b'{}').get('content')}) + "\n")
        out = b'{"id": "1"}'
        self.send_response(200); self.send_header('content-type', 'application/json')
        self.send_header('content-length', str(len(out))); self.end_headers(); self.wfile.write(out)
    do_PATCH = do_POST
    def log_message(self, *a): pass
HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
EOF

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
fail() { echo "FAIL: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

run_case() { # $1 = runner | server: who has the Discord bot
  local who=$1 dir="$work/$1" sport dport
  mkdir -p "$dir"
  sport=$(free_port); dport=$(free_port)
  export WORKER_TOKEN=openclaw-check-$RANDOM-7f3a9c2e1d4b
  python3 "$work/discord.py" "$dport" "$dir/discord.log" & pids+=($!)
  local server_env=()
  [ "$who" = server ] && server_env=(CALLBACK_BOT_TOKEN=server-bot-token CALLBACK_API_BASE_URL=http://127.0.0.1:$dport)
  env ${server_env[@]+"${server_env[@]}"} "$tunnel" serve --listen "127.0.0.1:$sport" --database "$dir/t.db" \
    >"$dir/serve.log" 2>&1 & pids+=($!)
  local u=http://127.0.0.1:$sport
  for _ in $(seq 50); do curl -sf "$u/health" >/dev/null && break; sleep 0.1; done
  (cd "$work/runner" && WORKER_URL=$u CLAUDE_PATH="$work/bin/claude" HOME="$work/home" \
    CALLBACK_API_BASE_URL=http://127.0.0.1:$dport CALLBACK_BOT_TOKEN=runner-bot-token \
    LONG_POLL_WAIT=5000 RUNNER_SESSION_CACHE_FILE="$dir/cache.json" exec node worker.js >"$dir/runner.log" 2>&1) & pids+=($!)

  local h=(-H "Authorization: Bearer $WORKER_TOKEN" -H "Content-Type: application/json")
  local a sid ta tb tc tw
  a=$(curl -sf "${h[@]}" "$u/claude" -d '{"prompt":"first","timeout":1200000,"callbackChannel":"111222333","origin":"openclaw-cli-bridge","dispatchMode":"direct-command","responseMode":"direct-callback","entrypoint":"cc","callbackBotToken":"PLUGIN-BOT-TOKEN-SECRET"}')
  sid=$(json '["sessionId"]' <<<"$a"); ta=$(json '["taskId"]' <<<"$a")
  tb=$(curl -sf "${h[@]}" "$u/claude" -d "{\"prompt\":\"second\",\"timeout\":1200000,\"callbackChannel\":\"111222333\",\"sessionId\":\"$sid\",\"entrypoint\":\"cc\",\"callbackBotToken\":\"PLUGIN-BOT-TOKEN-SECRET\"}" | json '["taskId"]')
  tc=$(curl -sf "${h[@]}" "$u/tasks" -d '{"command":"echo from-shell"}' | json '["taskId"]')
  tw=$(curl -sf "${h[@]}" "$u/files/write" -d "{\"path\":\"$dir/note.txt\",\"content\":\"written\"}" | json '["taskId"]')
  for t in "$ta" "$tb" "$tc" "$tw"; do
    local r1 r2
    r1=$(curl -sf "${h[@]}" "$u/tasks/$t?wait=30000")
    r2=$(curl -sf "${h[@]}" "$u/tasks/$t")
    [ "$r1" = "$r2" ] || fail "$who: $t read differently: $r1 / $r2"
    [ "$(json '.get("completedAt") is not None' <<<"$r1")" = True ] || fail "$who: $t did not finish: $r1"
  done
  [ "$(curl -sf "${h[@]}" "$u/tasks/$ta" | json '["stdout"]')" = "answer to: first" ] || fail "$who: first answer"
  [ "$(curl -sf "${h[@]}" "$u/tasks/$tw" | json '["exitCode"]')" = 0 ] || fail "$who: file write"
  [ "$(cat "$dir/note.txt")" = written ] || fail "$who: note.txt"
  grep -q -- "--resume\" \"$sid\"" "$dir/runner.log" || fail "$who: the second prompt did not resume session $sid"
  if grep -q PLUGIN-BOT-TOKEN-SECRET "$dir"/t.db*; then fail "$who: the plugin's bot token reached the database"; fi
  sleep 1
  local finals
  finals=$(grep -c 'answer to: first' "$dir/discord.log" || true)
  [ "$finals" = 1 ] || fail "$who: the first answer was posted $finals times: $(cat "$dir/discord.log")"
  if [ "$who" = server ]; then
    grep -q runner-bot-token "$dir/discord.log" && fail "server: the runner posted too"
    grep -q 'Bot server-bot-token' "$dir/discord.log" || fail "server: the server did not post"
  else
    grep -q 'Bot runner-bot-token' "$dir/discord.log" || fail "runner: the runner did not post"
  fi
  echo "ok: bot on the $who: 4 tasks done, results read twice, session resumed, answer posted once"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

run_case runner
run_case server
