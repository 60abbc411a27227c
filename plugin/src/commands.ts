// The chat commands. Every handler answers at once with a short text and never throws into
// OpenClaw: an error becomes a clear reply and a log line.

import { randomUUID } from "node:crypto";

import { approvalFlags, parseApprove, resolveApprovalId, waitingLine } from "./approvals.ts";
import type { ApprovalDelivery } from "./approvals.ts";
import { AGENT_LABELS, AGENTS } from "./config.ts";
import type { Agent, Config } from "./config.ts";
import { isTerminal, TunnelError } from "./client.ts";
import type { ApprovalPolicy, SessionMode, SubmitTask, Task, TunnelClient } from "./client.ts";
import { ago, duration, excerpt, position, shortId } from "./format.ts";
import { identify } from "./identity.ts";
import type { Identity } from "./identity.ts";
import type { MessageIds } from "./msgids.ts";
import { parseCommand } from "./parse.ts";
import type { Parsed, Sub } from "./parse.ts";
import type { CommandContext, CommandDefinition, CommandResult, Logger } from "./types.ts";
import type { Watcher } from "./watcher.ts";

export interface Deps {
  config: Config;
  client: TunnelClient;
  watcher: Watcher;
  messageIds: MessageIds;
  logger: Logger;
  now?: () => number;
  /** Pause before the one retry of a submit (tests shorten it). */
  retryDelayMs?: number;
  /** Approvals in chat (approvals.ts); absent in tests that do not need them. */
  approvals?: ApprovalDelivery;
}

export const SUBCOMMANDS: { sub: Sub; suffix: string; description: (label: string) => string }[] = [
  { sub: "new", suffix: "-new", description: (l) => `Start a new ${l} session (optionally with a prompt)` },
  { sub: "recent", suffix: "-recent", description: (l) => `List recent ${l} sessions` },
  { sub: "resume", suffix: "-resume", description: (l) => `Continue ${l} session <id> (optionally with a prompt)` },
  { sub: "now", suffix: "-now", description: (l) => `Show this chat's current ${l} session` },
  { sub: "stop", suffix: "-stop", description: (l) => `Cancel the running ${l} task (add "all" for queued ones too)` },
  { sub: "status", suffix: "-status", description: (l) => `Show ${l} tasks running and queued here` },
];

const ACTIVE = new Set(["offered", "running", "cancelling"]);
const WAITING = new Set(["queued", "parked"]);

function reply(text: string, isError = false): CommandResult {
  return isError ? { text, isError: true } : { text };
}

/** Turns any failure into a reply for people, and logs it. */
export function errorReply(deps: Deps, what: string, e: unknown): CommandResult {
  const { config } = deps;
  let text: string;
  if (e instanceof TunnelError) {
    switch (e.code) {
      case "unreachable":
        text = `❌ Cannot reach the tunnel server at ${config.serverUrl}. Is it running?`;
        break;
      case "no_token":
        text = "❌ The tunnel plugin has no token. Set plugins.entries.tunnel.config.token (a client token from `tunnel token create`).";
        break;
      case "unauthorized":
        text = "❌ The tunnel server refused the plugin's token (unauthorized). Check plugins.entries.tunnel.config.token.";
        break;
      case "forbidden":
        text = `❌ The plugin's token may not do this: ${e.message}`;
        break;
      default:
        text = `❌ ${what} failed: ${e.message}`;
    }
  } else {
    text = `❌ ${what} failed: ${(e as Error)?.message ?? String(e)}`;
  }
  deps.logger.warn(`tunnel: ${what} failed: ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
  return reply(text, true);
}

/** Wraps a handler so nothing it does can throw into OpenClaw. */
function safe(deps: Deps, what: string, fn: (ctx: CommandContext) => Promise<CommandResult>) {
  return async (ctx: CommandContext): Promise<CommandResult> => {
    try {
      return await fn(ctx);
    } catch (e) {
      return errorReply(deps, what, e);
    }
  };
}

/** The command definitions for one agent: `/cc` and `/cc-new`, `/cc-recent`, …. */
export function agentCommands(deps: Deps, agent: Agent): CommandDefinition[] {
  const label = AGENT_LABELS[agent];
  const base = deps.config.commands[agent];
  const requireAuth = deps.config.requireAuth;
  const defs: CommandDefinition[] = [
    {
      name: base,
      description: `Ask ${label} on a tunnel runner (continues this chat's session)`,
      acceptsArgs: true,
      requireAuth,
      handler: safe(deps, `/${base}`, (ctx) => {
        // `-ask <prompt>` and `-approve <id> …` (approvals.ts) come before the usual parsing.
        const f = approvalFlags(ctx.args);
        if (f.approve) return approve(deps, agent, ctx, f.args);
        return run(deps, agent, ctx, parseCommand(undefined, f.args), f.approvals);
      }),
    },
    {
      name: `${base}-approve`,
      description: `Answer a ${label} approval question: <id> once|session|deny [message]`,
      acceptsArgs: true,
      requireAuth,
      handler: safe(deps, `/${base}-approve`, (ctx) => approve(deps, agent, ctx, ctx.args)),
    },
  ];
  for (const s of SUBCOMMANDS) {
    const name = `${base}${s.suffix}`;
    defs.push({
      name,
      description: s.description(label),
      acceptsArgs: true,
      requireAuth,
      handler: safe(deps, `/${name}`, (ctx) => {
        const f = approvalFlags(ctx.args);
        return run(deps, agent, ctx, parseCommand(s.sub, f.approve ? ctx.args : f.args), f.approvals);
      }),
    });
  }
  return defs;
}

async function run(deps: Deps, agent: Agent, ctx: CommandContext, p: Parsed, approvals?: ApprovalPolicy): Promise<CommandResult> {
  const id = identify(ctx);
  if ("error" in id) {
    deps.logger.warn(`tunnel: no conversation for a command on ${ctx.channel}: ${id.error}`);
    return reply(`❌ ${id.error}`, true);
  }
  const label = AGENT_LABELS[agent];
  const cmd = deps.config.commands[agent];
  // `-ask` goes with a prompt only.
  const prompted = p.kind === "submit" || ((p.kind === "new" || p.kind === "resume") && p.prompt);
  if (approvals && !prompted) {
    return reply(`-ask needs a prompt.\nUsage: /${cmd} -ask <prompt> (the agent asks here before it runs a command or edits a file)`, true);
  }
  switch (p.kind) {
    case "help":
      return help(deps, agent, id);
    case "usage":
      return reply(`${p.message}\n${usageLine(cmd, p.sub)}`, true);
    case "submit":
      return submit(deps, agent, ctx, id, p.prompt, "continue", approvals);
    case "new":
      if (p.prompt) return submit(deps, agent, ctx, id, p.prompt, "new", approvals);
      await deps.client.newSession(id.conversation, agent);
      return reply(`🔄 ${label} session reset. The next /${cmd} starts a new session.`);
    case "resume": {
      const sessionId = await resolveSessionId(deps, agent, p.id);
      if (p.prompt) return submit(deps, agent, ctx, id, p.prompt, { resume: sessionId }, approvals);
      const b = await deps.client.resumeSession(id.conversation, agent, sessionId);
      return reply(
        `🔗 Switched to ${label} session \`${sessionId}\`${b.runner ? ` (on runner ${b.runner})` : ""}.\nThe next /${cmd} <prompt> continues it.`,
      );
    }
    case "recent":
      return recent(deps, agent, id);
    case "now":
      return reply(await currentLine(deps, agent, id));
    case "stop":
      return stop(deps, agent, id, p.all);
    case "status":
      return status(deps, agent, id);
  }
}

function usageLine(cmd: string, sub: Sub): string {
  switch (sub) {
    case "resume":
      return `Usage: /${cmd}-resume <session id> [prompt]`;
    case "stop":
      return `Usage: /${cmd}-stop [all]`;
    case "new":
      return `Usage: /${cmd}-new [prompt]`;
    default:
      return `Usage: /${cmd}-${sub}`;
  }
}

/** A session id prefix (as `-recent` shows it) becomes the full id when exactly one matches. */
async function resolveSessionId(deps: Deps, agent: Agent, given: string): Promise<string> {
  if (given.length >= 32) return given;
  try {
    const list = await deps.client.sessions({ agent, limit: 100 });
    const ids = new Set<string>();
    for (const r of list.recent) if (r.session_id.startsWith(given)) ids.add(r.session_id);
    for (const s of list.sessions) if (s.session_id?.startsWith(given)) ids.add(s.session_id);
    if (ids.size === 1) return [...ids][0];
  } catch {
    // fall back to the id as given
  }
  return given;
}

async function currentLine(deps: Deps, agent: Agent, id: Identity): Promise<string> {
  const label = AGENT_LABELS[agent];
  const cmd = deps.config.commands[agent];
  const list = await deps.client.sessions({ conversation: id.conversation, agent, limit: 1 });
  const b = list.sessions.find((s) => s.conversation === id.conversation && s.agent === agent);
  if (b?.session_id) {
    return `Current ${label} session: \`${b.session_id}\`${b.runner ? ` (runner ${b.runner})` : ""}`;
  }
  return `No active ${label} session here. /${cmd} <prompt> starts one.`;
}

async function help(deps: Deps, agent: Agent, id: Identity): Promise<CommandResult> {
  const label = AGENT_LABELS[agent];
  const c = deps.config.commands[agent];
  const lines = [
    `📋 ${label} through tunnel:`,
    `/${c} <prompt> — ask ${label}; continues this chat's session`,
    `/${c}-new [prompt] — start a new session`,
    `/${c}-recent — recent sessions`,
    `/${c}-resume <id> [prompt] — continue a session`,
    `/${c}-now — this chat's current session`,
    `/${c}-stop [all] — cancel the running task (all: queued too)`,
    `/${c}-status — running and queued tasks here`,
    `/${c} -ask <prompt> — ${label} asks here before it runs a command or edits a file`,
    `/${c}-approve <id> once|session|deny [message] — answer such a question`,
    `/${deps.config.commands.state} — server, token and runners`,
    "",
  ];
  try {
    lines.push(await currentLine(deps, agent, id));
  } catch (e) {
    lines.push(errorReply(deps, `/${c} help`, e).text ?? "");
  }
  return reply(lines.join("\n"));
}

/**
 * The submit's Idempotency-Key: the chat message id when OpenClaw reported it (through the
 * message_received hook), else a fresh id for this command, so at least the plugin's own retry
 * of a submit whose answer was lost cannot create a second task.
 */
function idempotencyKey(deps: Deps, ctx: CommandContext, id: Identity): { key: string; fromMessage: boolean } {
  const messageId = deps.messageIds.take({ channel: ctx.channel, senderId: ctx.senderId, text: ctx.commandBody });
  // Message ids are unique per chat, not globally.
  if (messageId) return { key: `openclaw:${id.conversation}:${messageId}`.slice(0, 256), fromMessage: true };
  return { key: `openclaw:${randomUUID()}`, fromMessage: false };
}

/** Submits, retrying once after a network failure with the same key (so never twice). */
async function submitOnce(deps: Deps, body: SubmitTask, key: string): Promise<{ task: Task; created: boolean }> {
  try {
    return await deps.client.submit(body, key);
  } catch (e) {
    if (!(e instanceof TunnelError) || e.code !== "unreachable") throw e;
    deps.logger.warn(`tunnel: submit failed (${e.message}); retrying once with the same Idempotency-Key`);
    await new Promise((r) => setTimeout(r, deps.retryDelayMs ?? 500));
    return await deps.client.submit(body, key);
  }
}

async function submit(
  deps: Deps,
  agent: Agent,
  ctx: CommandContext,
  id: Identity,
  prompt: string,
  session: SessionMode,
  approvals?: ApprovalPolicy,
): Promise<CommandResult> {
  const { config, client } = deps;
  const label = AGENT_LABELS[agent];
  const body: SubmitTask = { agent, prompt, conversation: id.conversation, session };
  if (approvals) body.approvals = approvals;
  if (config.defaultProject) body.project = config.defaultProject;
  if (config.timeoutMs) body.timeout_ms = config.timeoutMs;
  if (config.delivery === "server") {
    if (typeof id.replyTo === "string") {
      deps.logger.warn(`tunnel: not submitted: ${id.replyTo}`);
      return reply(`❌ Not submitted: ${id.replyTo}.`, true);
    }
    body.reply_to = id.replyTo;
  }
  const { key, fromMessage } = idempotencyKey(deps, ctx, id);
  const { task, created } = await submitOnce(deps, body, key);
  if (!created) {
    return reply(`↩️ Already submitted as ${label} task \`${shortId(task.id)}\` (${task.state}).`);
  }
  if (config.delivery === "plugin") deps.watcher.add(task, agent, label, id.target);
  deps.logger.info(`tunnel: submitted ${agent} task ${task.id} for ${id.conversation}${fromMessage ? "" : " (no chat message id)"}`);

  if (config.delivery === "server") return serverAck(deps, agent, body);

  const lines: string[] = [];
  const sessionNote =
    session === "new" ? " in a new session" : typeof session === "object" ? ` in session \`${session.resume}\`` : "";
  if (task.state === "queued" || task.state === "parked") {
    lines.push(`⏳ Queued for ${label}${sessionNote} — task \`${shortId(task.id)}\`, ${position(task)}.`);
  } else {
    lines.push(`▶️ ${label} task \`${shortId(task.id)}\` is ${task.state}${task.runner ? ` on ${task.runner}` : ""}.`);
  }
  // Which runner can take it; a missing runner is the most common reason nothing happens.
  try {
    const runners = (await client.runners()).filter(
      (r) => r.online && r.agents.includes(agent) && (!body.project || r.projects.includes(body.project)),
    );
    if (task.state === "queued") {
      lines.push(
        runners.length
          ? `Runner${runners.length > 1 ? "s" : ""}: ${runners.map((r) => r.name).join(", ")}`
          : `⚠️ No runner for ${agent}${body.project ? ` with project ${body.project}` : ""} is online; it waits until one is.`,
      );
    }
  } catch (e) {
    deps.logger.warn(`tunnel: listing runners failed: ${(e as Error).message}`);
  }
  if (approvals === "ask") lines.push(`🔐 ${label} asks here before it runs a command or edits a file.`);
  return reply(lines.join("\n"));
}

/**
 * Server delivery: the tunnel server posts the acknowledgement itself, as the task's first
 * message in the chat (then edits it to "working…" and the outcome), so it can never arrive
 * after the answer — a command's own reply is sent by OpenClaw with a delay of up to a second.
 * The command replies only to warn that no runner can take the task (it would wait).
 */
async function serverAck(deps: Deps, agent: Agent, body: SubmitTask): Promise<CommandResult> {
  try {
    const runners = (await deps.client.runners()).filter(
      (r) => r.online && r.agents.includes(agent) && (!body.project || r.projects.includes(body.project)),
    );
    if (!runners.length) {
      return reply(`⚠️ No runner for ${agent}${body.project ? ` with project ${body.project}` : ""} is online; the task waits until one is.`);
    }
  } catch (e) {
    deps.logger.warn(`tunnel: listing runners failed: ${(e as Error).message}`);
  }
  return { suppressReply: true };
}

async function recent(deps: Deps, agent: Agent, id: Identity): Promise<CommandResult> {
  const label = AGENT_LABELS[agent];
  const now = (deps.now ?? Date.now)();
  const list = await deps.client.sessions({ agent, limit: 8 });
  const current = (await deps.client.sessions({ conversation: id.conversation, agent, limit: 1 })).sessions.find(
    (s) => s.conversation === id.conversation,
  )?.session_id;
  if (!list.recent.length) return reply(`No recent ${label} sessions found.`);
  const lines = [`📋 Recent ${label} sessions:`];
  list.recent.forEach((r, i) => {
    const where = [
      r.runner ? `runner ${r.runner}` : undefined,
      ago(r.last_used, now),
      r.conversation === id.conversation ? "this chat" : undefined,
      r.session_id === current ? "current" : undefined,
    ]
      .filter(Boolean)
      .join(" · ");
    lines.push(`${i + 1}. \`${r.session_id}\` — ${where}`);
  });
  lines.push(`Continue one with /${deps.config.commands[agent]}-resume <id> [prompt].`);
  return reply(lines.join("\n"));
}

async function openTasks(deps: Deps, agent: Agent, id: Identity): Promise<Task[]> {
  const tasks = await deps.client.tasks({ conversation: id.conversation, agent, limit: 100 });
  return tasks.filter((t) => !isTerminal(t.state)).reverse(); // oldest first
}

async function stop(deps: Deps, agent: Agent, id: Identity, all: boolean): Promise<CommandResult> {
  const label = AGENT_LABELS[agent];
  const open = await openTasks(deps, agent, id);
  const targets = open.filter((t) => ACTIVE.has(t.state) || (all && WAITING.has(t.state)));
  if (!targets.length) {
    const waiting = open.filter((t) => WAITING.has(t.state)).length;
    return reply(
      `Nothing ${label} is running here.${waiting ? ` ${waiting} queued; /${deps.config.commands[agent]}-stop all cancels them too.` : ""}`,
    );
  }
  const lines: string[] = [];
  for (const t of targets) {
    try {
      const after = await deps.client.cancel(t.id);
      lines.push(
        after.state === "cancelled"
          ? `🛑 Cancelled ${label} task \`${shortId(t.id)}\` (${excerpt(t.prompt, 40)}).`
          : `🛑 Stopping ${label} task \`${shortId(t.id)}\` on ${after.runner ?? "its runner"}…`,
      );
    } catch (e) {
      if (e instanceof TunnelError && e.code === "conflict") {
        lines.push(`Task \`${shortId(t.id)}\` had already ended.`);
      } else {
        lines.push(errorReply(deps, `cancel ${t.id}`, e).text ?? "");
      }
    }
  }
  return reply(lines.join("\n"));
}

async function status(deps: Deps, agent: Agent, id: Identity): Promise<CommandResult> {
  const label = AGENT_LABELS[agent];
  const now = (deps.now ?? Date.now)();
  const open = await openTasks(deps, agent, id);
  if (!open.length) return reply(`No ${label} tasks running or queued here.`);
  const lines = [`${label} tasks here:`];
  const waiting = await pendingApprovals(deps, open);
  for (const t of open) {
    const tid = `\`${shortId(t.id)}\``;
    const what = excerpt(t.prompt, 50);
    if (ACTIVE.has(t.state)) {
      const since = t.started_at ? ` for ${duration(now - t.started_at)}` : "";
      lines.push(`▶️ ${t.state} on ${t.runner ?? "a runner"}${since} — ${tid} ${what}`);
      for (const a of waiting.filter((x) => x.task_id === t.id)) lines.push(`   ${waitingLine(a)}`);
    } else if (t.state === "parked") {
      const until = t.not_before ? ` until ${new Date(t.not_before).toISOString()}` : "";
      lines.push(`⏸️ parked${until} — ${tid} ${what}`);
    } else {
      lines.push(`⏳ queued, ${position(t)} — ${tid} ${what}`);
    }
  }
  return reply(lines.join("\n"));
}

/** Pending approval questions of running tasks (none when the server has no approvals yet). */
async function pendingApprovals(deps: Deps, open: Task[]) {
  if (!open.some((t) => ACTIVE.has(t.state))) return [];
  try {
    const ids = new Set(open.map((t) => t.id));
    return (await deps.client.approvals({ state: "pending", limit: 100 })).filter((a) => ids.has(a.task_id));
  } catch (e) {
    deps.logger.warn(`tunnel: listing approvals failed: ${(e as Error).message}`);
    return [];
  }
}

/** `/cc -approve <id> once|session|deny [message]`: the text answer, for every channel. */
async function approve(deps: Deps, agent: Agent, ctx: CommandContext, args: string | undefined): Promise<CommandResult> {
  const cmd = deps.config.commands[agent];
  const usage = `Usage: /${cmd} -approve <id> once|session|deny [message for the agent]`;
  const p = parseApprove(args);
  if (p.kind === "usage") return reply(`${p.message}\n${usage}`, true);
  if (!deps.approvals) return reply("❌ Approvals are not available in this plugin instance.", true);
  const here = identify(ctx);
  if ("error" in here) return reply(`❌ ${here.error}`, true);
  const aid = await resolveApprovalId(deps.client, p.id);
  if (typeof aid !== "string") return reply(`❌ ${aid.error}`, true);
  // Answer only questions of this conversation's tasks: the plugin's token owns every chat's
  // tasks, so without this check anyone authorised in a group could answer a DM's question.
  const a = await deps.client.approval(aid);
  const task = await deps.client.task(a.task_id);
  if (task.conversation !== here.conversation) {
    deps.logger.warn(`tunnel: refused to answer approval ${aid} of ${task.conversation ?? "?"} from ${here.conversation}`);
    return reply("❌ That question belongs to another conversation; answer it there.", true);
  }
  const by = `${ctx.channel}:${ctx.senderId ?? ctx.from ?? "?"}`;
  const r = await deps.approvals.answer(aid, p.decision, by, p.message);
  if (!r.ok) return reply(r.text, true);
  deps.logger.info(`tunnel: approval ${aid}: ${r.approval.state} by ${by} (text command)`);
  const outcome = { allow_once: "✅ Allowed once", allow_session: "🔁 Allowed for this session", deny: "🚫 Denied" }[p.decision];
  return reply(`${outcome}: ${excerpt(a.tool.command ?? a.tool.title, 80)}`);
}

/** `/cli-state [all]`: really checks the server, the token and the runners. */
export function stateCommand(deps: Deps): CommandDefinition {
  const name = deps.config.commands.state;
  return {
    name,
    description: "Tunnel status: server, token, runners and this chat's sessions",
    acceptsArgs: true,
    requireAuth: deps.config.requireAuth,
    handler: safe(deps, `/${name}`, async (ctx) => {
      const all = /^(all|全部|全部绑定)$/i.test((ctx.args ?? "").trim());
      const id = identify(ctx);
      const text = await stateReport(deps, "error" in id ? undefined : id.conversation, all);
      return reply(text);
    }),
  };
}

/** The text of `/cli-state` and the state tool. Never throws. */
export async function stateReport(deps: Deps, conversation: string | undefined, all: boolean): Promise<string> {
  const { config, client } = deps;
  const now = (deps.now ?? Date.now)();
  const lines = ["Tunnel status", `Server: ${config.serverUrl}`];
  try {
    await client.health();
    lines.push("✅ Server reachable");
  } catch (e) {
    lines.push(`❌ Server not reachable: ${(e as Error).message}`);
    deps.logger.warn(`tunnel: state check: ${(e as Error).message}`);
    return lines.join("\n");
  }
  let runners;
  try {
    runners = await client.runners();
    lines.push("✅ Token accepted");
  } catch (e) {
    const msg = e instanceof TunnelError && e.code === "unauthorized" ? "the server refused it (unauthorized)" : (e as Error).message;
    lines.push(config.token ? `❌ Token: ${msg}` : "❌ No token configured (plugins.entries.tunnel.config.token)");
    deps.logger.warn(`tunnel: state check: token: ${msg}`);
    return lines.join("\n");
  }
  const shown = all ? runners : runners.filter((r) => r.online);
  const online = runners.filter((r) => r.online).length;
  lines.push(`Runners online: ${online}${runners.length > online ? ` (${runners.length - online} offline)` : ""}`);
  for (const r of shown) {
    lines.push(
      `${r.online ? "🟢" : "⚪"} ${r.name} — agents: ${r.agents.join(", ") || "none"}; projects: ${r.projects.join(", ") || "none"}; ` +
        `busy ${r.active_tasks}/${r.capacity}; seen ${ago(r.last_seen, now)}`,
    );
  }
  if (!online) lines.push("⚠️ No runner is online: tasks wait in the queue until one connects.");
  lines.push(`Delivery: ${config.delivery === "plugin" ? `plugin (following ${deps.watcher.list().length} task(s))` : "server"}`);
  if (config.defaultProject) lines.push(`Project: ${config.defaultProject}`);
  if (conversation) {
    lines.push(`This chat: ${conversation}`);
    try {
      const list = await client.sessions({ conversation, limit: 20 });
      for (const agent of AGENTS) {
        const b = list.sessions.find((s) => s.agent === agent && s.conversation === conversation);
        lines.push(`• ${AGENT_LABELS[agent]} (/${config.commands[agent]}): ${b?.session_id ? `\`${b.session_id}\`` : "no session"}`);
      }
    } catch (e) {
      lines.push(`• sessions: ${(e as Error).message}`);
    }
  }
  return lines.join("\n");
}

