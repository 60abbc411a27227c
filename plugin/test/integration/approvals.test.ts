// Approvals in chat against a real `tunnel serve`: the plugin (on a fake OpenClaw api) submits
// with `-ask`, the test plays the runner whose agent asks, the plugin posts the question, and a
// tap, the text command, the CLI (admin token), a timeout or a cancel settles it; the runner's
// wait sees the answer and the question is edited to the outcome.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { register } from "../../src/plugin.ts";
import { MessageIds } from "../../src/msgids.ts";
import { Watcher } from "../../src/watcher.ts";
import type { CommandContext, TelegramInteractiveContext } from "../../src/types.ts";
import { FakeApi, TELEGRAM_DM } from "../support/fake-api.ts";
import { TestRunner, TunnelServer } from "../support/server.ts";
import type { Offer } from "../support/server.ts";

let server: TunnelServer;
let clientToken: string;
let runner: TestRunner;
const stateDirs: string[] = [];
const running: Watcher[] = [];

before(async () => {
  server = await TunnelServer.start();
  clientToken = await server.token("client", "openclaw-plugin");
  runner = new TestRunner(server, await server.token("runner"), "approvals-runner");
});

after(async () => {
  await Promise.all(running.map((w) => w.stop()));
  await server?.stop();
  for (const d of stateDirs) rmSync(d, { recursive: true, force: true });
});

async function until<T>(what: string, fn: () => T | undefined | false, ms = 10_000, everyMs = 25): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

let n = 0;
/** A started plugin whose Telegram edits (Bot API editMessageText) are recorded in `edits`. */
async function plugin() {
  const api = new FakeApi({ serverUrl: server.url, token: clientToken });
  const watcher = new Watcher();
  running.push(watcher);
  const edits: { chat: string; messageId: number; text: string }[] = [];
  const fetchAll = (async (input: string | URL | Request, init?: RequestInit) => {
    if (String(input).startsWith("https://tg.test/")) {
      const b = JSON.parse(String(init?.body));
      // Edits of questions only: not "typing…", not the live progress message (first sent as "⏳ …").
      const progress = api.sent[Number(b.message_id) - 1]?.text.startsWith("⏳");
      if (String(input).endsWith("/editMessageText") && !progress) edits.push({ chat: String(b.chat_id), messageId: b.message_id, text: b.text });
      return new Response(JSON.stringify({ ok: true, result: true }), { status: 200 });
    }
    return fetch(input, init);
  }) as typeof fetch;
  const deps = register(api, {
    watcher,
    messageIds: new MessageIds(),
    env: {},
    fetch: fetchAll,
    progressAfterMs: 0,
    retryDelaysMs: [50, 100, 200],
    telegramAccount: () => ({ token: "1:x", apiRoot: "https://tg.test" }),
  });
  const stateDir = mkdtempSync(path.join(process.env.TMPDIR ?? tmpdir(), "tunnel-plugin-approvals-"));
  stateDirs.push(stateDir);
  await api.services[0].start({ config: api.config, stateDir, logger: api.logger });
  const chat = String(200000 + ++n);
  const dm: Partial<CommandContext> = { ...TELEGRAM_DM, senderId: chat, from: `telegram:${chat}`, to: `telegram:${chat}` };
  return { api, watcher, deps, edits, chat, dm };
}

function tap(payload: string, chat: string, authorized = true) {
  const seen = { replies: [] as string[], edits: [] as string[], cleared: 0 };
  const ctx: TelegramInteractiveContext = {
    channel: "telegram",
    accountId: "default",
    conversationId: chat,
    senderId: chat,
    senderUsername: "tess",
    isGroup: false,
    auth: { isAuthorizedSender: authorized },
    callback: { data: `tunnel:${payload}`, namespace: "tunnel", payload, messageId: 1, chatId: chat },
    respond: {
      reply: async ({ text }) => void seen.replies.push(text),
      editMessage: async ({ text }) => void seen.edits.push(text),
      clearButtons: async () => void seen.cleared++,
    },
  };
  return { ctx, seen };
}

const RM = { kind: "execute", title: "Run rm -rf build", command: "rm -rf build" };

async function askedTask(p: Awaited<ReturnType<typeof plugin>>, prompt: string, key: string, tool: Record<string, unknown> = RM, timeoutMs?: number) {
  await p.api.run(`/cc -ask ${prompt}`, p.dm);
  const offer = (await runner.claim(10_000)) as Offer;
  assert.ok(offer, "the task reached the runner");
  await runner.ack(offer);
  const asked = performance.now();
  const a = await runner.ask(offer, { key, tool, ...(timeoutMs ? { timeout_ms: timeoutMs } : {}) });
  const question = await until("the question", () => p.api.sent.find((s) => s.text.startsWith("🔐") && s.text.includes(String(tool.title))), 10_000, 1);
  return { offer, a, question, askToQuestionMs: performance.now() - asked };
}

/** The callback value of a button of the posted question. */
function button(question: { payload?: { presentation?: any } }, label: string): string {
  const b = question.payload!.presentation.blocks[0].buttons.find((x: any) => x.label.includes(label));
  return b.action.value as string;
}

test("-ask reaches the runner; a tap answers with the plugin's token; the agent's wait sees it; the question shows the outcome", async (t) => {
  const p = await plugin();
  const { offer, a, question, askToQuestionMs } = await askedTask(p, "delete the build folder", "call_1");
  t.diagnostic(`plugin without OpenClaw: runner asks → question handed to the outbound adapter ${askToQuestionMs.toFixed(1)} ms`);
  assert.equal(offer.task.approvals, "ask");
  assert.equal(question.channel, "telegram");
  assert.equal(question.to, p.chat);
  assert.match(question.text, /^🔐 Claude asks to run a command — task `[0-9a-f]{8}`\nRun rm -rf build\n```sh\nrm -rf build\n```\n/);
  const value = button(question, "Allow once");
  assert.equal(value, `tunnel:o:${a.id.slice(4)}`);

  // /cc-status shows what the task waits on.
  const st = await p.api.run("/cc-status", p.dm);
  assert.match(st.text!, new RegExp(`⏸️ waiting for approval: rm -rf build \\(\`${a.id}\`\\)`));

  const { ctx, seen } = tap(value.slice("tunnel:".length), p.chat);
  await p.api.interactive[0].handler(ctx);
  const got = await runner.waitApproval(offer, a.id, 5000);
  assert.equal(got.state, "allowed");
  assert.equal(got.outcome.decision, "allow_once");
  assert.equal(got.outcome.option_id, "allow");
  assert.match(got.outcome.by, /@tess/);
  assert.deepEqual(seen.replies, []);
  assert.equal(seen.edits.length, 1);
  assert.match(seen.edits[0], /^✅ allowed once by @tess\nClaude: Run rm -rf build\n\$ rm -rf build$/);
  // The outcome event arrives too; the tap already showed it, so no second edit.
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(p.edits, []);

  // A second tap: the server says it was decided, the plugin says by whom and when.
  const again = tap(button(question, "Deny").slice("tunnel:".length), p.chat);
  await p.api.interactive[0].handler(again.ctx);
  assert.match(again.seen.replies[0], /^⚠️ Already decided: ✅ allowed once by @tess at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\.$/);
  assert.equal((await runner.waitApproval(offer, a.id, 0)).state, "allowed", "the second tap changed nothing");

  await runner.finish(offer, "succeeded", { text: "deleted build/" });
  await until("the answer", () => p.api.sent.find((s) => s.text.endsWith("deleted build/")));
});

test("an unauthorised tap is refused and the request stays pending", async () => {
  const p = await plugin();
  const { offer, a, question } = await askedTask(p, "tidy", "call_2");
  const { ctx, seen } = tap(button(question, "Allow once").slice("tunnel:".length), p.chat, false);
  await p.api.interactive[0].handler(ctx);
  assert.deepEqual(seen.replies, ["⛔ Only an authorised user of this bot can answer this question."]);
  assert.equal((await runner.waitApproval(offer, a.id, 0)).state, "pending");
  await server.call("POST", `/v1/tasks/${offer.task.id}/cancel`, clientToken);
  // A cancel settles the pending question as cancelled, and the plugin shows it.
  const cancelled = await runner.waitApproval(offer, a.id, 5000);
  assert.equal(cancelled.state, "cancelled");
  await until("the question edited to cancelled", () => p.edits.find((e) => e.text.startsWith("⏹ cancelled")));
  await runner.finish(offer, "cancelled", {});
});

test("an answer from the CLI (admin token) and a timeout are shown by editing the question", async () => {
  const p = await plugin();
  const { offer, a, question } = await askedTask(p, "rewrite history", "call_3", { ...RM, title: "Run git push --force", command: "git push --force" });
  const r = await server.call("POST", `/v1/approvals/${a.id}`, server.adminToken, { decision: "deny", message: "never force-push" });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  const got = await runner.waitApproval(offer, a.id, 5000);
  assert.equal(got.state, "denied");
  assert.equal(got.outcome.message, "never force-push");
  const edit = await until("the edit", () => p.edits.find((e) => e.text.startsWith("🚫 denied")));
  assert.equal(edit.chat, p.chat);
  assert.equal(String(edit.messageId), String(p.api.sent.indexOf(question) + 1));
  assert.match(edit.text, /^🚫 denied by .+: never force-push\nClaude: Run git push --force\n\$ git push --force$/);

  // Nobody answers the next one: it expires (1 s) and says so.
  const b = await runner.ask(offer, { key: "call_4", tool: { ...RM, title: "Run rm -rf .git", command: "rm -rf .git" }, timeout_ms: 1000 });
  const expired = await runner.waitApproval(offer, b.id, 10_000);
  assert.equal(expired.state, "expired");
  await until("the expiry edit", () => p.edits.find((e) => e.text.startsWith("⏰ expired — denied\nClaude: Run rm -rf .git")), 10_000);
  await runner.finish(offer, "succeeded", { text: "did nothing" });
});

test("/cc -approve: by id, by a unique part of it, with a message; refused for another chat's task and for unknown ids", async () => {
  const p = await plugin();
  const { offer, a } = await askedTask(p, "clean up", "call_5");
  const other = await plugin();
  const wrongChat = await other.api.run(`/cc -approve ${a.id} once`, other.dm);
  assert.equal(wrongChat.text, "❌ That question belongs to another conversation; answer it there.");
  const unknown = await p.api.run("/cc -approve apr_00000000-0000-7000-8000-000000000000 once", p.dm);
  assert.equal(unknown.isError, true);
  assert.equal((await runner.waitApproval(offer, a.id, 0)).state, "pending");

  const r = await p.api.run(`/cc-approve ${a.id.slice(-10)} deny use the trash instead`, p.dm);
  assert.equal(r.text, "🚫 Denied: rm -rf build");
  const got = await runner.waitApproval(offer, a.id, 5000);
  assert.equal(got.state, "denied");
  assert.equal(got.outcome.message, "use the trash instead");
  assert.match(got.outcome.by, new RegExp(`telegram:${p.chat}`));
  await until("the question edited", () => p.edits.find((e) => e.text.startsWith(`🚫 denied by telegram:${p.chat}: use the trash instead`)));
  const late = await p.api.run(`/cc -approve ${a.id} once`, p.dm);
  assert.equal(late.isError, true);
  assert.match(late.text!, /^⚠️ Already decided: 🚫 denied by telegram:\d+: use the trash instead at /);
  await runner.finish(offer, "succeeded", { text: "moved it to the trash" });
});
