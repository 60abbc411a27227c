// The plugin (on a fake OpenClaw api) against a real `tunnel serve` started by the test; the
// test plays the runner over HTTP. Set TUNNEL_BIN to the binary (default ../target/debug/tunnel).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { register } from "../../src/plugin.ts";
import { MessageIds } from "../../src/msgids.ts";
import { Watcher } from "../../src/watcher.ts";
import type { CommandContext } from "../../src/types.ts";
import { DISCORD_SLASH, DISCORD_SLASH_DM, DISCORD_TEXT, FakeApi, TELEGRAM_DM, TELEGRAM_TOPIC } from "../support/fake-api.ts";
import { TestRunner, TunnelServer } from "../support/server.ts";
import { FakeTelegram, visibleText } from "../e2e/fake-telegram.ts";
import { FakeDiscord } from "../e2e/fake-discord.ts";
import type { OutboundText } from "../../src/types.ts";

let server: TunnelServer;
let clientToken: string;
let runner: TestRunner;
/** The server's own Telegram delivery posts here (server delivery mode). */
let telegram: FakeTelegram;
const BOT_TOKEN = "123456789:FAKE-integration-token";
const stateDirs: string[] = [];
/** Every started delivery service, stopped at the end even when a test failed half-way. */
const running: Watcher[] = [];

before(async () => {
  telegram = new FakeTelegram(BOT_TOKEN);
  await telegram.start();
  server = await TunnelServer.start({ TELEGRAM_BOT_TOKEN: BOT_TOKEN, TELEGRAM_API_BASE_URL: telegram.apiRoot });
  clientToken = await server.token("client");
  runner = new TestRunner(server, await server.token("runner"));
});

after(async () => {
  await Promise.all(running.map((w) => w.stop()));
  await server?.stop();
  await telegram?.stop();
  for (const d of stateDirs) rmSync(d, { recursive: true, force: true });
});

let n = 0;
/** A plugin instance with its own watcher; `chat` makes conversations unique per test. */
async function plugin(config: Record<string, unknown> = {}, start = true) {
  const api = new FakeApi({ serverUrl: server.url, token: clientToken, ...config });
  const watcher = new Watcher();
  running.push(watcher);
  const messageIds = new MessageIds();
  register(api, { watcher, messageIds, env: {}, progressAfterMs: 0, retryDelaysMs: [50, 100, 200] });
  const stateDir = mkdtempSync(path.join(process.env.TMPDIR ?? tmpdir(), "tunnel-plugin-state-"));
  stateDirs.push(stateDir);
  if (start) await api.services[0].start({ config: api.config, stateDir, logger: api.logger });
  const chat = String(100000 + ++n);
  const dm: Partial<CommandContext> = { ...TELEGRAM_DM, senderId: chat, from: `telegram:${chat}`, to: `telegram:${chat}` };
  return { api, watcher, messageIds, stateDir, chat, dm };
}

async function until<T>(what: string, fn: () => T | undefined | false, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

test("/cc hello: acknowledged at once, run by the runner, answer sent through the outbound adapter", async () => {
  const { api, watcher, chat, dm } = await plugin();
  const ack = await api.run("/cc hello", dm);
  assert.match(ack.text!, /^⏳ Queued for Claude — task `[0-9a-f]{8}`, next in line\.\n(Runner: runner-1|⚠️ No runner for claude is online; it waits until one is\.)$/);
  const offer = await runner.serveOne();
  assert.equal(offer.task.prompt, "hello");
  assert.equal(offer.task.conversation, `telegram:${chat}`);
  assert.equal(offer.task.reply_to, undefined);
  const sent = await until("the answer", () => api.sent.find((s) => s.text.startsWith("✅")));
  assert.equal(sent.channel, "telegram");
  assert.equal(sent.to, chat);
  assert.deepEqual(sent.cfg, api.config);
  assert.match(sent.text, /^✅ Claude · 1s · session `5e55[0-9a-f]{4}-0000-4000-8000-000000000001`\n\necho: hello$/);
  await until("the watch list to empty", () => watcher.list().length === 0);
  await api.services[0].stop!({ config: api.config, stateDir: "", logger: api.logger });
});

test("the session is bound on the server: the next /cc continues it, /cc-now shows it, /cc-new resets it", async () => {
  const { api, dm, chat } = await plugin();
  await api.run("/cc first", dm);
  const first = await runner.serveOne();
  assert.equal(first.resume_session_id, undefined);
  const sid = `5e55${first.task.id.replace(/-/g, "").slice(0, 4)}-0000-4000-8000-000000000001`;
  await until("first answer", () => api.sent.some((s) => s.text.includes("echo: first")));
  assert.equal((await api.run("/cc-now", dm)).text, `Current Claude session: \`${sid}\` (runner runner-1)`);
  await api.run("/cc second", dm);
  const second = await runner.serveOne();
  assert.equal(second.resume_session_id, sid, "the second task resumes the first one's session");
  await until("second answer", () => api.sent.some((s) => s.text.includes("echo: second")));
  // Codex in the same chat has its own (empty) session.
  assert.equal((await api.run("/cx-now", dm)).text, "No active Codex session here. /cx <prompt> starts one.");
  assert.equal((await api.run("/cc-new", dm)).text, "🔄 Claude session reset. The next /cc starts a new session.");
  assert.equal((await api.run("/cc-now", dm)).text, "No active Claude session here. /cc <prompt> starts one.");
  await api.run("/cc third", dm);
  const third = await runner.serveOne();
  assert.equal(third.resume_session_id, undefined, "after a reset the next task starts fresh");
  // The binding is on the server, shared with the CLI: read it back over HTTP.
  const list = await server.call("GET", `/v1/sessions?conversation=telegram:${chat}&agent=claude`, clientToken);
  assert.equal(list.body.sessions[0].session_id, `5e55${third.task.id.replace(/-/g, "").slice(0, 4)}-0000-4000-8000-000000000001`);
  await until("third answer", () => api.sent.some((s) => s.text.includes("echo: third")));
  await api.services[0].stop!({ config: api.config, stateDir: "", logger: api.logger });
});

test("/cc-resume binds a recent session; /cc-recent lists it; the next task resumes it", async () => {
  const { api, dm } = await plugin();
  const other = await plugin();
  await other.api.run("/cc make a session elsewhere", other.dm);
  const o = await runner.serveOne();
  const sid = `5e55${o.task.id.replace(/-/g, "").slice(0, 4)}-0000-4000-8000-000000000001`;
  await until("answer elsewhere", () => other.api.sent.length > 0);
  const recent = await api.run("/cc-recent", dm);
  assert.match(recent.text!, /^📋 Recent Claude sessions:\n1\. `/);
  assert.ok(recent.text!.includes(`\`${sid}\` — runner runner-1 · `), recent.text);
  const r = await api.run(`/cc-resume ${sid.slice(0, 8)}`, dm);
  assert.equal(r.text, `🔗 Switched to Claude session \`${sid}\` (on runner runner-1).\nThe next /cc <prompt> continues it.`);
  await api.run("/cc go on", dm);
  const next = await runner.serveOne();
  assert.equal(next.resume_session_id, sid);
  await until("answer", () => api.sent.some((s) => s.text.includes("echo: go on")));
  for (const p of [api, other.api]) await p.services[0].stop!({ config: {}, stateDir: "", logger: p.logger });
});

test("/cc-status shows running and queued tasks with queue position; /cc-stop cancels the running one", async () => {
  const { api, dm } = await plugin();
  await api.run("/cc long job", dm);
  const ack2 = await api.run("/cc queued behind it", dm);
  assert.match(ack2.text!, /1 ahead of it\./);
  const offer = await runner.claim();
  assert.ok(offer);
  assert.equal(offer.task.prompt, "long job");
  await runner.ack(offer);
  const status = await api.run("/cc-status", dm);
  const lines = status.text!.split("\n");
  assert.equal(lines[0], "Claude tasks here:");
  assert.match(lines[1], /^▶️ running on runner-1 for \d+s — `[0-9a-f]{8}` long job$/);
  // The running task counts as ahead of it (the server's queue_position).
  assert.match(lines[2], /^⏳ queued, 1 ahead of it — `[0-9a-f]{8}` queued behind it$/);
  const stop = await api.run("/cc-stop", dm);
  assert.match(stop.text!, /^🛑 Stopping Claude task `[0-9a-f]{8}` on runner-1…$/);
  assert.equal((await runner.heartbeat(offer)).cancel, true, "the runner learns of the cancel");
  await runner.finish(offer, "cancelled", {});
  const cancelled = await until("the cancel notice", () => api.sent.find((s) => s.text.startsWith("🛑")));
  assert.match(cancelled.text, /^🛑 Claude task `[0-9a-f]{8}` cancelled after \d+s\.$/);
  // The queued one is next; stop all cancels it before it runs.
  const stopAll = await api.run("/cc-stop all", dm);
  assert.match(stopAll.text!, /^🛑 Cancelled Claude task `[0-9a-f]{8}` \(queued behind it\)\.$/);
  assert.equal((await api.run("/cc-status", dm)).text, "No Claude tasks running or queued here.");
  assert.equal((await api.run("/cc-stop", dm)).text, "Nothing Claude is running here.");
  assert.equal(await runner.claim(300), undefined, "nothing left to run");
  await until("two cancel notices", () => api.sent.filter((s) => s.text.startsWith("🛑")).length === 2);
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("a task that waited gets a start notice; failures carry the error", async () => {
  const { api, dm } = await plugin();
  await api.run("/gemini break please", dm);
  const o = await runner.claim();
  assert.ok(o);
  await runner.ack(o);
  const started = await until("start notice", () => api.sent.find((s) => s.text.startsWith("▶️")));
  assert.match(started.text, /^▶️ Gemini started task `[0-9a-f]{8}` on runner-1\.$/);
  await runner.finish(o, "failed", { error: "gemini exited with code 1", stderr_tail: "quota exceeded" });
  const failed = await until("failure", () => api.sent.find((s) => s.text.startsWith("❌")));
  assert.match(failed.text, /^❌ Gemini failed · \d+s\.\n\ngemini exited with code 1\n\nstderr:\n```\nquota exceeded\n```$/);
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("a channel the plugin cannot edit (Slack) gets one start notice and the answer, not a message per step", async () => {
  // plugin() registers without a Telegram or Discord account resolver: no controls anywhere,
  // which is what every channel but those two has.
  const { api } = await plugin();
  const to = `channel:C${Date.now()}`;
  await api.run("/cc build it", { channel: "slack", from: `slack:${to}`, to, senderId: "U1", isAuthorizedSender: true });
  const o = await runner.claim();
  assert.ok(o);
  assert.equal(o.task.conversation, `slack:${to}`);
  await runner.ack(o);
  await until("start notice", () => api.sent.find((s) => s.to === to && s.text.startsWith("▶️")));
  for (let n = 1; n <= 5; n++) {
    await runner.events(o, [{ n, kind: "tool_use", data: { name: "Bash", input: { command: `step ${n}` } } }]);
    await new Promise((r) => setTimeout(r, 100));
  }
  await runner.finish(o, "succeeded", { text: "built", session_id: "aaaabbbb-0000-4000-8000-000000000051" });
  await until("the answer", () => api.sent.find((s) => s.to === to && s.text.endsWith("built")));
  await new Promise((r) => setTimeout(r, 500));
  const texts = api.sent.filter((s) => s.to === to).map((s) => s.text);
  assert.equal(texts.length, 2, `one start notice and the answer: ${JSON.stringify(texts)}`);
  assert.match(texts[0], /^▶️ Claude started task `[0-9a-f]{8}` on runner-1\.$/);
  assert.match(texts[1], /^✅ Claude · \d+s · session .*\n\nbuilt$/);
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("Discord: one progress message edited in place over Discord's REST, a 429's retry_after honoured, the outcome before the answer, nothing after it", async () => {
  const DC_TOKEN = "MTQwMDAwMDAwMDAwMDAwMDAwMQ.GfAkEe.integration-token_XYZ";
  const dc = new FakeDiscord(DC_TOKEN);
  await dc.start();
  try {
    const api = new FakeApi({ serverUrl: server.url, token: clientToken });
    // OpenClaw's Discord outbound adapter as far as the plugin sees it: it creates the message
    // (a DM through the user's DM channel) and returns its id.
    const loadAdapter = api.runtime.channel.outbound.loadAdapter;
    api.runtime.channel.outbound.loadAdapter = async (channel: string) => {
      if (channel !== "discord") return loadAdapter(channel);
      return {
        textChunkLimit: 2000,
        sendText: async (ctx: OutboundText) => {
          const chan = ctx.to.startsWith("user:") ? dc.dmChannel(ctx.to.slice(5)).id : ctx.to.replace(/^channel:/, "");
          const res = await fetch(`${dc.apiUrl}/channels/${chan}/messages`, {
            method: "POST",
            headers: { authorization: `Bot ${DC_TOKEN}`, "content-type": "application/json" },
            body: JSON.stringify({ content: ctx.text }),
          });
          if (res.status !== 200) throw new Error(`create: ${res.status}`);
          return { channel: "discord", messageId: ((await res.json()) as { id: string }).id, target: { kind: "channel", id: chan } };
        },
      };
    };
    const watcher = new Watcher();
    running.push(watcher);
    register(api, {
      watcher,
      messageIds: new MessageIds(),
      env: { DISCORD_API_URL: dc.apiUrl },
      progressAfterMs: 0,
      progressEveryMs: 300,
      retryDelaysMs: [50, 100, 200],
      discordAccount: () => ({ token: DC_TOKEN }),
    });
    const stateDir = mkdtempSync(path.join(process.env.TMPDIR ?? tmpdir(), "tunnel-plugin-state-"));
    stateDirs.push(stateDir);
    await api.services[0].start({ config: api.config, stateDir, logger: api.logger });
    const user = `9${Date.now()}`.slice(0, 18);
    await api.run("/cc run the tests", { ...DISCORD_SLASH_DM, senderId: user, from: `discord:${user}`, to: `slash:${user}` });
    const chan = dc.dmChannel(user).id;
    const o = await runner.claim();
    assert.ok(o);
    assert.equal(o.task.conversation, `discord:dm:${user}`);
    await runner.ack(o);
    const msg = await until("the progress message", () => dc.botMessages(chan)[0]);
    assert.match(msg.content, /^⏳ claude · working… \d+s$/);
    await runner.events(o, [{ n: 1, kind: "tool_use", data: { name: "Bash", input: { command: "cargo test" } } }]);
    await until("the first step", () => msg.content.includes("› Bash: cargo test"));
    const edits = () => dc.callsOf("PATCH", new RegExp(`^/channels/${chan}/messages/${msg.id}$`));
    dc.rateLimitOnce(/^PATCH /, 1.0);
    await runner.events(o, [{ n: 2, kind: "tool_use", data: { name: "Read", input: { file_path: "src/lib.rs" } } }]);
    await until("the second step", () => msg.content.includes("› Read: src/lib.rs"));
    const limited = edits().find((c) => c.status === 429)!;
    assert.ok(limited, "an edit got 429");
    const next = edits().find((c) => c.at > limited.at)!;
    assert.ok(next.at - limited.at >= 950, `the next edit waited retry_after: ${next.at - limited.at} ms`);
    assert.ok(dc.callsOf("POST", new RegExp(`^/channels/${chan}/typing$`)).length >= 1, "typing…");

    // A 429 just before the end: the outcome edit waits it out, and only then the answer goes.
    dc.rateLimitOnce(/^PATCH /, 0.8);
    await runner.events(o, [{ n: 3, kind: "tool_use", data: { name: "Edit", input: { file_path: "src/main.rs" } } }]);
    await until("the 429", () => edits().filter((c) => c.status === 429).length === 2);
    await runner.finish(o, "succeeded", { text: "all green", session_id: "aaaabbbb-0000-4000-8000-0000000000d2", duration_ms: 2000 });
    await until("the answer", () => dc.botMessages(chan).find((m) => m.content.endsWith("all green")));
    await new Promise((r) => setTimeout(r, 1500));
    const shown = dc.botMessages(chan).map((m) => m.content);
    assert.deepEqual(shown.length, 2, JSON.stringify(shown));
    assert.equal(shown[0], "✅ claude · done in 2s — the answer follows");
    assert.match(shown[1], /^✅ Claude · 2s · session `aaaabbbb-0000-4000-8000-0000000000d2`\n\nall green$/);
    const answerAt = dc.callsOf("POST", new RegExp(`^/channels/${chan}/messages$`)).at(-1)!.at;
    const lastEdit = edits().at(-1)!;
    assert.equal(lastEdit.status, 200);
    assert.ok(lastEdit.at < answerAt, "the outcome edit came before the answer");
    assert.ok(lastEdit.at - edits().filter((c) => c.status === 429)[1].at >= 750, "the outcome edit waited out the 429");
    const late = dc.calls.filter((c) => c.at > answerAt && c.path.startsWith(`/channels/${chan}`));
    assert.deepEqual(late.map((c) => `${c.method} ${c.path}`), [], "nothing after the answer");
    assert.deepEqual(dc.unknown, []);
    await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
  } finally {
    await dc.stop();
  }
});

test("a later registration (OpenClaw calls register() more than once) does not take over sending", async () => {
  const { api, watcher, dm } = await plugin();
  const later = new FakeApi({ serverUrl: server.url, token: clientToken });
  register(later, { watcher, messageIds: new MessageIds(), env: {} });
  await later.run("/cc from a later registration", dm);
  await runner.serveOne();
  await until("the answer", () => api.sent.find((s) => s.text.includes("echo: from a later registration")));
  assert.equal(later.sent.length, 0);
});

test("Discord slash and text commands in one channel share a conversation; the answer goes to the channel, never slash:", async () => {
  const { api } = await plugin();
  const chan = `8${Date.now()}`.slice(0, 18);
  const slash = { ...DISCORD_SLASH, channelId: chan, from: `discord:channel:${chan}` };
  const text = { ...DISCORD_TEXT, from: `discord:channel:${chan}`, to: `channel:${chan}` };
  await api.run("/cx one", slash);
  const a = await runner.serveOne();
  await api.run("/cx two", text);
  const b = await runner.serveOne();
  assert.equal(a.task.conversation, `discord:channel:${chan}`);
  assert.equal(b.task.conversation, a.task.conversation);
  assert.ok(b.resume_session_id, "the text command continued the slash command's session");
  const sent = await until("two answers", () => (api.sent.length >= 2 ? api.sent : undefined));
  for (const s of sent) {
    assert.equal(s.channel, "discord");
    assert.equal(s.to, `channel:${chan}`);
  }
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("a long answer is split at the channel's limit (Discord 2000)", async () => {
  const { api } = await plugin();
  const chan = `81${Date.now()}`.slice(0, 18);
  await api.run("/cc write a lot", { ...DISCORD_TEXT, from: `discord:channel:${chan}`, to: `channel:${chan}` });
  const long = Array.from({ length: 120 }, (_, i) => `line ${i}: ${"lorem ipsum ".repeat(4)}`).join("\n");
  await runner.serveOne(() => ({ text: long, session_id: "aaaabbbb-0000-4000-8000-000000000002" }));
  const parts = await until("all parts", () => {
    const p = api.sent.filter((s) => s.to === `channel:${chan}`);
    return p.length >= 4 && p.some((s) => s.text.includes("line 119:")) ? p : undefined;
  });
  for (const p of parts) assert.ok(p.text.length <= 2000, `part of ${p.text.length}`);
  for (let i = 0; i < 120; i++) assert.ok(parts.some((p) => p.text.includes(`line ${i}: `)), `line ${i}`);
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("Telegram topic: the answer goes to the topic (threadId)", async () => {
  const { api } = await plugin();
  const group = `-100${Date.now()}`.slice(0, 14);
  await api.run("/cc in a topic", { ...TELEGRAM_TOPIC, from: `telegram:group:${group}:topic:42`, to: `telegram:${group}` });
  const o = await runner.serveOne();
  assert.equal(o.task.conversation, `telegram:${group}:topic:42`);
  const s = await until("answer", () => api.sent[0]);
  assert.equal(s.to, group);
  assert.equal(s.threadId, 42);
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("the same chat message id submits once (Idempotency-Key)", async () => {
  const { api, dm, chat } = await plugin();
  const hook = (id: string) =>
    api.hooks[0]({ from: `telegram:${chat}`, content: "/cc only once", messageId: id, senderId: chat }, { channelId: "telegram" });
  hook("42");
  const first = await api.run("/cc only once", dm);
  assert.match(first.text!, /^⏳ Queued/);
  hook("42"); // OpenClaw redelivers the same message
  const again = await api.run("/cc only once", dm);
  assert.match(again.text!, /^↩️ Already submitted as Claude task `[0-9a-f]{8}` \(queued\)\.$/);
  hook("43"); // the user sends the same text again: a new message, a new task
  assert.match((await api.run("/cc only once", dm)).text!, /^⏳ Queued for Claude — task `[0-9a-f]{8}`, 1 ahead of it\./);
  const tasks = await server.call("GET", `/v1/tasks?conversation=telegram:${chat}`, clientToken);
  assert.equal(tasks.body.tasks.length, 2);
  await runner.serveOne();
  await runner.serveOne();
  await until("two answers", () => api.sent.filter((s) => s.text.startsWith("✅")).length === 2);
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("server delivery mode: reply_to goes with the task, the server posts the answer, the plugin sends nothing", async () => {
  const { api, watcher } = await plugin({ delivery: "server" });
  const group = Number(`-100${Date.now() + 1}`.slice(0, 14));
  telegram.addChat(group);
  await runner.touch();
  const r = await api.run("/cc via server", { ...TELEGRAM_TOPIC, from: `telegram:group:${group}:topic:7`, to: `telegram:${group}`, messageThreadId: 7 });
  assert.deepEqual(r, { suppressReply: true }, "the server acknowledges, not the command");
  const ack = await until("the server's acknowledgement", () => telegram.sent.find((p) => Number(p.chat_id) === group));
  assert.match(visibleText(ack.text, ack.parse_mode), /^🕓 claude · queued — task [0-9a-f]{8}, next in line$/);
  const o = await runner.serveOne();
  assert.deepEqual(o.task.reply_to, { platform: "telegram", channel: String(group), thread: "7" });
  assert.equal(watcher.list().length, 0);
  // The tunnel server's own Telegram delivery posts the answer into the topic.
  const posted = await until("the server's sendMessage", () => telegram.sent.find((p) => Number(p.chat_id) === group && visibleText(p.text, p.parse_mode).includes("echo: via server")));
  assert.equal(Number(posted.message_thread_id), 7);
  await new Promise((res) => setTimeout(res, 200));
  assert.equal(api.sent.length, 0, "the plugin itself sent nothing");
});

test("tasks followed before a restart are delivered after it (state file)", async () => {
  const first = await plugin();
  await first.api.run("/cc survive a restart", first.dm);
  await first.api.services[0].stop!({ config: {}, stateDir: first.stateDir, logger: first.api.logger });
  const saved = JSON.parse(readFileSync(path.join(first.stateDir, "tunnel-plugin", "watches.json"), "utf8"));
  assert.equal(saved.length, 1);
  await runner.serveOne();
  // A new process: a new api and watcher on the same state dir.
  const api2 = new FakeApi({ serverUrl: server.url, token: clientToken });
  const watcher2 = new Watcher();
  running.push(watcher2);
  register(api2, { watcher: watcher2, messageIds: new MessageIds(), env: {}, retryDelaysMs: [50] });
  await api2.services[0].start({ config: api2.config, stateDir: first.stateDir, logger: api2.logger });
  const s = await until("answer after restart", () => api2.sent[0]);
  assert.equal(s.to, first.chat);
  assert.match(s.text, /echo: survive a restart$/);
  await until("empty list", () => watcher2.list().length === 0);
  await api2.services[0].stop!({ config: {}, stateDir: "", logger: api2.logger });
});

test("switching to server delivery still finishes the tasks submitted in plugin delivery", async () => {
  const first = await plugin();
  await first.api.run("/cc submitted before the switch", first.dm);
  await first.api.services[0].stop!({ config: {}, stateDir: first.stateDir, logger: first.api.logger });
  const api2 = new FakeApi({ serverUrl: server.url, token: clientToken, delivery: "server" });
  const watcher2 = new Watcher();
  running.push(watcher2);
  register(api2, { watcher: watcher2, messageIds: new MessageIds(), env: {}, retryDelaysMs: [50] });
  await api2.services[0].start({ config: api2.config, stateDir: first.stateDir, logger: api2.logger });
  await runner.serveOne();
  const s = await until("the answer", () => api2.sent[0]);
  assert.match(s.text, /echo: submitted before the switch$/);
  // New tasks in server mode are not followed by the plugin.
  const group = Number(`-100${Date.now() + 2}`.slice(0, 14));
  telegram.addChat(group);
  await api2.run("/cc new in server mode", { ...TELEGRAM_TOPIC, from: `telegram:group:${group}:topic:9`, to: `telegram:${group}`, messageThreadId: 9 });
  assert.equal(watcher2.list().length, 0);
  await runner.serveOne();
  await until("the server's sendMessage", () => telegram.sent.find((p) => Number(p.chat_id) === group));
  assert.equal(api2.sent.length, 1);
});

test("/cli-state really checks: server, token, runners with agents and projects, sessions here", async () => {
  const { api, dm, chat } = await plugin();
  const r = await api.run("/cli-state", dm);
  const text = r.text!;
  assert.match(text, /^Tunnel status\nServer: http:\/\/127\.0\.0\.1:\d+\n✅ Server reachable\n✅ Token accepted\nRunners online: 1\n/);
  assert.match(text, /🟢 runner-1 — agents: claude, codex, gemini; projects: none; busy 0\/1; seen \d+s ago/);
  assert.ok(text.includes(`This chat: telegram:${chat}\n• Claude (/cc): no session\n• Codex (/cx): no session\n• Gemini (/gemini): no session`), text);
  const bad = new FakeApi({ serverUrl: server.url, token: "tnl_not_a_real_token_at_all" });
  register(bad, { watcher: new Watcher(), messageIds: new MessageIds(), env: {} });
  const rb = await bad.run("/cli-state", dm);
  assert.match(rb.text!, /✅ Server reachable\n❌ Token: the server refused it \(unauthorized\)$/);
  const down = new FakeApi({ serverUrl: "http://127.0.0.1:9", token: clientToken });
  register(down, { watcher: new Watcher(), messageIds: new MessageIds(), env: {} });
  assert.match((await down.run("/cli-state", dm)).text!, /❌ Server not reachable: cannot reach the tunnel server at http:\/\/127\.0\.0\.1:9/);
  await api.services[0].stop!({ config: {}, stateDir: "", logger: api.logger });
});

test("cc_call + tunnel_state: task id at once, then the answer and session id; a follow-up continues it", async () => {
  const { api } = await plugin({}, false);
  const call = api.tools.get("cc_call")!.tool;
  const state = api.tools.get("tunnel_state")!.tool;
  const first = (await call.execute("t1", { prompt: "tool task" })).details as Record<string, any>;
  assert.equal(first.state, "queued");
  assert.match(first.task_id, /^[0-9a-f-]{36}$/);
  const served = runner.serveOne();
  const done = (await state.execute("t2", { task_id: first.task_id, wait_seconds: 20 })).details as Record<string, any>;
  await served;
  assert.equal(done.state, "succeeded");
  assert.equal(done.text, "echo: tool task");
  assert.match(done.session_id, /^5e55/);
  const followServed = runner.serveOne();
  const follow = (await call.execute("t3", { prompt: "follow up", session_id: done.session_id, wait_seconds: 20 })).details as Record<string, any>;
  const o = await followServed;
  assert.equal(o.resume_session_id, done.session_id);
  assert.equal(follow.state, "succeeded");
  assert.equal(follow.session_id, done.session_id);
  const overview = await state.execute("t4", {});
  assert.match(overview.content[0].text, /✅ Token accepted/);
});
