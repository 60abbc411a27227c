// Approvals in chat (issue #15): an agent asks before it acts, a person answers from chat.
//
// The server owns the requests, their state, their timeout and who may answer; this module
// only shows the question (with Allow / Allow for session / Deny buttons where the channel has
// them), turns a button tap or `/cc -approve <id> once|session|deny [message]` into
// `POST /v1/approvals/{id}` with the plugin's token, and edits the question to its outcome when
// the task's event log says it was settled — by this chat, the CLI, a timeout or a cancel.
//
// Button data is `tunnel:<o|s|d>:<uuid>` (45 bytes; OpenClaw wraps it as `tgcb1:<sum>:<data>`,
// 57 bytes, under Telegram's 64-byte callback_data limit). Nothing in it is trusted beyond the
// id and the decision: the server checks that the plugin's token owns the task.

import { TunnelError } from "./client.ts";
import { AGENT_LABELS } from "./config.ts";
import type { Approval, ApprovalPolicy, Decision, TunnelClient } from "./client.ts";
import { excerpt, shortId } from "./format.ts";
import type { DeliveryTarget } from "./identity.ts";
import { telegramControls } from "./telegram.ts";
import type { TelegramAccountResolver } from "./telegram.ts";
import type { InteractiveRegistration, Logger, OutboundAdapter, Presentation, TelegramInteractiveContext } from "./types.ts";

export const NAMESPACE = "tunnel";
const ID_PREFIX = "apr_";
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const LETTERS: Record<Decision, string> = { allow_once: "o", allow_session: "s", deny: "d" };
const FROM_LETTER: Record<string, Decision> = { o: "allow_once", s: "allow_session", d: "deny" };
/** Telegram's limit on callback_data, and what OpenClaw adds to a typed callback value. */
export const TELEGRAM_CALLBACK_MAX = 64;
const OPENCLAW_WRAP_BYTES = "tgcb1:".length + 5 + 1;

export function isApprovalId(id: string): boolean {
  return id.startsWith(ID_PREFIX) && UUID_RE.test(id.slice(ID_PREFIX.length));
}

/** The callback value of one button, or undefined when it could not fit Telegram's limit. */
export function callbackValue(id: string, decision: Decision): string | undefined {
  if (!isApprovalId(id)) return undefined;
  const v = `${NAMESPACE}:${LETTERS[decision]}:${id.slice(ID_PREFIX.length)}`;
  return Buffer.byteLength(v, "utf8") + OPENCLAW_WRAP_BYTES <= TELEGRAM_CALLBACK_MAX ? v : undefined;
}

/** The id and decision of a tap (the payload after `tunnel:`), or undefined for anything else. */
export function parseCallbackPayload(payload: string): { id: string; decision: Decision } | undefined {
  const m = /^([osd]):([0-9a-f-]{36})$/.exec(payload);
  if (!m || !UUID_RE.test(m[2])) return undefined;
  return { id: `${ID_PREFIX}${m[2]}`, decision: FROM_LETTER[m[1]] };
}

// --- commands -------------------------------------------------------------------------------

/** Leading flags of `/cc …`: `-ask <prompt>` submits with approvals "ask"; `-approve …` answers. */
export function approvalFlags(args: string | undefined): { args: string | undefined; approvals?: ApprovalPolicy; approve?: boolean } {
  const m = /^\s*(--?)(ask|approve)(?=\s|$)\s*([\s\S]*)$/i.exec(args ?? "");
  if (!m) return { args };
  const rest = m[3].trim() || undefined;
  return m[2].toLowerCase() === "ask" ? { args: rest, approvals: "ask" } : { args: rest, approve: true };
}

const DECISION_WORDS: Record<string, Decision> = {
  once: "allow_once",
  allow: "allow_once",
  yes: "allow_once",
  y: "allow_once",
  session: "allow_session",
  always: "allow_session",
  deny: "deny",
  no: "deny",
  n: "deny",
  reject: "deny",
};

export type ApproveArgs = { kind: "approve"; id: string; decision: Decision; message?: string } | { kind: "usage"; message: string };

/** `<id> once|session|deny [message]`. */
export function parseApprove(args: string | undefined): ApproveArgs {
  const m = /^(\S+)\s+(\S+)\s*([\s\S]*)$/.exec((args ?? "").trim());
  if (!m) return { kind: "usage", message: "Give the approval id and once, session or deny." };
  const [, id, word, rest] = m;
  if (!/^(apr_)?[0-9a-f-]{6,36}$/i.test(id)) return { kind: "usage", message: `\`${id.slice(0, 60)}\` is not an approval id.` };
  const decision = DECISION_WORDS[word.toLowerCase()];
  if (!decision) return { kind: "usage", message: `\`${word.slice(0, 30)}\` is not once, session or deny.` };
  const message = rest.trim();
  if (message && decision !== "deny") return { kind: "usage", message: "A message goes with deny only (it is told to the agent)." };
  if (Buffer.byteLength(message, "utf8") > 2048) return { kind: "usage", message: "The message is too long (at most 2048 bytes)." };
  return message ? { kind: "approve", id: id.toLowerCase(), decision, message } : { kind: "approve", id: id.toLowerCase(), decision };
}

/**
 * The full id for what a user typed: the id, its UUID, or a fragment of at least 6 characters
 * that matches exactly one pending request this token can see (the end of the UUID is its
 * random part, so `…-4f2a9c` style suffixes are unique in practice).
 */
export async function resolveApprovalId(client: TunnelClient, given: string): Promise<string | { error: string }> {
  const g = given.toLowerCase();
  if (isApprovalId(g)) return g;
  if (UUID_RE.test(g)) return `${ID_PREFIX}${g}`;
  const frag = g.replace(/^apr_/, "");
  const pending = await client.approvals({ state: "pending", limit: 100 });
  const hits = pending.filter((a) => a.id.slice(ID_PREFIX.length).includes(frag));
  if (hits.length === 1) return hits[0].id;
  return { error: hits.length ? `\`${given}\` matches ${hits.length} pending approvals; give more of the id.` : `No pending approval matches \`${given}\`.` };
}

// --- texts ----------------------------------------------------------------------------------

const KIND_VERBS: Record<string, string> = {
  execute: "run a command",
  edit: "edit a file",
  delete: "delete",
  move: "move files",
  read: "read",
  search: "search",
  fetch: "fetch from the network",
  think: "think",
  switch_mode: "switch mode",
};

/** A code fence longer than any run of backticks in the body, so the body cannot close it. */
export function fence(body: string, lang = ""): string {
  const longest = Math.max(0, ...(body.match(/`+/g) ?? []).map((r) => r.length));
  const f = "`".repeat(Math.max(3, longest + 1));
  return `${f}${lang}\n${body}\n${f}`;
}

function cut(s: string, max: number): string {
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

function minutes(ms: number): string {
  const m = Math.max(1, Math.round(ms / 60_000));
  return m >= 120 ? `${Math.round(m / 60)} h` : `${m} min`;
}

/** Who answered, for people: the server records "<by> via token <name>"; the name is enough. */
export function displayBy(by: string | undefined): string {
  const b = (by ?? "").replace(/\s+via token\s+\S+$/, "").replace(/^chat:/, "").trim();
  return b || "someone";
}

function when(at: number | undefined): string {
  return at ? new Date(at).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "";
}

/** The question, in Markdown (OpenClaw renders it for the channel). */
export function questionText(a: Approval, label: string, cmd: string, now: number): string {
  const verb = KIND_VERBS[a.tool.kind] ?? "use a tool";
  const lines = [`🔐 ${label} asks to ${verb} — task \`${shortId(a.task_id)}\``, a.tool.title];
  if (a.tool.command) lines.push(fence(cut(a.tool.command, 1500), "sh"));
  if (a.tool.diff) lines.push(fence(cut(a.tool.diff, 1500), "diff"));
  const paths = a.tool.paths ?? [];
  if (paths.length && !a.tool.diff) {
    for (const p of paths.slice(0, 5)) lines.push(`• \`${cut(p, 200)}\``);
    if (paths.length > 5) lines.push(`• … and ${paths.length - 5} more`);
  }
  lines.push(`⏳ Waiting for your answer; denied by itself in ${minutes(a.expires_at - now)}.`);
  lines.push(`Or type: \`/${cmd} -approve ${a.id} once|session|deny [message]\``);
  return lines.join("\n");
}

/** The buttons under the question; "for session" only when the agent offers an always option. */
export function questionPresentation(a: Approval): Presentation | undefined {
  const buttons: Extract<Presentation["blocks"][number], { type: "buttons" }>["buttons"] = [];
  const add = (label: string, d: Decision, style: "success" | "primary" | "danger") => {
    const value = callbackValue(a.id, d);
    if (value) buttons.push({ label, action: { type: "callback", value }, style });
  };
  add("✅ Allow once", "allow_once", "success");
  if (a.options.some((o) => o.kind === "allow_always")) add("🔁 Allow for session", "allow_session", "primary");
  add("🚫 Deny", "deny", "danger");
  // All or nothing: a question with only some of its answers as buttons would mislead.
  return buttons.length >= 2 && buttons.length === (a.options.some((o) => o.kind === "allow_always") ? 3 : 2)
    ? { blocks: [{ type: "buttons", buttons }] }
    : undefined;
}

/** One line for how a request was settled. */
export function outcomeLine(a: Approval): string {
  const who = displayBy(a.outcome?.by);
  switch (a.state) {
    case "pending":
      return "⏳ waiting for an answer";
    case "allowed":
      return a.outcome?.decision === "allow_session" ? `🔁 allowed for this session by ${who}` : `✅ allowed once by ${who}`;
    case "denied":
      return `🚫 denied by ${who}${a.outcome?.message ? `: ${excerpt(a.outcome.message, 200)}` : ""}`;
    case "expired":
      return "⏰ expired — denied";
    case "cancelled":
      return "⏹ cancelled";
  }
}

/** The question once settled (plain text: the buttons are gone and the outcome is first). */
export function settledText(a: Approval, label: string): string {
  const lines = [outcomeLine(a), `${label}: ${a.tool.title}`];
  if (a.tool.command) lines.push(`$ ${cut(a.tool.command, 500)}`);
  else if (a.tool.paths?.length) lines.push(a.tool.paths.slice(0, 3).join(", "));
  return lines.join("\n");
}

/** For a late or second answer: "already decided: allowed once by @tess at …". */
export function alreadyText(a: Approval | undefined, serverMessage: string): string {
  if (!a || a.state === "pending") return `⚠️ ${serverMessage}`;
  return `⚠️ Already decided: ${outcomeLine(a)}${a.outcome?.at ? ` at ${when(a.outcome.at)}` : ""}.`;
}

/** What `/cc-status` and the progress message show while a task waits for an answer. */
export function waitingLine(a: Approval): string {
  return `⏸️ waiting for approval: ${excerpt(a.tool.command ?? a.tool.title, 80)} (\`${a.id}\`)`;
}

// --- delivery -------------------------------------------------------------------------------

/** The part of a followed task this module keeps (persisted with the watch). */
export interface ApprovalWatch {
  taskId: string;
  label: string;
  agent: string;
  target: DeliveryTarget;
  /** Questions posted for this task: message id, and whether their outcome is shown. */
  approvals?: Record<string, { messageId?: string; settled?: boolean }>;
}

/** Edits a message the plugin sent (plain text; an edit without a keyboard removes the buttons). */
export interface ApprovalEditor {
  edit(target: DeliveryTarget, messageId: string, text: string): Promise<void>;
  /** Whether the editor can reach this chat's account (a bot token is configured). */
  usable?(target: DeliveryTarget): boolean;
}

export type { TelegramAccountResolver } from "./telegram.ts";

/** Telegram's editMessageText through the Bot API with the bot token OpenClaw uses. */
export function telegramApprovalEditor(resolve: TelegramAccountResolver, cfg: () => unknown, fetchImpl: typeof fetch = fetch): ApprovalEditor {
  return telegramControls(resolve, cfg, fetchImpl);
}

export interface ApprovalDeps {
  client: TunnelClient;
  loadAdapter: (channel: string) => Promise<OutboundAdapter | undefined>;
  cfg: () => unknown;
  logger: Logger;
  /** The command name of an agent (`cc`), for the text the question shows. */
  commandOf: (agent: string) => string;
  /** Per-channel message editor, where the plugin has one. */
  editor?: (channel: string) => ApprovalEditor | undefined;
  /** The followed task that posted a question (so a tap's outcome is not shown twice). */
  watchOfApproval?: (approvalId: string) => ApprovalWatch | undefined;
  /**
   * Sets the phase of the task's live progress message (chat-ux's `Watcher.setPhase`), so it
   * shows the pending question instead of a silent "working…"; back to "running" when settled.
   */
  setPhase?: (taskId: string, phase: string, detail?: string) => void;
  now?: () => number;
}

function messageIdOf(result: unknown): string | undefined {
  const id = (result as { messageId?: unknown } | undefined)?.messageId;
  return typeof id === "string" && id ? id : typeof id === "number" ? String(id) : undefined;
}

function asApproval(data: unknown): Approval | undefined {
  const a = data as Partial<Approval> | undefined;
  return a && typeof a.id === "string" && typeof a.state === "string" && a.tool && typeof a.tool.title === "string" ? (a as Approval) : undefined;
}

/**
 * The progress phase while a task waits for an answer: the watcher refreshes the live progress
 * message at once (the server's text shows the question) and shows no "typing…" meanwhile.
 */
export const APPROVAL_PHASE = "approval";

export class ApprovalDelivery {
  private readonly deps: ApprovalDeps;
  /** Pending questions per task, oldest first (what the progress message shows). */
  private readonly pending = new Map<string, Approval[]>();

  constructor(deps: ApprovalDeps) {
    this.deps = deps;
  }

  private log(level: "info" | "warn" | "error", msg: string): void {
    this.deps.logger[level](`tunnel: ${msg}`);
  }

  /** An `approval` event of a followed task: post the question, or show its outcome. Never throws. */
  async onEvent(w: ApprovalWatch, data: unknown): Promise<void> {
    const a = asApproval(data);
    if (!a) {
      this.log("warn", `task ${w.taskId}: an approval event without a request in it`);
      return;
    }
    try {
      w.approvals ??= {};
      const seen = w.approvals[a.id];
      this.track(a);
      if (a.state === "pending") {
        if (!seen) await this.post(w, a);
      } else if (!seen?.settled) {
        await this.settle(w, a);
      }
    } catch (e) {
      this.log("warn", `task ${w.taskId}: approval ${a.id}: ${(e as Error).message}`);
    }
  }

  /** Keeps the progress message's phase in step with the task's pending questions. */
  private track(a: Approval): void {
    const list = (this.pending.get(a.task_id) ?? []).filter((x) => x.id !== a.id);
    if (a.state === "pending") list.push(a);
    if (list.length) this.pending.set(a.task_id, list);
    else this.pending.delete(a.task_id);
    const first = list[0];
    const more = list.length > 1 ? ` (+${list.length - 1} more)` : "";
    this.deps.setPhase?.(a.task_id, first ? APPROVAL_PHASE : "running", first ? `${waitingLine(first)}${more}` : undefined);
  }

  /** The questions a followed task waits on now. */
  waiting(taskId: string): Approval[] {
    return [...(this.pending.get(taskId) ?? [])];
  }

  private async post(w: ApprovalWatch, a: Approval): Promise<void> {
    const { deps } = this;
    const adapter = await deps.loadAdapter(w.target.channel);
    const text = questionText(a, w.label, deps.commandOf(w.agent), (deps.now ?? Date.now)());
    const base = {
      cfg: deps.cfg(),
      to: w.target.to,
      text,
      ...(w.target.accountId ? { accountId: w.target.accountId } : {}),
      ...(w.target.threadId !== undefined ? { threadId: w.target.threadId } : {}),
    };
    const presentation = questionPresentation(a);
    // Buttons only where this plugin handles their callbacks (Telegram); elsewhere the text command.
    const send =
      presentation && w.target.channel === "telegram" && adapter?.sendPayload
        ? () => adapter.sendPayload!({ ...base, payload: { text, presentation } })
        : adapter?.sendText
          ? () => adapter.sendText!(base)
          : undefined;
    if (!send) {
      this.log("error", `no outbound adapter for ${w.target.channel}; approval question ${a.id} not posted`);
      return;
    }
    // A question that never arrives makes the agent wait until it expires: retry a little.
    let result: unknown;
    for (let attempt = 1; ; attempt++) {
      try {
        result = await send();
        break;
      } catch (e) {
        if (attempt >= 3) throw e;
        this.log("warn", `posting approval question ${a.id} failed (${(e as Error).message}); retrying`);
        await new Promise((r) => setTimeout(r, 500 * attempt));
      }
    }
    w.approvals![a.id] = { messageId: messageIdOf(result) };
    this.log("info", `task ${w.taskId}: approval question ${a.id} posted to ${w.target.channel}:${w.target.to}`);
  }

  private async settle(w: ApprovalWatch, a: Approval): Promise<void> {
    const entry = (w.approvals![a.id] ??= {});
    entry.settled = true;
    const text = settledText(a, w.label);
    const editor = this.deps.editor?.(w.target.channel);
    if (entry.messageId && editor && (editor.usable?.(w.target) ?? true)) {
      await editor.edit(w.target, entry.messageId, text);
      return;
    }
    // No message to edit (never posted here, or a channel without edits): say it.
    const adapter = await this.deps.loadAdapter(w.target.channel);
    await adapter?.sendText?.({
      cfg: this.deps.cfg(),
      to: w.target.to,
      text,
      ...(w.target.accountId ? { accountId: w.target.accountId } : {}),
      ...(w.target.threadId !== undefined ? { threadId: w.target.threadId } : {}),
    });
  }

  /** Answers from the text command or a tap; the server decides whether that is allowed. */
  async answer(id: string, decision: Decision, by: string, message?: string): Promise<{ ok: true; approval: Approval } | { ok: false; text: string; approval?: Approval }> {
    const { client } = this.deps;
    try {
      const approval = await client.answerApproval(id, { decision, by: cut(by, 128), ...(message ? { message } : {}) });
      return { ok: true, approval };
    } catch (e) {
      if (e instanceof TunnelError && e.status === 409) {
        const approval = await client.approval(id).catch(() => undefined);
        return { ok: false, text: alreadyText(approval, e.message), approval };
      }
      if (e instanceof TunnelError && e.status === 404) return { ok: false, text: `❌ No approval \`${id}\` for this bot's tasks.` };
      throw e;
    }
  }

  /** The Telegram button handler (namespace `tunnel`). */
  interactiveHandler(): InteractiveRegistration {
    return {
      channel: "telegram",
      namespace: NAMESPACE,
      handler: async (ctx: TelegramInteractiveContext) => {
        try {
          await this.onTap(ctx);
        } catch (e) {
          this.log("warn", `approval button: ${(e as Error).message}`);
          await ctx.respond.reply({ text: `❌ Answering failed: ${(e as Error).message}` }).catch(() => {});
        }
        return { handled: true };
      },
    };
  }

  private async onTap(ctx: TelegramInteractiveContext): Promise<void> {
    const tap = parseCallbackPayload(ctx.callback.payload);
    if (!tap) {
      this.log("warn", `approval button with data it does not know (${excerpt(ctx.callback.payload, 40)})`);
      await ctx.respond.clearButtons();
      return;
    }
    if (!ctx.auth.isAuthorizedSender) {
      this.log("warn", `approval ${tap.id}: refused a tap by unauthorised sender ${ctx.senderId ?? "?"}`);
      await ctx.respond.reply({ text: "⛔ Only an authorised user of this bot can answer this question." });
      return;
    }
    const by = ctx.senderUsername ? `@${ctx.senderUsername}` : `telegram:${ctx.senderId ?? "?"}`;
    // This tap shows the outcome itself: mark it before asking, since the outcome event can
    // reach the watcher before the answer's response reaches here.
    const w = this.deps.watchOfApproval?.(tap.id);
    const entry = w?.approvals?.[tap.id];
    const wasSettled = entry?.settled;
    if (entry) entry.settled = true;
    let r: Awaited<ReturnType<ApprovalDelivery["answer"]>>;
    try {
      r = await this.answer(tap.id, tap.decision, by);
    } catch (e) {
      if (entry) entry.settled = wasSettled;
      throw e;
    }
    const approval = r.approval;
    if (!r.ok) {
      if (!approval) await ctx.respond.clearButtons().catch(() => {});
      await ctx.respond.reply({ text: r.text });
    } else this.log("info", `approval ${tap.id}: ${approval!.state} by ${by}`);
    if (approval && approval.state !== "pending") {
      const label = w?.label ?? labelOf(approval.agent);
      try {
        await ctx.respond.editMessage({ text: settledText(approval, label) });
      } catch (e) {
        // A late tap on a question already edited to the same outcome: nothing to change.
        if (!/message is not modified/.test((e as Error).message)) throw e;
      }
    }
  }
}

function labelOf(agent: string): string {
  return (AGENT_LABELS as Record<string, string>)[agent] ?? agent;
}
