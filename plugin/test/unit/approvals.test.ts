// Approvals in chat (approvals.ts): callback data, parsing, texts, the button handler and the
// text command on a fake OpenClaw api, and the watcher's question/outcome path, with the tunnel
// server replaced by a scripted fetch that records requests.

import { test } from "node:test";
import assert from "node:assert/strict";

import {
  ApprovalDelivery,
  approvalFlags,
  callbackValue,
  fence,
  outcomeLine,
  parseApprove,
  parseCallbackPayload,
  questionPresentation,
  questionText,
  settledText,
  TELEGRAM_CALLBACK_MAX,
} from "../../src/approvals.ts";
import type { Approval } from "../../src/client.ts";
import { register } from "../../src/plugin.ts";
import { MessageIds } from "../../src/msgids.ts";
import { Watcher } from "../../src/watcher.ts";
import type { TelegramInteractiveContext } from "../../src/types.ts";
import { FakeApi, TELEGRAM_DM, TELEGRAM_GROUP } from "../support/fake-api.ts";

const AID = "apr_0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b";
const TASK_ID = "0b7d1f5e-1111-4222-8333-444455556666";

function approval(p: Partial<Approval> = {}): Approval {
  return {
    id: AID,
    task_id: TASK_ID,
    attempt: 1,
    agent: "claude",
    runner: "mac-mini",
    state: "pending",
    tool: { kind: "execute", title: "Run rm -rf build", command: "rm -rf build" },
    options: [
      { id: "allow", name: "Allow", kind: "allow_once" },
      { id: "always", name: "Always allow", kind: "allow_always" },
      { id: "reject", name: "Reject", kind: "reject_once" },
    ],
    asked_at: 1_000_000,
    expires_at: 1_000_000 + 600_000,
    ...p,
  };
}

/** OpenClaw's own wrapping of a typed callback value (extensions/telegram: `tgcb1:<sum>:<value>`). */
function openclawWrap(value: string): string {
  let hash = 2166136261;
  for (let i = 0; i < value.length; i++) {
    hash ^= value.charCodeAt(i);
    hash = Math.imul(hash, 16777619) >>> 0;
  }
  return `tgcb1:${hash.toString(36).slice(0, 5).padStart(5, "0")}:${value}`;
}

test("callback data: tunnel:<o|s|d>:<uuid>, under Telegram's 64 bytes once OpenClaw wraps it", () => {
  assert.equal(callbackValue(AID, "allow_once"), "tunnel:o:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b");
  assert.equal(callbackValue(AID, "allow_session"), "tunnel:s:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b");
  assert.equal(callbackValue(AID, "deny"), "tunnel:d:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b");
  for (const d of ["allow_once", "allow_session", "deny"] as const) {
    const wrapped = openclawWrap(callbackValue(AID, d)!);
    assert.ok(Buffer.byteLength(wrapped) <= TELEGRAM_CALLBACK_MAX, `${wrapped} is ${Buffer.byteLength(wrapped)} bytes`);
  }
  // Only real approval ids become buttons.
  assert.equal(callbackValue("apr_../../v1/tokens", "deny"), undefined);
  assert.equal(callbackValue(`${AID}0`, "deny"), undefined);
  assert.equal(callbackValue("0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b", "deny"), undefined);
});

test("callback payloads: only an id and a decision are read, anything else is refused", () => {
  assert.deepEqual(parseCallbackPayload("o:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b"), { id: AID, decision: "allow_once" });
  assert.deepEqual(parseCallbackPayload("s:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b"), { id: AID, decision: "allow_session" });
  assert.deepEqual(parseCallbackPayload("d:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b"), { id: AID, decision: "deny" });
  for (const bad of [
    "",
    "x:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b",
    "o:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b:extra",
    "o:../../../../../v1/tokens/xxxxxxxxxxxxxxxx",
    "o:0193A5B2-7C1D-7E4F-8A9B-0C1D2E3F4A5B",
    "o:------------------------------------",
    "allow_once:0193a5b2-7c1d-7e4f-8a9b-0c1d2e3f4a5b",
  ]) {
    assert.equal(parseCallbackPayload(bad), undefined, bad);
  }
});

test("flags: -ask and -approve only in their dashed form, as the first word", () => {
  assert.deepEqual(approvalFlags("-ask delete the build folder"), { args: "delete the build folder", approvals: "ask" });
  assert.deepEqual(approvalFlags("--ASK fix it"), { args: "fix it", approvals: "ask" });
  assert.deepEqual(approvalFlags("-ask"), { args: undefined, approvals: "ask" });
  assert.deepEqual(approvalFlags("ask me anything"), { args: "ask me anything" });
  assert.deepEqual(approvalFlags("-asking is a prompt"), { args: "-asking is a prompt" });
  assert.deepEqual(approvalFlags("please -ask"), { args: "please -ask" });
  assert.deepEqual(approvalFlags(`-approve ${AID} once`), { args: `${AID} once`, approve: true });
  assert.deepEqual(approvalFlags(undefined), { args: undefined });
});

test("/cc -approve arguments: id, once|session|deny, a message with deny only", () => {
  assert.deepEqual(parseApprove(`${AID} once`), { kind: "approve", id: AID, decision: "allow_once" });
  assert.deepEqual(parseApprove(`${AID} Session`), { kind: "approve", id: AID, decision: "allow_session" });
  assert.deepEqual(parseApprove(`${AID} deny use the trash instead`), { kind: "approve", id: AID, decision: "deny", message: "use the trash instead" });
  assert.deepEqual(parseApprove("3f4a5b no"), { kind: "approve", id: "3f4a5b", decision: "deny" });
  assert.equal(parseApprove(undefined).kind, "usage");
  assert.equal(parseApprove(AID).kind, "usage");
  assert.match((parseApprove(`${AID} maybe`) as { message: string }).message, /not once, session or deny/);
  assert.match((parseApprove(`${AID} once and more`) as { message: string }).message, /with deny only/);
  assert.match((parseApprove("'; drop table once") as { message: string }).message, /not an approval id/);
  assert.equal(parseApprove(`${AID} deny ${"x".repeat(2049)}`).kind, "usage");
  assert.equal(parseApprove(`${AID} deny ${"é".repeat(1025)}`).kind, "usage", "the limit is in bytes, as the server counts");
  assert.equal(parseApprove(`${AID} deny ${"x".repeat(2048)}`).kind, "approve");
});

test("the question shows the exact command in a code block, the buttons, and the text answer", () => {
  const text = questionText(approval(), "Claude", "cc", 1_000_000);
  assert.equal(
    text,
    [
      "🔐 Claude asks to run a command — task `0b7d1f5e`",
      "Run rm -rf build",
      "```sh\nrm -rf build\n```",
      "⏳ Waiting for your answer; denied by itself in 10 min.",
      `Or type: \`/cc -approve ${AID} once|session|deny [message]\``,
    ].join("\n"),
  );
  const p = questionPresentation(approval())!;
  assert.deepEqual(p, {
    blocks: [
      {
        type: "buttons",
        buttons: [
          { label: "✅ Allow once", action: { type: "callback", value: callbackValue(AID, "allow_once")! }, style: "success" },
          { label: "🔁 Allow for session", action: { type: "callback", value: callbackValue(AID, "allow_session")! }, style: "primary" },
          { label: "🚫 Deny", action: { type: "callback", value: callbackValue(AID, "deny")! }, style: "danger" },
        ],
      },
    ],
  });
  // An agent without an "always" option gets no session button.
  const once = questionPresentation(approval({ options: [{ id: "a", name: "Allow", kind: "allow_once" }, { id: "r", name: "Reject", kind: "reject_once" }] }))!;
  assert.deepEqual((once.blocks[0] as { buttons: { label: string }[] }).buttons.map((b) => b.label), ["✅ Allow once", "🚫 Deny"]);
});

test("a command with backticks cannot close its code block; diffs and paths are shown", () => {
  assert.equal(fence("echo ```x```"), "````\necho ```x```\n````");
  const edit = questionText(approval({ tool: { kind: "edit", title: "Edit src/main.rs", paths: ["src/main.rs"], diff: "-a\n+b" } }), "Codex", "cx", 1_000_000);
  assert.match(edit, /^🔐 Codex asks to edit a file — task `0b7d1f5e`\nEdit src\/main\.rs\n```diff\n-a\n\+b\n```\n/);
  const del = questionText(approval({ tool: { kind: "delete", title: "Delete files", paths: ["a", "b", "c", "d", "e", "f", "g"] } }), "Gemini", "gemini", 1_000_000);
  assert.match(del, /• `a`\n• `b`\n• `c`\n• `d`\n• `e`\n• … and 2 more\n/);
});

test("outcome lines for every state", () => {
  const at = 1_700_000_000_000;
  assert.equal(outcomeLine(approval({ state: "allowed", outcome: { decision: "allow_once", by: "chat:@tess via token openclaw", at } })), "✅ allowed once by @tess");
  assert.equal(outcomeLine(approval({ state: "allowed", outcome: { decision: "allow_session", by: "@tess", at } })), "🔁 allowed for this session by @tess");
  assert.equal(outcomeLine(approval({ state: "denied", outcome: { decision: "deny", message: "not that folder", by: "token admin", at } })), "🚫 denied by token admin: not that folder");
  assert.equal(outcomeLine(approval({ state: "expired", outcome: { by: "timeout", at } })), "⏰ expired — denied");
  assert.equal(outcomeLine(approval({ state: "cancelled", outcome: { by: "cancel", at } })), "⏹ cancelled");
  assert.equal(
    settledText(approval({ state: "denied", outcome: { decision: "deny", by: "@tess", at } }), "Claude"),
    "🚫 denied by @tess\nClaude: Run rm -rf build\n$ rm -rf build",
  );
});

// --- on a fake OpenClaw api with a scripted server --------------------------------------------

interface Req {
  method: string;
  path: string;
  body: any;
}

function scripted(route: (r: Req) => { status: number; body?: unknown } | undefined) {
  const requests: Req[] = [];
  const fn = (async (input: string | URL | Request, init?: RequestInit) => {
    const url = new URL(String(input));
    const req: Req = { method: init?.method ?? "GET", path: url.pathname + url.search, body: init?.body ? JSON.parse(String(init.body)) : undefined };
    requests.push(req);
    const r = route(req) ?? { status: 404, body: { error: { code: "not_found", message: "no such route" } } };
    return new Response(r.body === undefined ? null : JSON.stringify(r.body), { status: r.status, headers: { "content-type": "application/json" } });
  }) as typeof fetch;
  return { fn, requests };
}

function setup(route: (r: Req) => { status: number; body?: unknown } | undefined) {
  const api = new FakeApi({ token: "tnl_test", serverUrl: "http://tunnel.test" });
  const s = scripted(route);
  const watcher = new Watcher();
  const edits: { to: string; messageId: string; text: string }[] = [];
  // The Telegram editor talks to the Bot API with OpenClaw's token: route it into `edits`.
  const fetchAll = (async (input: string | URL | Request, init?: RequestInit) => {
    const url = String(input);
    if (url.startsWith("https://tg.test/")) {
      const b = JSON.parse(String(init?.body));
      edits.push({ to: String(b.chat_id), messageId: String(b.message_id), text: b.text });
      return new Response(JSON.stringify({ ok: true, result: true }), { status: 200 });
    }
    return s.fn(input, init);
  }) as typeof fetch;
  const deps = register(api, {
    fetch: fetchAll,
    watcher,
    messageIds: new MessageIds(),
    env: {},
    telegramAccount: () => ({ token: "123:abc", apiRoot: "https://tg.test" }),
  });
  return { api, requests: s.requests, watcher, deps, edits };
}

interface Tap {
  replies: string[];
  edits: string[];
  cleared: number;
}

function tapCtx(payload: string, authorized = true): { ctx: TelegramInteractiveContext; seen: Tap } {
  const seen: Tap = { replies: [], edits: [], cleared: 0 };
  const ctx: TelegramInteractiveContext = {
    channel: "telegram",
    accountId: "default",
    conversationId: "111",
    senderId: authorized ? "111" : "222",
    senderUsername: authorized ? "tess" : "mallory",
    isGroup: false,
    auth: { isAuthorizedSender: authorized },
    callback: { data: `tunnel:${payload}`, namespace: "tunnel", payload, messageId: 501, chatId: "111" },
    respond: {
      reply: async ({ text }) => void seen.replies.push(text),
      editMessage: async ({ text }) => void seen.edits.push(text),
      clearButtons: async () => void seen.cleared++,
    },
  };
  return { ctx, seen };
}

const settled = (p: Partial<Approval>) => approval({ state: "allowed", outcome: { decision: "allow_once", by: "chat:@tess via token openclaw", at: 1_700_000_000_000 }, ...p });

test("the plugin claims the tunnel namespace on Telegram", () => {
  const { api } = setup(() => undefined);
  assert.deepEqual(api.interactive.map((r) => [r.channel, r.namespace]), [["telegram", "tunnel"]]);
});

test("a tap by an authorised sender answers with the plugin's token and edits the question to the outcome", async () => {
  const { api, requests } = setup((r) => (r.method === "POST" && r.path === `/v1/approvals/${AID}` ? { status: 200, body: settled({}) } : undefined));
  const { ctx, seen } = tapCtx(`o:${AID.slice(4)}`);
  assert.deepEqual(await api.interactive[0].handler(ctx), { handled: true });
  assert.deepEqual(requests.map((r) => [r.method, r.path, r.body]), [["POST", `/v1/approvals/${AID}`, { decision: "allow_once", by: "@tess" }]]);
  assert.deepEqual(seen.edits, ["✅ allowed once by @tess\nClaude: Run rm -rf build\n$ rm -rf build"]);
  assert.deepEqual(seen.replies, []);
});

test("a tap by a sender OpenClaw does not authorise is refused and nothing is answered", async () => {
  const { api, requests } = setup(() => ({ status: 200, body: settled({}) }));
  const { ctx, seen } = tapCtx(`d:${AID.slice(4)}`, false);
  await api.interactive[0].handler(ctx);
  assert.deepEqual(requests, []);
  assert.deepEqual(seen.edits, []);
  assert.deepEqual(seen.replies, ["⛔ Only an authorised user of this bot can answer this question."]);
});

test("a late tap is told who decided and when, and the question shows the real outcome", async () => {
  const { api } = setup((r) =>
    r.method === "POST"
      ? { status: 409, body: { error: { code: "already_decided", message: "already decided: denied by token admin at 2023-11-14T22:13:20Z" } } }
      : r.path === `/v1/approvals/${AID}`
        ? { status: 200, body: approval({ state: "denied", outcome: { decision: "deny", by: "token admin", at: 1_700_000_000_000 } }) }
        : undefined,
  );
  const { ctx, seen } = tapCtx(`o:${AID.slice(4)}`);
  await api.interactive[0].handler(ctx);
  assert.deepEqual(seen.edits, ["🚫 denied by token admin\nClaude: Run rm -rf build\n$ rm -rf build"]);
  // Tapped again on a question already showing that outcome: Telegram refuses the identical
  // edit, and the person is still told who decided.
  const again = tapCtx(`o:${AID.slice(4)}`);
  again.ctx.respond.editMessage = async () => {
    throw new Error("Call to 'editMessageText' failed! (400: Bad Request: message is not modified: specified new message content and reply markup are exactly the same)");
  };
  await api.interactive[0].handler(again.ctx);
  assert.deepEqual(again.seen.replies, ["⚠️ Already decided: 🚫 denied by token admin at 2023-11-14 22:13:20 UTC."]);
  assert.deepEqual(seen.replies, ["⚠️ Already decided: 🚫 denied by token admin at 2023-11-14 22:13:20 UTC."]);
});

test("a tap with data the plugin never made is refused without a request", async () => {
  const { api, requests } = setup(() => ({ status: 200, body: settled({}) }));
  const { ctx, seen } = tapCtx("o:../../v1/tokens");
  await api.interactive[0].handler(ctx);
  assert.deepEqual(requests, []);
  assert.equal(seen.cleared, 1);
});

test("a failed answer (server down) says so and keeps the buttons for another try", async () => {
  const { api } = setup(() => ({ status: 503, body: { error: { code: "unavailable", message: "store unavailable" } } }));
  const { ctx, seen } = tapCtx(`o:${AID.slice(4)}`);
  await api.interactive[0].handler(ctx);
  assert.equal(seen.cleared, 0);
  assert.deepEqual(seen.edits, []);
  assert.match(seen.replies[0], /^❌ Answering failed: store unavailable/);
});

test("/cc -ask <prompt> submits with approvals: ask; -ask alone is a usage error", async () => {
  const { api, requests } = setup((r) =>
    r.method === "POST" && r.path === "/v1/tasks"
      ? { status: 201, body: { id: TASK_ID, agent: "claude", prompt: r.body.prompt, session: "continue", state: "queued", attempt: 0, created_at: 1 } }
      : r.path === "/v1/runners"
        ? { status: 200, body: { runners: [] } }
        : undefined,
  );
  const r = await api.run("/cc -ask delete the build folder", TELEGRAM_DM);
  const submit = requests.find((q) => q.path === "/v1/tasks")!;
  assert.deepEqual(submit.body, { agent: "claude", prompt: "delete the build folder", conversation: "telegram:111", session: "continue", approvals: "ask" });
  assert.match(r.text!, /\n🔐 Claude asks here before it runs a command or edits a file\.$/);
  await api.run("/cx-new -ask start over", TELEGRAM_DM);
  assert.deepEqual(requests.filter((q) => q.path === "/v1/tasks").map((q) => [q.body.agent, q.body.session, q.body.approvals]).at(-1), ["codex", "new", "ask"]);
  const bare = await api.run("/cc -ask", TELEGRAM_DM);
  assert.equal(bare.isError, true);
  assert.match(bare.text!, /^-ask needs a prompt\./);
  // Without the flag nothing changes.
  await api.run("/cc ask me later", TELEGRAM_DM);
  assert.equal(requests.filter((q) => q.path === "/v1/tasks").at(-1)!.body.approvals, undefined);
});

test("/cc -approve <id> deny <message> answers a question of this conversation's task", async () => {
  const { api, requests } = setup((r) =>
    r.method === "GET" && r.path === `/v1/approvals/${AID}`
      ? { status: 200, body: approval() }
      : r.path === "/v1/approvals?state=pending&limit=100"
        ? { status: 200, body: { approvals: [approval()] } }
        : r.path === `/v1/tasks/${TASK_ID}`
          ? { status: 200, body: { id: TASK_ID, agent: "claude", prompt: "x", conversation: "telegram:111", session: "continue", state: "running", attempt: 1, created_at: 1 } }
          : r.method === "POST" && r.path === `/v1/approvals/${AID}`
            ? { status: 200, body: approval({ state: "denied", outcome: { decision: "deny", message: r.body.message, by: "telegram:111", at: 1 } }) }
            : undefined,
  );
  const r = await api.run(`/cc -approve ${AID} deny use the trash instead`, TELEGRAM_DM);
  assert.equal(r.text, "🚫 Denied: rm -rf build");
  assert.deepEqual(requests.find((q) => q.method === "POST")!.body, { decision: "deny", by: "telegram:111", message: "use the trash instead" });
  // The registered /cc-approve form and a unique fragment of the id work the same.
  const r2 = await api.run(`/cc-approve ${AID.slice(-12)} once`, TELEGRAM_DM);
  assert.equal(r2.text, "✅ Allowed once: rm -rf build");
  assert.deepEqual(requests.filter((q) => q.method === "POST").at(-1)!.body, { decision: "allow_once", by: "telegram:111" });
  const r3 = await api.run("/cc -approve ffffff once", TELEGRAM_DM);
  assert.equal(r3.isError, true);
  assert.equal(r3.text, "❌ No pending approval matches `ffffff`.");
});

test("/cc -approve refuses a question of another conversation's task (the plugin's token owns every chat's tasks)", async () => {
  const { api, requests } = setup((r) =>
    r.method === "GET" && r.path === `/v1/approvals/${AID}`
      ? { status: 200, body: approval() }
      : r.path === `/v1/tasks/${TASK_ID}`
        ? { status: 200, body: { id: TASK_ID, agent: "claude", prompt: "x", conversation: "telegram:111", session: "continue", state: "running", attempt: 1, created_at: 1 } }
        : r.method === "POST"
          ? { status: 200, body: settled({}) }
          : undefined,
  );
  const r = await api.run(`/cc -approve ${AID} once`, TELEGRAM_GROUP);
  assert.equal(r.isError, true);
  assert.equal(r.text, "❌ That question belongs to another conversation; answer it there.");
  assert.equal(requests.filter((q) => q.method === "POST").length, 0);
});

test("/cc -approve with a bad decision is a usage error and asks the server nothing", async () => {
  const { api, requests } = setup(() => undefined);
  const r = await api.run(`/cc -approve ${AID} perhaps`, TELEGRAM_DM);
  assert.equal(r.isError, true);
  assert.match(r.text!, /`perhaps` is not once, session or deny\.\nUsage: \/cc -approve <id> once\|session\|deny/);
  assert.deepEqual(requests, []);
});

test("the watcher posts the question with buttons on Telegram, as text elsewhere, and edits it to an outcome from elsewhere", async () => {
  const { api, deps, edits } = setup(() => undefined);
  const approvals = deps.approvals!;
  const tg = { taskId: TASK_ID, agent: "claude", label: "Claude", target: { channel: "telegram", to: "111", accountId: "default" } };
  await approvals.onEvent(tg, approval());
  assert.equal(api.sent.length, 1);
  assert.deepEqual(api.sent[0].payload?.presentation, questionPresentation(approval()));
  assert.match(api.sent[0].text, /^🔐 Claude asks to run a command — task `0b7d1f5e`\nRun rm -rf build\n```sh\nrm -rf build\n```\n/);
  // A replay of the same event does not post twice.
  await approvals.onEvent(tg, approval());
  assert.equal(api.sent.length, 1);
  // Denied from the CLI: the question is edited to the outcome (Bot API editMessageText).
  await approvals.onEvent(tg, approval({ state: "denied", outcome: { decision: "deny", by: "token admin", at: 1 } }));
  assert.deepEqual(edits, [{ to: "111", messageId: "1", text: "🚫 denied by token admin\nClaude: Run rm -rf build\n$ rm -rf build" }]);

  // Discord: no handler for its buttons here, so the question is text with the command.
  const dc = { taskId: "t2", agent: "codex", label: "Codex", target: { channel: "discord", to: "channel:800" } };
  await approvals.onEvent(dc, approval({ id: "apr_0193a5b2-7c1d-7e4f-8a9b-000000000002", task_id: "t2" }));
  assert.equal(api.sent[1].payload, undefined);
  assert.match(api.sent[1].text, /Or type: `\/cx -approve apr_0193a5b2-7c1d-7e4f-8a9b-000000000002 once\|session\|deny \[message\]`$/);
  // Expired, and no editor for Discord: the outcome is a new message.
  await approvals.onEvent(dc, approval({ id: "apr_0193a5b2-7c1d-7e4f-8a9b-000000000002", task_id: "t2", state: "expired", outcome: { by: "timeout", at: 1 } }));
  assert.equal(api.sent[2].text, "⏰ expired — denied\nCodex: Run rm -rf build\n$ rm -rf build");
});

test("an outcome already shown by a tap is not edited again when its event arrives (even before the answer's response)", async () => {
  let raced: Promise<void> | undefined;
  const { api, deps, watcher, edits } = setup((r) => {
    if (r.method !== "POST") return undefined;
    // The server writes the outcome event before it responds: the watcher may see it first.
    raced = deps.approvals!.onEvent(watcher.list()[0], settled({}));
    return { status: 200, body: settled({}) };
  });
  watcher.add(
    { id: TASK_ID, agent: "claude", prompt: "x", session: "continue", state: "running", attempt: 1, created_at: 1 },
    "claude",
    "Claude",
    { channel: "telegram", to: "111", accountId: "default" },
  );
  const w = watcher.list()[0];
  await deps.approvals!.onEvent(w, approval());
  const { ctx, seen } = tapCtx(`o:${AID.slice(4)}`);
  await api.interactive[0].handler(ctx);
  await raced;
  assert.equal(seen.edits.length, 1);
  await deps.approvals!.onEvent(w, settled({}));
  assert.deepEqual(edits, []);
  assert.deepEqual(w.approvals, { [AID]: { messageId: "1", settled: true } });
});

test("while a task waits for an answer its progress phase shows the question, and goes back to running when settled", async () => {
  const phases: [string, string, string | undefined][] = [];
  const api = new FakeApi({});
  const d = new ApprovalDelivery({
    client: undefined as never,
    loadAdapter: (c) => api.runtime.channel.outbound.loadAdapter(c),
    cfg: () => ({}),
    logger: api.logger,
    commandOf: () => "cc",
    setPhase: (id, phase, detail) => void phases.push([id, phase, detail]),
  });
  const w = { taskId: TASK_ID, agent: "claude", label: "Claude", target: { channel: "telegram", to: "111" } };
  const second = approval({ id: "apr_0193a5b2-7c1d-7e4f-8a9b-000000000009", tool: { kind: "edit", title: "Edit a.rs" } });
  await d.onEvent(w, approval());
  await d.onEvent(w, second);
  assert.deepEqual(d.waiting(TASK_ID).map((a) => a.id), [AID, second.id]);
  await d.onEvent(w, settled({}));
  await d.onEvent(w, { ...second, state: "expired", outcome: { by: "timeout", at: 1 } });
  assert.deepEqual(phases, [
    [TASK_ID, "approval", `⏸️ waiting for approval: rm -rf build (\`${AID}\`)`],
    [TASK_ID, "approval", `⏸️ waiting for approval: rm -rf build (\`${AID}\`) (+1 more)`],
    [TASK_ID, "approval", `⏸️ waiting for approval: Edit a.rs (\`${second.id}\`)`],
    [TASK_ID, "running", undefined],
  ]);
  assert.deepEqual(d.waiting(TASK_ID), []);
});

test("a question whose send fails is retried, so the agent does not wait for nothing", async () => {
  const { api, deps } = setup(() => undefined);
  api.failSends = 1;
  const w = { taskId: TASK_ID, agent: "claude", label: "Claude", target: { channel: "telegram", to: "111" } };
  await deps.approvals!.onEvent(w, approval());
  assert.equal(api.sent.length, 1);
  assert.ok(api.sent[0].payload?.presentation);
  assert.match(api.warnings().join("\n"), /posting approval question apr_\S+ failed \(fake send failure\); retrying/);
});
