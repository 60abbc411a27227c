// The plugin registered on a fake OpenClaw api, its handlers called with realistic contexts for
// each channel shape, and the tunnel server replaced by a scripted fetch that records requests.

import { test } from "node:test";
import assert from "node:assert/strict";

import { register } from "../../src/plugin.ts";
import { MessageIds } from "../../src/msgids.ts";
import { Watcher } from "../../src/watcher.ts";
import { DISCORD_SLASH, FakeApi, TELEGRAM_DM, TELEGRAM_TOPIC } from "../support/fake-api.ts";

interface Req {
  method: string;
  path: string;
  headers: Record<string, string>;
  body: any;
}

type Route = (r: Req) => { status: number; body?: unknown; raw?: string } | undefined;

function fakeFetch(route: Route) {
  const requests: Req[] = [];
  const fn = (async (input: string | URL | Request, init?: RequestInit) => {
    const url = new URL(String(input));
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries((init?.headers ?? {}) as Record<string, string>)) headers[k.toLowerCase()] = v;
    const req: Req = {
      method: init?.method ?? "GET",
      path: url.pathname + url.search,
      headers,
      body: init?.body ? JSON.parse(String(init.body)) : undefined,
    };
    requests.push(req);
    const r = route(req) ?? { status: 404, body: { error: { code: "not_found", message: "no such route" } } };
    return new Response(r.raw ?? (r.body === undefined ? null : JSON.stringify(r.body)), {
      status: r.status,
      headers: { "content-type": "application/json" },
    });
  }) as typeof fetch;
  return { fn, requests };
}

const TASK_ID = "0b7d1f5e-1111-4222-8333-444455556666";

function task(p: Record<string, unknown> = {}) {
  return { id: TASK_ID, agent: "claude", prompt: "x", session: "continue", state: "queued", attempt: 0, queue_position: 0, created_at: 1, ...p };
}

/** A scripted server: submit → queued task, one online runner, empty sessions. */
function happy(extra: Route = () => undefined): Route {
  return (r) =>
    extra(r) ??
    (r.method === "POST" && r.path === "/v1/tasks"
      ? { status: 201, body: task({ prompt: r.body.prompt, agent: r.body.agent }) }
      : r.path === "/v1/runners"
        ? { status: 200, body: { runners: [{ name: "mac-mini", agents: ["claude", "codex"], projects: [], capacity: 1, last_seen: 1, first_seen: 1, online: true, active_tasks: 0 }] } }
        : r.path.startsWith("/v1/sessions?")
          ? { status: 200, body: { sessions: [], recent: [] } }
          : undefined);
}

function setup(route: Route, pluginConfig: Record<string, unknown> = { token: "tnl_test", serverUrl: "http://tunnel.test" }) {
  const api = new FakeApi(pluginConfig);
  const f = fakeFetch(route);
  const watcher = new Watcher();
  const messageIds = new MessageIds();
  register(api, { fetch: f.fn, watcher, messageIds, env: {} });
  return { api, requests: f.requests, watcher, messageIds };
}

test("registers every command, the delivery service, four optional tools and the message hook", () => {
  const { api } = setup(happy());
  const names = [...api.commands.keys()].sort();
  const expected: string[] = ["cli-state"];
  for (const base of ["cc", "cx", "gemini"]) {
    expected.push(base, ...["new", "recent", "resume", "now", "stop", "status", "approve"].map((s) => `${base}-${s}`));
  }
  assert.deepEqual(names, expected.sort());
  for (const c of api.commands.values()) {
    assert.equal(c.acceptsArgs, true, c.name);
    assert.equal(c.requireAuth, true, c.name);
    assert.ok(c.description.length > 5, c.name);
  }
  assert.deepEqual(api.services.map((s) => s.id), ["tunnel-delivery"]);
  assert.deepEqual([...api.tools.keys()].sort(), ["cc_call", "codex_call", "gemini_call", "tunnel_state"]);
  for (const t of api.tools.values()) assert.equal(t.optional, true);
  assert.equal(api.hooks.length, 1);
});

test("command names come from the config", () => {
  const { api } = setup(happy(), { token: "t", commands: { claude: "claude", codex: "codexcli", state: "tunnel" } });
  for (const n of ["claude", "claude-new", "codexcli", "codexcli-status", "gemini", "tunnel"]) assert.ok(api.commands.has(n), n);
  assert.ok(!api.commands.has("cc"));
  assert.ok(!api.commands.has("cli-state"));
});

test("/cc <prompt> in a Telegram topic submits with the topic's conversation and the message id as Idempotency-Key", async () => {
  const { api, requests, watcher } = setup(happy());
  // OpenClaw's message_received hook reports the message before the command runs.
  api.hooks[0]({ from: "telegram:group:-100555:topic:42", content: "/cc@tunnel_bot fix the build", messageId: "777", senderId: "111" }, { channelId: "telegram" });
  const r = await api.run("/cc fix the build", TELEGRAM_TOPIC);
  const submit = requests.find((q) => q.method === "POST" && q.path === "/v1/tasks")!;
  assert.deepEqual(submit.body, { agent: "claude", prompt: "fix the build", conversation: "telegram:-100555:topic:42", session: "continue" });
  assert.equal(submit.headers["idempotency-key"], "openclaw:telegram:-100555:topic:42:777");
  assert.equal(submit.headers.authorization, "Bearer tnl_test");
  assert.equal(r.isError, undefined);
  assert.match(r.text!, /^⏳ Queued for Claude — task `0b7d1f5e`, next in line\.\nRunner: mac-mini$/);
  // Plugin delivery: the service will follow it and answer in the topic.
  assert.deepEqual(watcher.list().map((w) => [w.taskId, w.target]), [
    [TASK_ID, { channel: "telegram", to: "-100555", accountId: "default", threadId: 42 }],
  ]);
});

test("without a known message id each command gets its own Idempotency-Key", async () => {
  const { api, requests } = setup(happy());
  await api.run("/cc hello", TELEGRAM_DM);
  await api.run("/cc hello", TELEGRAM_DM);
  const keys = requests.filter((q) => q.path === "/v1/tasks").map((q) => q.headers["idempotency-key"]);
  assert.equal(keys.length, 2);
  for (const k of keys) assert.match(k, /^openclaw:[0-9a-f-]{36}$/);
  assert.notEqual(keys[0], keys[1]);
});

test("a submit that failed on the network is retried once with the same key", async () => {
  const api = new FakeApi({ token: "t", serverUrl: "http://tunnel.test" });
  const f = fakeFetch(happy());
  let calls = 0;
  const flaky = (async (input: string | URL | Request, init?: RequestInit) => {
    if (String(input).endsWith("/v1/tasks") && calls++ === 0) {
      f.requests.push({ method: "POST", path: "/v1/tasks", headers: { ...(init?.headers as Record<string, string>) }, body: JSON.parse(String(init?.body)) });
      throw new TypeError("fetch failed", { cause: { code: "ECONNRESET" } });
    }
    return f.fn(input, init);
  }) as typeof fetch;
  const deps = register(api, { fetch: flaky, watcher: new Watcher(), messageIds: new MessageIds(), env: {} });
  deps.retryDelayMs = 1;
  const r = await api.run("/cc hello", TELEGRAM_DM);
  assert.match(r.text!, /^⏳ Queued for Claude/);
  const keys = f.requests.filter((q) => q.path === "/v1/tasks").map((q) => q.headers["idempotency-key"]);
  assert.equal(keys.length, 2);
  assert.equal(keys[0], keys[1]);
  assert.match(api.warnings()[0], /retrying once with the same Idempotency-Key/);
});

test("a replayed submit (200) says it was already submitted and is not followed twice", async () => {
  const { api, watcher } = setup(happy((r) => (r.path === "/v1/tasks" ? { status: 200, body: task({ state: "running" }) } : undefined)));
  const r = await api.run("/cc hello", TELEGRAM_DM);
  assert.equal(r.text, "↩️ Already submitted as Claude task `0b7d1f5e` (running).");
  assert.equal(watcher.list().length, 0);
});

test("queue position and a missing runner are in the acknowledgement", async () => {
  const { api } = setup(
    happy((r) =>
      r.path === "/v1/tasks" ? { status: 201, body: task({ agent: "gemini", queue_position: 2 }) } : r.path === "/v1/runners" ? { status: 200, body: { runners: [] } } : undefined,
    ),
  );
  const r = await api.run("/gemini summarise the diff", DISCORD_SLASH);
  assert.equal(r.text, "⏳ Queued for Gemini — task `0b7d1f5e`, 2 ahead of it.\n⚠️ No runner for gemini is online; it waits until one is.");
});

test("/cc-new and /cc new <prompt> ask for a new session; /cc-new alone resets via the sessions API", async () => {
  const { api, requests } = setup(happy((r) => (r.path === "/v1/sessions/new" ? { status: 200, body: { conversation: r.body.conversation, agent: r.body.agent, updated_at: 1 } } : undefined)));
  await api.run("/cc-new write the changelog", TELEGRAM_DM);
  await api.run("/cc new write it again", TELEGRAM_DM);
  const submits = requests.filter((q) => q.path === "/v1/tasks").map((q) => [q.body.prompt, q.body.session]);
  assert.deepEqual(submits, [
    ["write the changelog", "new"],
    ["write it again", "new"],
  ]);
  const r = await api.run("/cc-new", DISCORD_SLASH);
  assert.equal(r.text, "🔄 Claude session reset. The next /cc starts a new session.");
  const reset = requests.find((q) => q.path === "/v1/sessions/new")!;
  assert.deepEqual(reset.body, { conversation: "discord:channel:800000000000000001", agent: "claude" });
});

test("/cc newsletter is a prompt, not a reset (the original's prefix bug)", async () => {
  const { api, requests } = setup(happy());
  await api.run("/cc newsletter for the team", TELEGRAM_DM);
  assert.equal(requests.filter((q) => q.path === "/v1/sessions/new").length, 0);
  assert.deepEqual(
    requests.filter((q) => q.path === "/v1/tasks").map((q) => [q.body.prompt, q.body.session]),
    [["newsletter for the team", "continue"]],
  );
});

test("/cx-resume <prefix> [prompt] resolves the prefix among recent sessions", async () => {
  const full = "3f2a9c1e-aaaa-4bbb-8ccc-0123456789ab";
  const { api, requests } = setup(
    happy((r) =>
      r.path.startsWith("/v1/sessions?agent=codex")
        ? { status: 200, body: { sessions: [], recent: [{ agent: "codex", session_id: full, runner: "mac-mini", last_used: 1 }] } }
        : r.path === "/v1/sessions/resume"
          ? { status: 200, body: { conversation: r.body.conversation, agent: "codex", session_id: r.body.session_id, runner: "mac-mini", updated_at: 1 } }
          : undefined,
    ),
  );
  const r = await api.run("/cx-resume 3f2a9c1e", TELEGRAM_DM);
  assert.equal(r.text, "🔗 Switched to Codex session `3f2a9c1e-aaaa-4bbb-8ccc-0123456789ab` (on runner mac-mini).\nThe next /cx <prompt> continues it.");
  assert.deepEqual(requests.find((q) => q.path === "/v1/sessions/resume")!.body, { conversation: "telegram:111", agent: "codex", session_id: full });
  await api.run("/cx-resume 3f2a9c1e and add tests", TELEGRAM_DM);
  assert.deepEqual(requests.filter((q) => q.path === "/v1/tasks").map((q) => q.body.session), [{ resume: full }]);
});

test("a bad resume id is a usage reply, never a prompt (the original submitted '接续…')", async () => {
  const { api, requests } = setup(happy());
  const r = await api.run("/cc-resume", TELEGRAM_DM);
  assert.equal(r.isError, true);
  assert.match(r.text!, /Usage: \/cc-resume <session id> \[prompt\]/);
  assert.equal(requests.length, 0);
});

test("server delivery sends reply_to and does not follow the task", async () => {
  const { api, requests, watcher } = setup(happy(), { token: "t", delivery: "server" });
  const r = await api.run("/cc hi", TELEGRAM_TOPIC);
  assert.deepEqual(requests.find((q) => q.path === "/v1/tasks")!.body.reply_to, { platform: "telegram", channel: "-100555", thread: "42" });
  // The server posts the acknowledgement as the task's first chat message (issue #18: a
  // command's reply can arrive after the answer); the command itself says nothing.
  assert.deepEqual(r, { suppressReply: true });
  assert.equal(watcher.list().length, 0);
});

test("server delivery warns in the reply when no runner can take the task", async () => {
  const none = happy((r) => (r.path === "/v1/runners" ? { status: 200, body: { runners: [] } } : undefined));
  const { api } = setup(none, { token: "t", delivery: "server" });
  const r = await api.run("/cc hi", TELEGRAM_DM);
  assert.equal(r.text, "⚠️ No runner for claude is online; the task waits until one is.");
});

test("server delivery on a channel the server cannot reach refuses before submitting", async () => {
  const { api, requests } = setup(happy(), { token: "t", delivery: "server" });
  const r = await api.run("/cc hi", { channel: "slack", from: "slack:channel:C1", to: "channel:C1", senderId: "U1", accountId: undefined });
  assert.equal(r.isError, true);
  assert.match(r.text!, /Not submitted: server delivery supports Discord and Telegram only/);
  assert.equal(requests.length, 0);
});

test("errors never throw into OpenClaw: unreachable server → clear reply and a log line", async () => {
  const api = new FakeApi({ token: "t", serverUrl: "http://127.0.0.1:9" });
  const failing = (async () => {
    throw new TypeError("fetch failed", { cause: { code: "ECONNREFUSED" } });
  }) as typeof fetch;
  register(api, { fetch: failing, watcher: new Watcher(), messageIds: new MessageIds(), env: {} });
  for (const body of ["/cc hi", "/cc-new", "/cc-recent", "/cc-now", "/cc-stop", "/cc-status", "/cc-resume abc123", "/cc", "/cli-state"]) {
    const r = await api.run(body, TELEGRAM_DM);
    assert.match(r.text!, /Cannot reach the tunnel server at http:\/\/127\.0\.0\.1:9|Server not reachable/, body);
  }
  assert.ok(api.warnings().length >= 8);
  assert.ok(
    api.warnings().some((w) => /^tunnel: \/cc failed: TunnelError: cannot reach the tunnel server at http:\/\/127\.0\.0\.1:9 \(ECONNREFUSED\)$/.test(w)),
    api.warnings().join("\n"),
  );
});

test("a refused token and a server error are explained", async () => {
  const { api } = setup(() => ({ status: 401, body: { error: { code: "unauthorized", message: "missing or invalid bearer token" } } }));
  const r = await api.run("/cc hi", TELEGRAM_DM);
  assert.equal(r.text, "❌ The tunnel server refused the plugin's token (unauthorized). Check plugins.entries.tunnel.config.token.");
  const { api: api2 } = setup(() => ({ status: 502, raw: "<html>bad gateway</html>" }));
  const r2 = await api2.run("/cc hi", TELEGRAM_DM);
  assert.equal(r2.text, "❌ /cc failed: HTTP 502 from the tunnel server");
  assert.equal(r2.isError, true);
});

test("no token configured: the reply says how to set it, and nothing is sent", async () => {
  const { api, requests } = setup(happy(), {});
  const r = await api.run("/cc hi", TELEGRAM_DM);
  assert.match(r.text!, /has no token/);
  assert.equal(requests.length, 0);
});

test("cc_call returns the task id at once, and the session id when it waits", async () => {
  let polls = 0;
  const { api, requests } = setup(
    happy((r) => {
      if (r.path === "/v1/tasks") return { status: 201, body: task({ prompt: r.body.prompt }) };
      if (r.path.startsWith(`/v1/tasks/${TASK_ID}?wait=`)) {
        polls++;
        return { status: 200, body: task({ state: "succeeded", queue_position: undefined, result: { text: "done", session_id: "sess-9" } }) };
      }
      return undefined;
    }),
  );
  const tool = api.tools.get("cc_call")!.tool;
  const quick = await tool.execute("call-1", { prompt: "look at the logs" });
  assert.deepEqual(quick.details, { task_id: TASK_ID, state: "queued", done: false, queue_position: 0 });
  const waited = await tool.execute("call-2", { prompt: "again", session_id: "sess-9", wait_seconds: 30 });
  assert.deepEqual(waited.details, { task_id: TASK_ID, state: "succeeded", done: true, session_id: "sess-9", text: "done" });
  assert.equal(polls, 1);
  assert.deepEqual(requests.filter((q) => q.path === "/v1/tasks").map((q) => q.body.session), ["continue", { resume: "sess-9" }]);
  const bad = await tool.execute("call-3", { prompt: "" });
  assert.deepEqual(bad.details, { error: "prompt is required" });
});
