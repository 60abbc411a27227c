// End to end in the real `openclaw` npm package, offline: OpenClaw loads this plugin, its
// gateway's Telegram channel talks to a Bot API stand-in, a user sends `/cc hello`, the plugin
// submits to a real `tunnel serve`, the test plays the runner, and the answer arrives at the
// stand-in's sendMessage through the plugin's service and OpenClaw's outbound adapter.
//
// Needs OPENCLAW_BIN (the openclaw CLI; test.sh installs openclaw@2026.9.6 and Node 24) and
// TUNNEL_BIN. Each run uses a fresh OpenClaw state dir (OpenClaw remembers Telegram offsets).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { FakeTelegram, visibleText } from "./fake-telegram.ts";
import { PLUGIN_DIR, TestRunner, TunnelServer, freePort } from "../support/server.ts";

const OPENCLAW_BIN = process.env.OPENCLAW_BIN;
const BOT_TOKEN = "123456789:FAKE-tunnel-e2e-token";
const USER = 111;
const STRANGER = 222;
const GROUP = -100555;
const TOPIC = 42;

let work: string;
let env: NodeJS.ProcessEnv;
let server: TunnelServer;
let runner: TestRunner;
let tg: FakeTelegram;
let gateway: ChildProcess | undefined;
let inspect: any;
let installOutput = "";
let installedConfig: any;

function run(args: string[], timeoutMs: number): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(OPENCLAW_BIN!, args, { env, timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`openclaw ${args.join(" ")} failed: ${err.message}\n${stderr}`));
      else resolve({ stdout, stderr });
    });
  });
}

async function until<T>(what: string, fn: () => T | undefined | false, ms: number): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}\n--- gateway log tail ---\n${gatewayLog().slice(-4000)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function gatewayLog(): string {
  try {
    return readFileSync(path.join(work, gatewayOut), "utf8");
  } catch {
    return "";
  }
}

/** A live progress message: first sent as "⏳ <agent> · working…" (or starting, queued), then edited. */
function isProgress(m: Record<string, any>): boolean {
  return /^(⏳|🕓) [a-z]+ · /.test(tg.firstText.get(`${m.chat.id}:${m.message_id}`) ?? "");
}

/** The newest live progress message in a chat. */
function progressMessage(chatId: number): Record<string, any> | undefined {
  return [...tg.messages.values()].filter((m) => m.chat.id === chatId && isProgress(m)).at(-1);
}

/** Messages the bot sent to a chat (and topic), as the user would read them. */
function sentTo(chatId: number, threadId?: number): string[] {
  return tg.sent
    .filter((p) => Number(p.chat_id) === chatId && (threadId === undefined ? p.message_thread_id === undefined : Number(p.message_thread_id) === threadId))
    .map((p) => visibleText(p.text, p.parse_mode));
}

let gatewayOut = "gateway.out";

function configPath(): string {
  return path.join(work, "state", "openclaw.json");
}

async function startGateway(logName: string): Promise<void> {
  gatewayOut = logName;
  const polls = tg.callsOf("getUpdates").length;
  const log = openSync(path.join(work, logName), "w");
  gateway = spawn(OPENCLAW_BIN!, ["gateway", "run", "--verbose"], { env, stdio: ["ignore", log, log] });
  gateway.on("exit", (code, signal) => {
    if (code !== null && code !== 0) process.stderr.write(`gateway exited with ${code ?? signal}\n`);
  });
  // Ready when the Telegram channel long-polls the stand-in.
  await until("the gateway to poll Telegram", () => tg.callsOf("getUpdates").length > polls, 180_000);
}

async function stopGateway(): Promise<void> {
  const g = gateway;
  gateway = undefined;
  if (!g || g.exitCode !== null || g.signalCode !== null) return;
  const exited = new Promise((r) => g.once("exit", r));
  g.kill("SIGTERM");
  await Promise.race([exited, new Promise((r) => setTimeout(r, 20_000))]);
  if (g.exitCode === null && g.signalCode === null) g.kill("SIGKILL");
}

before(async () => {
  assert.ok(OPENCLAW_BIN, "OPENCLAW_BIN is not set: run the tests with ./test.sh, which installs openclaw");
  work = mkdtempSync(path.join(process.env.TMPDIR ?? tmpdir(), "tunnel-plugin-e2e-"));
  for (const d of ["home", "state", "tmp"]) mkdirSync(path.join(work, d), { recursive: true });
  tg = new FakeTelegram(BOT_TOKEN);
  await tg.start();
  // The tunnel server has the same bot, for the server delivery mode.
  server = await TunnelServer.start({ TELEGRAM_BOT_TOKEN: BOT_TOKEN, TELEGRAM_API_BASE_URL: tg.apiRoot });
  const clientToken = await server.token("client", "openclaw-plugin");
  runner = new TestRunner(server, await server.token("runner"), "e2e-runner", ["claude", "codex", "gemini"]);
  const base = {
    gateway: { mode: "local", port: await freePort(), bind: "loopback", auth: { mode: "token", token: "e2e-gateway-token" } },
    logging: { file: path.join(work, "openclaw.log") },
    update: { checkOnStart: false },
    models: { catalogRefresh: { enabled: false } },
    channels: {
      telegram: {
        enabled: true,
        botToken: BOT_TOKEN,
        apiRoot: tg.apiRoot,
        dmPolicy: "allowlist",
        allowFrom: [String(USER)],
        groupPolicy: "allowlist",
        groups: { [String(GROUP)]: { requireMention: false } },
      },
    },
  };
  writeFileSync(configPath(), JSON.stringify(base, null, 2));
  env = {
    ...process.env,
    HOME: path.join(work, "home"),
    OPENCLAW_HOME: path.join(work, "home"),
    OPENCLAW_STATE_DIR: path.join(work, "state"),
    OPENCLAW_CONFIG_PATH: configPath(),
    TMPDIR: path.join(work, "tmp"),
    OPENCLAW_NO_AUTO_UPDATE: "1",
    NO_COLOR: "1",
  };

  // The install command the README documents.
  const installed = await run(["plugins", "install", "--link", PLUGIN_DIR, "--force", "--accept-capabilities"], 240_000);
  installOutput = installed.stdout + installed.stderr;
  const cfg = JSON.parse(readFileSync(configPath(), "utf8"));
  installedConfig = JSON.parse(JSON.stringify(cfg.plugins ?? {}));
  cfg.plugins.entries.tunnel.config = { serverUrl: server.url, token: clientToken };
  writeFileSync(configPath(), JSON.stringify(cfg, null, 2));

  const out = await run(["plugins", "inspect", "tunnel", "--runtime", "--json"], 240_000);
  inspect = JSON.parse(out.stdout.slice(out.stdout.indexOf("{")));

  await startGateway("gateway.out");
});

after(async () => {
  await stopGateway();
  await tg?.stop();
  await server?.stop();
  if (work && !process.env.KEEP_E2E) rmSync(work, { recursive: true, force: true });
});

test("the documented install command links the plugin and enables it", () => {
  assert.match(installOutput, /Linked plugin path: /);
  assert.deepEqual(installedConfig.load?.paths, [PLUGIN_DIR]);
  assert.equal(installedConfig.entries?.tunnel?.enabled, true);
});

test("openclaw plugins inspect: the plugin loads with every command, the service and the tools", () => {
  assert.equal(inspect.plugin.id, "tunnel");
  assert.equal(inspect.plugin.status, "loaded");
  assert.equal(inspect.plugin.imported, true);
  const expected = ["cli-state"];
  for (const base of ["cc", "cx", "gemini"]) {
    expected.push(base, ...["new", "recent", "resume", "now", "stop", "status", "approve"].map((s) => `${base}-${s}`));
  }
  assert.deepEqual([...inspect.commands].sort(), expected.sort());
  assert.deepEqual(inspect.services, ["tunnel-delivery"]);
  assert.deepEqual(inspect.tools.flatMap((t: { names: string[] }) => t.names).sort(), ["cc_call", "codex_call", "gemini_call", "tunnel_state"]);
  assert.deepEqual(inspect.typedHooks.map((h: { name: string }) => h.name), ["message_received"]);
  const errors = (inspect.diagnostics ?? []).filter((d: { level: string }) => d.level === "error");
  assert.deepEqual(errors, []);
});

test("the gateway loads the plugin and puts its commands in the Telegram menu", async () => {
  await until("the plugin's commands registered", () => /Registered plugin command: \/cc \(plugin: tunnel\)/.test(gatewayLog()), 30_000);
  const menu = await until("setMyCommands with /cc", () =>
    tg.callsOf("setMyCommands").find((c) => (c.params.commands ?? []).some((x: { command: string }) => x.command === "cc")),
    30_000,
  );
  const names = menu.params.commands.map((x: { command: string }) => x.command);
  // Telegram menu names cannot have '-': OpenClaw lists cc-new as cc_new.
  for (const n of ["cc", "cx", "gemini", "cli_state", "cc_new", "cx_status", "gemini_resume"]) assert.ok(names.includes(n), `${n} in ${names}`);
});

test("/cc hello from Telegram: immediate ack, the runner runs it, the answer arrives through the plugin's service", async () => {
  await runner.touch(); // a runner seen recently counts as online
  tg.inject({ text: "/cc hello", userId: USER });
  const ack = await until("the acknowledgement", () => sentTo(USER).find((t) => t.includes("Queued for Claude")), 30_000);
  assert.match(ack, /^⏳ Queued for Claude — task `?[0-9a-f]{8}`?, next in line\.\nRunner: e2e-runner$/);
  const offer = await runner.claim(20_000);
  assert.ok(offer, "the task reached the runner");
  assert.equal(offer.task.prompt, "hello");
  assert.equal(offer.task.agent, "claude");
  assert.equal(offer.task.conversation, `telegram:${USER}`);
  assert.equal(offer.task.reply_to, undefined, "plugin delivery sends no reply_to");
  await runner.ack(offer);
  // The answer has characters that must be escaped for Telegram's HTML mode.
  const answer = "echo: hello <world> & \"friends\"";
  await runner.finish(offer, "succeeded", { text: answer, session_id: "e2e00000-0000-4000-8000-000000000001", duration_ms: 3000 });
  const got = await until("the answer at sendMessage", () => sentTo(USER).find((t) => t.includes("echo: hello")), 30_000);
  assert.equal(got, `✅ Claude · 3s · session e2e00000-0000-4000-8000-000000000001\n\n${answer}`);
  // The session is bound on the server for this chat; the next /cc continues it.
  tg.inject({ text: "/cc and again", userId: USER });
  const next = await runner.claim(30_000);
  assert.ok(next);
  assert.equal(next.task.prompt, "and again");
  assert.equal(next.resume_session_id, "e2e00000-0000-4000-8000-000000000001");
  await runner.ack(next);
  await runner.finish(next, "succeeded", { text: "second answer", session_id: "e2e00000-0000-4000-8000-000000000001" });
  await until("the second answer", () => sentTo(USER).find((t) => t.endsWith("second answer")), 30_000);
});

test("plugin delivery: one progress message, edited in place with the current step, typing shown, ending in the outcome before the answer", async (t) => {
  await runner.touch();
  const typingBefore = tg.callsOf("sendChatAction").length;
  tg.inject({ text: "/cc run the tests", userId: USER });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  await runner.ack(offer);
  const acked = Date.now();
  const msg = await until("the progress message", () => progressMessage(USER), 30_000);
  const shownAfter = Date.now() - acked;
  assert.match(msg.text, /^⏳ claude · working… \d+s$/);
  await runner.events(offer, [{ n: 1, kind: "tool_use", data: { name: "Bash", input: { command: "cargo test --workspace" } } }]);
  const first = await until("the edit with the step", () => {
    const m = tg.messages.get(`${USER}:${msg.message_id}`);
    return m?.text.includes("› Bash: cargo test --workspace") ? m : undefined;
  }, 30_000);
  assert.match(first.text, /^⏳ claude · working… \d+s\n› Bash: cargo test --workspace$/);
  await runner.events(offer, [
    { n: 2, kind: "tool_use", data: { name: "Read", input: { file_path: "src/lib.rs" } } },
    { n: 3, kind: "text", data: { text: "Reading the code." } },
  ]);
  await until("the second step", () => tg.messages.get(`${USER}:${msg.message_id}`)?.text.includes("› Read: src/lib.rs"), 30_000);
  const edits = tg.callsOf("editMessageText").filter((c) => Number(c.params.message_id) === msg.message_id);
  // Figures, not assertions: edits are at most every 3 s by construction.
  const gaps = edits.slice(1).map((c, i) => c.at - edits[i].at);
  t.diagnostic(`live progress via OpenClaw: message shown ${shownAfter} ms after the runner's ack; gaps between edits ${gaps.join(", ") || "-"} ms`);
  const typing = tg.callsOf("sendChatAction").slice(typingBefore);
  assert.ok(typing.some((c) => Number(c.params.chat_id) === USER && c.params.action === "typing"), "typing… is shown while it runs");

  await runner.finish(offer, "succeeded", { text: "all 212 tests pass", session_id: "e2e00000-0000-4000-8000-000000000001", duration_ms: 4000 });
  await until("the answer", () => sentTo(USER).find((x) => x.endsWith("all 212 tests pass")), 30_000);
  assert.equal(tg.messages.get(`${USER}:${msg.message_id}`)!.text, "✅ claude · done in 4s — the answer follows");
  // In order: the progress message ended before the answer was posted, and nothing after it.
  const ended = tg.callsOf("editMessageText").filter((c) => Number(c.params.message_id) === msg.message_id).at(-1)!;
  const answer = tg.callsOf("sendMessage").find((c) => String(c.params.text).includes("all 212 tests pass"))!;
  assert.ok(ended.at <= answer.at, "the outcome edit came before the answer");
  const progressPosts = tg.sent.filter((p) => Number(p.chat_id) === USER && String(p.text).includes("claude · working"));
  assert.equal(progressPosts.length, 1, "one progress message, edited in place");
  const typingAfter = tg.callsOf("sendChatAction").length;
  await new Promise((r) => setTimeout(r, 3500));
  assert.equal(tg.callsOf("sendChatAction").length, typingAfter, "no typing… after the answer");
  assert.equal(tg.callsOf("editMessageText").filter((c) => Number(c.params.message_id) === msg.message_id).length, edits.length + 1, "no edit after the end");
});

test("a forum topic is its own conversation and gets its answers in the topic", async () => {
  tg.inject({ text: "/cc-now", userId: USER, chatId: GROUP, threadId: TOPIC });
  const now = await until("the /cc-now reply in the topic", () => sentTo(GROUP, TOPIC).find((t) => t.includes("Claude session")), 30_000);
  assert.equal(now, "No active Claude session here. /cc <prompt> starts one.");
  tg.inject({ text: "/cc@tunnel_test_bot topic work", userId: USER, chatId: GROUP, threadId: TOPIC });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  assert.equal(offer.task.prompt, "topic work");
  assert.equal(offer.task.conversation, `telegram:${GROUP}:topic:${TOPIC}`);
  assert.equal(offer.resume_session_id, undefined, "the DM's session is not the topic's");
  await runner.ack(offer);
  await runner.finish(offer, "succeeded", { text: "done in the topic", session_id: "e2e00000-0000-4000-8000-000000000002" });
  const got = await until("the answer in the topic", () => sentTo(GROUP, TOPIC).find((t) => t.endsWith("done in the topic")), 30_000);
  assert.match(got, /^✅ Claude · \d+s · session e2e00000-0000-4000-8000-000000000002/);
  assert.deepEqual(sentTo(GROUP).filter((t) => t.includes("topic")), [], "nothing went to the group outside the topic");
});

test("/cc-status and /cc-stop from chat cancel a running task", async () => {
  tg.inject({ text: "/cc a long job", userId: USER });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  await runner.ack(offer);
  tg.inject({ text: "/cc-status", userId: USER });
  const status = await until("the status", () => sentTo(USER).find((t) => t.startsWith("Claude tasks here:")), 30_000);
  assert.match(status, /^Claude tasks here:\n▶️ running on e2e-runner for \d+s — `?[0-9a-f]{8}`? a long job$/);
  tg.inject({ text: "/cc-stop", userId: USER });
  await until("the stop reply", () => sentTo(USER).find((t) => t.startsWith("🛑 Stopping Claude task")), 30_000);
  assert.equal((await runner.heartbeat(offer)).cancel, true);
  // What a runner reports for a cancel: its error and the signal's exit code.
  await runner.finish(offer, "cancelled", { error: "cancelled; the agent was stopped", exit_code: 143 });
  const notice = await until("the cancel notice", () => sentTo(USER).find((t) => /^🛑 Claude task `?[0-9a-f]{8}`? cancelled/.test(t)), 30_000);
  // One clear line (issue #18): not "was cancelled (cancelled)." nor the exit code.
  assert.match(notice, /^🛑 Claude task `?[0-9a-f]{8}`? cancelled after \d+s\.$/);
  // Its progress message says so too.
  assert.match(progressMessage(USER)!.text, /^🛑 claude · cancelled after \d+s$/);
});

test("the Telegram menu form /cc_new (no '-' allowed there) runs /cc-new", async () => {
  tg.inject({ text: "/cc_new", userId: USER });
  const reply = await until("the reset reply", () => sentTo(USER).find((t) => t.startsWith("🔄 Claude session reset")), 30_000);
  assert.equal(reply, "🔄 Claude session reset. The next /cc starts a new session.");
  // Put the DM's session back for the /cli-state check below.
  tg.inject({ text: "/cc-resume e2e00000-0000-4000-8000-000000000001", userId: USER });
  await until("the resume reply", () => sentTo(USER).find((t) => t.startsWith("🔗 Switched to Claude session")), 30_000);
});

test("/cli-state checks the server, the token and the runners", async () => {
  await runner.touch();
  tg.inject({ text: "/cli-state", userId: USER });
  const state = await until("the state", () => sentTo(USER).find((t) => t.startsWith("Tunnel status")), 30_000);
  assert.match(state, /✅ Server reachable\n✅ Token accepted\nRunners online: 1\n🟢 e2e-runner — agents: claude, codex, gemini/);
  assert.match(state, /This chat: telegram:111\n• Claude \(\/cc\): `?e2e00000-0000-4000-8000-000000000001`?/);
});

test("a sender OpenClaw does not authorize cannot run tasks", async () => {
  tg.inject({ text: "/cc rm -rf /", userId: STRANGER });
  const reply = await until("the refusal", () => sentTo(STRANGER)[0], 30_000);
  assert.match(reply, /requires authorization|not authorized/);
  assert.equal(await runner.claim(500), undefined, "nothing was submitted");
});

// --- approvals (issue #15): the question with buttons, a tap, the edit, the text fallback -----

/** OpenClaw's wrapping of a typed callback value before it goes to Telegram (tgcb1:<sum>:<value>). */
function openclawWrap(value: string): string {
  let hash = 2166136261;
  for (let i = 0; i < value.length; i++) {
    hash ^= value.charCodeAt(i);
    hash = Math.imul(hash, 16777619) >>> 0;
  }
  return `tgcb1:${hash.toString(36).slice(0, 5).padStart(5, "0")}:${value}`;
}

/** The message the bot sent to a chat whose text contains `needle` (as it is now, after edits), not a progress message. */
function messageWith(chatId: number, needle: string): Record<string, any> | undefined {
  return [...tg.messages.values()].find((m) => m.chat.id === chatId && !isProgress(m) && String(m.text).includes(needle));
}

const RM = { kind: "execute", title: "Run rm -rf build", command: "rm -rf build" };

test("/cc -ask: the question arrives with an inline keyboard, a tap allows it, the message is edited, the task completes", async (t) => {
  await runner.touch();
  tg.inject({ text: "/cc -ask delete the build folder", userId: USER });
  const ack = await until("the acknowledgement", () => sentTo(USER).find((t) => t.includes("asks here before it runs")), 30_000);
  assert.match(ack, /^⏳ Queued for Claude — task `?[0-9a-f]{8}`?, next in line\.\nRunner: e2e-runner\n🔐 Claude asks here before it runs a command or edits a file\.$/);
  const offer = await runner.claim(20_000);
  assert.ok(offer);
  assert.equal(offer.task.prompt, "delete the build folder");
  await runner.ack(offer);
  const asked = Date.now();
  const a = await runner.ask(offer, { key: "call_rm_1", tool: RM });
  assert.equal(a.state, "pending");
  const uuid = a.id.slice(4);

  // The exact Bot API request: sendMessage with the command in a code block and three buttons.
  const req = await until("the question at sendMessage", () => tg.sent.find((p) => Number(p.chat_id) === USER && p.reply_markup && String(p.text).includes("rm -rf build")), 30_000);
  const keyboard = (typeof req.reply_markup === "string" ? JSON.parse(req.reply_markup) : req.reply_markup).inline_keyboard;
  assert.deepEqual(
    keyboard.map((row: any[]) => row.map((b) => [b.text, b.callback_data])),
    [[
      ["✅ Allow once", openclawWrap(`tunnel:o:${uuid}`)],
      ["🔁 Allow for session", openclawWrap(`tunnel:s:${uuid}`)],
      ["🚫 Deny", openclawWrap(`tunnel:d:${uuid}`)],
    ]],
  );
  for (const b of keyboard.flat()) assert.ok(Buffer.byteLength(b.callback_data) <= 64, b.callback_data);
  assert.match(req.text, /<pre><code[^>]*>rm -rf build\n?<\/code><\/pre>/);
  const shown = visibleText(req.text, req.parse_mode);
  assert.match(shown, new RegExp(`^🔐 Claude asks to run a command — task ${offer.task.id.slice(0, 8)}\nRun rm -rf build\n`));
  assert.match(shown, new RegExp(`Or type: /cc -approve ${a.id} once\\|session\\|deny \\[message\\]$`));
  assert.equal((await runner.waitApproval(offer, a.id, 0)).state, "pending", "nothing answered yet");

  const shownAt = tg.callsOf("sendMessage").find((c) => c.params.reply_markup && String(c.params.text).includes("rm -rf build"))!.at;

  // The user taps "Allow once": a real callback_query update. The agent's wait is already held.
  const msg = messageWith(USER, "Run rm -rf build")!;
  const held = runner.waitApproval(offer, a.id, 20_000);
  await new Promise((r) => setTimeout(r, 50));
  const tapped = Date.now();
  const upd = tg.injectCallback({ chatId: USER, messageId: msg.message_id, userId: USER, data: keyboard[0][0].callback_data });
  const decided = await held;
  const answered = Date.now();
  await until("answerCallbackQuery", () => tg.callsOf("answerCallbackQuery").find((c) => String(c.params.callback_query_id) === upd.callback_query.id), 30_000);
  // Figures, not assertions: the whole chat path through the real gateway (stand-in Telegram).
  t.diagnostic(`approval via OpenClaw: runner asks → question at Telegram ${shownAt - asked} ms; tap → runner's wait returns ${answered - tapped} ms`);
  assert.equal(decided.state, "allowed");
  assert.equal(decided.outcome.decision, "allow_once");
  assert.equal(decided.outcome.option_id, "allow");
  assert.match(decided.outcome.by, /@tester111/);
  const edited = await until("the question edited to its outcome", () => {
    const m = tg.messages.get(`${USER}:${msg.message_id}`);
    return m?.edit_date && m.text.startsWith("✅") ? m : undefined;
  }, 30_000);
  assert.equal(edited.text, "✅ allowed once by @tester111\nClaude: Run rm -rf build\n$ rm -rf build");
  assert.deepEqual(tg.keyboard(USER, msg.message_id), [], "the buttons are gone");

  await runner.finish(offer, "succeeded", { text: "deleted build/", session_id: "e2e00000-0000-4000-8000-000000000001" });
  await until("the answer", () => sentTo(USER).find((t) => t.endsWith("deleted build/")), 30_000);

  // A second tap on the stale keyboard is told who decided and when.
  tg.injectCallback({ chatId: USER, messageId: msg.message_id, userId: USER, data: keyboard[0][2].callback_data });
  const late = await until("the late-tap reply", () => sentTo(USER).find((t) => t.startsWith("⚠️ Already decided")), 30_000);
  assert.match(late, /^⚠️ Already decided: ✅ allowed once by @tester111 at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\.$/);
});

test("Deny from a button: the agent is told no and the task still completes", async (t) => {
  tg.inject({ text: "/cc -ask clean up", userId: USER });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  await runner.ack(offer);
  const asked = Date.now();
  const a = await runner.ask(offer, { key: "call_rm_2", tool: { ...RM, title: "Run rm -rf dist", command: "rm -rf dist" } });
  const msg = await until("the question", () => messageWith(USER, "Run rm -rf dist"), 30_000);
  const shownAt = tg.callsOf("sendMessage").find((c) => c.params.reply_markup && String(c.params.text).includes("rm -rf dist"))!.at;
  const deny = tg.keyboard(USER, msg.message_id).flat().find((b) => b.text === "🚫 Deny")!;
  const held = runner.waitApproval(offer, a.id, 20_000);
  await new Promise((r) => setTimeout(r, 50));
  const tapped = Date.now();
  tg.injectCallback({ chatId: USER, messageId: msg.message_id, userId: USER, data: deny.callback_data! });
  const decided = await held;
  t.diagnostic(`approval via OpenClaw (second): runner asks → question at Telegram ${shownAt - asked} ms; tap → runner's wait returns ${Date.now() - tapped} ms`);
  assert.equal(decided.state, "denied");
  assert.equal(decided.outcome.option_id, "reject");
  await until("the question edited to denied", () => tg.messages.get(`${USER}:${msg.message_id}`)?.text.startsWith("🚫 denied by @tester111"), 30_000);
  assert.deepEqual(tg.keyboard(USER, msg.message_id), []);
  await runner.finish(offer, "succeeded", { text: "left dist/ alone", session_id: "e2e00000-0000-4000-8000-000000000001" });
  await until("the answer", () => sentTo(USER).find((t) => t.endsWith("left dist/ alone")), 30_000);
});

test("in a group topic an unauthorised tap is refused; the text fallback /cc -approve answers; an expiry is shown", async () => {
  tg.inject({ text: "/cc -ask tidy the repo", userId: USER, chatId: GROUP, threadId: TOPIC });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  assert.equal(offer.task.conversation, `telegram:${GROUP}:topic:${TOPIC}`);
  await runner.ack(offer);
  const a = await runner.ask(offer, { key: "call_mv_1", tool: { kind: "move", title: "Move notes.md to docs/", paths: ["notes.md", "docs/notes.md"] } });
  const msg = await until("the question in the topic", () => messageWith(GROUP, "Move notes.md"), 30_000);
  assert.equal(msg.message_thread_id, TOPIC);
  const allow = tg.keyboard(GROUP, msg.message_id).flat()[0];

  // Someone OpenClaw does not authorise taps Allow: nothing is answered, the buttons stay.
  const upd = tg.injectCallback({ chatId: GROUP, messageId: msg.message_id, userId: STRANGER, data: allow.callback_data! });
  await until("answerCallbackQuery for the stranger", () => tg.callsOf("answerCallbackQuery").find((c) => String(c.params.callback_query_id) === upd.callback_query.id), 30_000);
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal((await runner.waitApproval(offer, a.id, 0)).state, "pending");
  assert.equal(tg.keyboard(GROUP, msg.message_id).flat().length, 3, "the buttons are still there");

  // The text fallback, from the authorised user in the same topic.
  tg.inject({ text: `/cc -approve ${a.id} session`, userId: USER, chatId: GROUP, threadId: TOPIC });
  const ok = await until("the -approve reply", () => sentTo(GROUP, TOPIC).find((t) => t.startsWith("🔁 Allowed for this session")), 30_000);
  assert.equal(ok, "🔁 Allowed for this session: Move notes.md to docs/");
  const decided = await runner.waitApproval(offer, a.id, 20_000);
  assert.equal(decided.state, "allowed");
  assert.equal(decided.outcome.decision, "allow_session");
  assert.equal(decided.outcome.option_id, "always");
  // The plugin learns the outcome from the task's events and edits the question (Bot API).
  await until("the question edited", () => tg.messages.get(`${GROUP}:${msg.message_id}`)?.text.startsWith("🔁 allowed for this session by telegram:111"), 30_000);
  assert.deepEqual(tg.keyboard(GROUP, msg.message_id), []);

  // Nobody answers the next one in time: it expires, and the question says so.
  const b = await runner.ask(offer, { key: "call_rm_3", tool: { ...RM, title: "Run rm -rf .git", command: "rm -rf .git" }, timeout_ms: 1000 });
  const q = await until("the second question", () => messageWith(GROUP, "Run rm -rf .git"), 30_000);
  const expired = await runner.waitApproval(offer, b.id, 20_000);
  assert.equal(expired.state, "expired");
  await until("the question edited to expired", () => tg.messages.get(`${GROUP}:${q.message_id}`)?.text.startsWith("⏰ expired — denied"), 30_000);
  assert.deepEqual(tg.keyboard(GROUP, q.message_id), []);
  await runner.finish(offer, "succeeded", { text: "moved the notes", session_id: "e2e00000-0000-4000-8000-000000000002" });
  await until("the answer in the topic", () => sentTo(GROUP, TOPIC).find((t) => t.endsWith("moved the notes")), 30_000);
});

/** Tasks of a chat with this prompt, as the server has them. */
async function tasksWith(chat: number, prompt: string): Promise<any[]> {
  const r = await server.call("GET", `/v1/tasks?conversation=telegram:${chat}&limit=100`, server.adminToken);
  return r.body.tasks.filter((t: any) => t.prompt === prompt);
}

let redelivered: { update: Record<string, any> } | undefined;

test("a chat message delivered twice starts one task (issue #18)", async () => {
  await runner.touch();
  const update = tg.inject({ text: "/cc only once please", userId: USER });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  assert.equal(offer.task.prompt, "only once please");
  await runner.ack(offer);
  // Telegram sends the same update again (its confirmation was lost). OpenClaw 2026.9.6 passes
  // no message id to a command, so the plugin cannot key the submit on it; OpenClaw itself
  // drops an update_id it has seen (and persists how far it got, see the restart below).
  const polls = tg.callsOf("getUpdates").length;
  tg.redeliver(update);
  await until("the gateway to fetch the redelivered update", () => tg.callsOf("getUpdates").length > polls + 1, 30_000);
  assert.equal(await runner.claim(2000), undefined, "no second task to claim");
  assert.equal((await tasksWith(USER, "only once please")).length, 1);
  await runner.finish(offer, "succeeded", { text: "done once", session_id: "e2e00000-0000-4000-8000-000000000001" });
  await until("its answer", () => sentTo(USER).find((x) => x.endsWith("done once")), 30_000);
  redelivered = { update };
});

test("the Telegram stand-in saw no call it does not know and no rejected message", () => {
  assert.deepEqual(tg.unknown, []);
  // Every sendMessage the gateway made was accepted (a rejected one is not in `sent`).
  assert.equal(tg.callsOf("sendMessage").length, tg.sent.length);
});

test("server delivery (after a restart with delivery: server): the tunnel server acknowledges, shows progress and posts the answer, in order", async () => {
  await stopGateway();
  const cfg = JSON.parse(readFileSync(configPath(), "utf8"));
  cfg.plugins.entries.tunnel.config.delivery = "server";
  writeFileSync(configPath(), JSON.stringify(cfg, null, 2));
  await startGateway("gateway-server-delivery.out");

  // Issue #18, item 4: the update from before the restart arrives again (Telegram redelivers
  // what it thinks unconfirmed); the new gateway process still knows it and drops it.
  assert.ok(redelivered, "the redelivery test ran first");
  const polls = tg.callsOf("getUpdates").length;
  tg.redeliver(redelivered.update);
  await until("the gateway to fetch the redelivered update", () => tg.callsOf("getUpdates").length > polls + 1, 30_000);
  assert.equal(await runner.claim(2000), undefined, "no second task after the restart either");
  assert.equal((await tasksWith(USER, "only once please")).length, 1, "one task after the redelivery");

  await runner.touch();
  const before = tg.sent.length;
  tg.inject({ text: "/cc via the server", userId: USER });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  assert.equal(offer.task.prompt, "via the server");
  assert.deepEqual(offer.task.reply_to, { platform: "telegram", channel: String(USER) });
  // The server renders its acknowledgement in the state the task is in when it is sent: the
  // runner acks once it is in the chat, so it shows the task queued or offered (an ack that
  // raced ahead of it made it "working…").
  await until("the server's acknowledgement", () => tg.sent.slice(before).some((p) => Number(p.chat_id) === USER), 60_000);
  // The fastest task: it ends right away, before OpenClaw would have sent a command reply.
  await runner.ack(offer);
  await runner.finish(offer, "succeeded", { text: "answer posted by the tunnel server", session_id: "e2e00000-0000-4000-8000-000000000003", duration_ms: 200 });
  await until("the server's answer at sendMessage", () => sentTo(USER).find((t) => t.includes("answer posted by the tunnel server")), 60_000);
  // Everything about the task, in the order the chat shows it: the acknowledgement (the
  // server's first message, edited to the outcome), then the answer, and nothing after it.
  await new Promise((r) => setTimeout(r, 2000));
  const shown = tg.sent.slice(before).filter((p) => Number(p.chat_id) === USER).map((p) => visibleText(p.text, p.parse_mode));
  assert.equal(shown.length, 2, `the acknowledgement and the answer only: ${JSON.stringify(shown)}`);
  // Queued, or already offered to the runner when the server rendered it.
  assert.match(shown[0], /^(🕓 claude · queued — task [0-9a-f]{8}, next in line|⏳ claude · starting — task [0-9a-f]{8})$/);
  assert.match(shown[1], /^✅ claude · /);
  assert.ok(shown[1].includes("answer posted by the tunnel server"));
  const ack = [...tg.messages.values()].find((m) => m.chat.id === USER && tg.firstText.get(`${USER}:${m.message_id}`) === shown[0])!;
  assert.equal(ack.text, "✅ claude · done in 0s — the answer follows", "the acknowledgement ends in the outcome");
  assert.doesNotMatch(gatewayLog(), new RegExp(`task ${offer.task.id} succeeded; answer sent`), "the plugin did not send it");
  assert.deepEqual(tg.unknown, []);
});

test("server delivery: the tunnel server posts the question, /cc -approve in chat answers it, the server edits it", async () => {
  await runner.touch();
  tg.inject({ text: "/cc -ask remove the logs", userId: USER });
  const offer = await runner.claim(30_000);
  assert.ok(offer);
  assert.equal(offer.task.approvals, "ask");
  await runner.ack(offer);
  const a = await runner.ask(offer, { key: "call_srv_1", tool: { ...RM, title: "Run rm -rf logs", command: "rm -rf logs" } });
  const q = await until("the server's question", () => messageWith(USER, a.id), 60_000);
  assert.match(q.text, /rm -rf logs/);
  tg.inject({ text: `/cc -approve ${a.id} deny keep the logs`, userId: USER });
  await until("the -approve reply", () => sentTo(USER).find((t) => t === "🚫 Denied: rm -rf logs"), 30_000);
  const decided = await runner.waitApproval(offer, a.id, 20_000);
  assert.equal(decided.state, "denied");
  assert.equal(decided.outcome.message, "keep the logs");
  await until("the server's edit of the question", () => tg.messages.get(`${USER}:${q.message_id}`)?.text.startsWith("🚫 denied by"), 60_000);
  await runner.finish(offer, "succeeded", { text: "kept the logs", session_id: "e2e00000-0000-4000-8000-000000000003" });
  await until("the server's answer", () => sentTo(USER).find((t) => t.includes("kept the logs")), 60_000);
  assert.deepEqual(tg.unknown, []);
});
