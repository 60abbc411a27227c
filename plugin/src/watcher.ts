// Plugin delivery: the background service follows the event log of every task this plugin
// submitted and sends progress and the answer through OpenClaw's outbound adapter, so it works
// on every channel OpenClaw has.
//
// While a task runs, one progress message is kept up to date where the plugin can edit
// messages (Telegram, Discord: `controls`): posted when the task starts, edited at most every few
// seconds with what the server renders (`GET /v1/tasks/{id}/progress`: the current step, its
// command or path, the elapsed time), with "typing…" shown meanwhile, and edited to the outcome
// before the answer. A 429 from the platform holds the edits for as long as it says. Elsewhere a
// task that waited gets one "▶️ started" notice instead, and nothing more until the answer.
//
// The list of followed tasks is written to the OpenClaw state dir, so a gateway restart picks
// them up again. OpenClaw calls `register()` more than once per process, so there is one
// watcher per process (kept on globalThis), shared by every registration.

import { promises as fs } from "node:fs";
import path from "node:path";

import { isTerminal, TunnelError } from "./client.ts";
import type { Task, TaskEvent, TunnelClient } from "./client.ts";
import type { DeliveryTarget } from "./identity.ts";
import { chunkText, finalMessage, shortId } from "./format.ts";
import { RateLimited } from "./controls.ts";
import type { ChatControls } from "./controls.ts";
import { APPROVAL_PHASE } from "./approvals.ts";
import type { Logger, OutboundAdapter } from "./types.ts";

export interface Watch {
  taskId: string;
  agent: string;
  label: string;
  target: DeliveryTarget;
  /** Tasks ahead of it at submit; a start notice is sent only for tasks that waited. */
  queuedAhead: number;
  addedAt: number;
  lastSeq: number;
  startNotified: boolean;
  /** Approval questions posted for this task (approvals.ts). */
  approvals?: Record<string, { messageId?: string; settled?: boolean }>;
  /** The live progress message: its id, and the text it shows now. */
  progress?: { messageId: string; text: string };
  /** The task ended: nothing but its outcome and answer is sent any more. */
  ended?: boolean;
}

/** What a followed task's live progress needs while this process runs (not persisted). */
interface Live {
  timer?: ReturnType<typeof setInterval>;
  /** Something happened since the message was last edited. */
  dirty: boolean;
  /** Refreshes run one at a time, in order. */
  chain: Promise<void>;
  /** Posting the message failed: stop trying for this task. */
  off?: boolean;
  /** Waiting for a person (an approval question): no "typing…" then. */
  waiting?: boolean;
  /** A refresh is under way; ticks meanwhile only leave the message marked stale. */
  busy?: boolean;
  /** The platform answered 429: no edit and no "typing…" before this time (ms). */
  heldUntil?: number;
  /** When "typing…" was last sent, and the request if it is still under way. */
  typedAt?: number;
  typingCall?: Promise<void>;
}

export interface WatcherDeps {
  client: TunnelClient;
  loadAdapter: (channel: string) => Promise<OutboundAdapter | undefined>;
  /** The OpenClaw config to pass to the adapter (`cfg`). */
  cfg: () => unknown;
  logger: Logger;
  progress: boolean;
  /** Also send a start notice when a task waited at least this long (ms). */
  progressAfterMs: number;
  now?: () => number;
  /** Delays between retries, for tests. */
  retryDelaysMs?: number[];
  /** An `approval` event of a followed task (approvals.ts posts or settles the question). */
  onApproval?: (w: Watch, data: unknown) => Promise<void>;
  /** Edits and "typing…" per channel, where the plugin can do them (telegram.ts, discord.ts). */
  controls?: (channel: string) => ChatControls | undefined;
  /** Least time between two edits of a progress message (ms; default 3000). */
  progressEveryMs?: number;
}

const DEFAULT_PROGRESS_EVERY_MS = 3000;

/** The longest the outcome edit waits out a 429 before the answer goes anyway (ms, in all). */
const MAX_END_HOLD_MS = 30_000;

const DEFAULT_RETRY_DELAYS = [1000, 2000, 5000, 10_000, 30_000];

export class Watcher {
  private deps: WatcherDeps | undefined;
  private readonly watches = new Map<string, Watch>();
  private readonly loops = new Map<string, Promise<void>>();
  private readonly live = new Map<string, Live>();
  private abort: AbortController | undefined;
  private file: string | undefined;
  private saving: Promise<void> = Promise.resolve();

  /** Sets what the watcher uses; the latest registration wins. Has no side effects. */
  configure(deps: WatcherDeps): void {
    this.deps = deps;
  }

  get running(): boolean {
    return this.abort !== undefined;
  }

  list(): Watch[] {
    return [...this.watches.values()];
  }


  /** Starts following the persisted tasks and any added since. */
  async start(stateDir: string | undefined): Promise<void> {
    if (this.abort) return;
    this.abort = new AbortController();
    if (stateDir) {
      this.file = path.join(stateDir, "tunnel-plugin", "watches.json");
      try {
        const saved = JSON.parse(await fs.readFile(this.file, "utf8")) as Watch[];
        for (const w of saved) if (w && typeof w.taskId === "string" && !this.watches.has(w.taskId)) this.watches.set(w.taskId, w);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") this.log("warn", `could not read ${this.file}: ${(e as Error).message}`);
      }
    }
    for (const w of this.watches.values()) this.spawn(w);
    await this.save();
  }

  async stop(): Promise<void> {
    const abort = this.abort;
    this.abort = undefined;
    abort?.abort();
    for (const l of this.live.values()) clearInterval(l.timer);
    await Promise.allSettled([...this.loops.values()]);
    await Promise.allSettled([...this.live.values()].map((l) => l.chain));
    this.live.clear();
    await this.saving;
  }

  /** Follows a task just submitted. Safe to call before the service started. */
  add(task: Task, agent: string, label: string, target: DeliveryTarget): void {
    if (this.watches.has(task.id)) return;
    const w: Watch = {
      taskId: task.id,
      agent,
      label,
      target,
      queuedAhead: task.queue_position ?? 0,
      addedAt: this.now(),
      lastSeq: 0,
      startNotified: false,
    };
    this.watches.set(task.id, w);
    if (this.abort) {
      this.spawn(w);
      void this.save();
    }
  }

  /** Resolves when every current loop has ended (tests). */
  async idle(): Promise<void> {
    while (this.loops.size) await Promise.allSettled([...this.loops.values()]);
  }

  private now(): number {
    return (this.deps?.now ?? Date.now)();
  }

  private log(level: "info" | "warn" | "error", msg: string): void {
    this.deps?.logger[level](`tunnel: ${msg}`);
  }

  private spawn(w: Watch): void {
    if (this.loops.has(w.taskId)) return;
    const loop = this.follow(w).finally(() => this.loops.delete(w.taskId));
    this.loops.set(w.taskId, loop);
  }

  private async follow(w: Watch): Promise<void> {
    let failures = 0;
    while (this.abort && !this.abort.signal.aborted) {
      const deps = this.deps;
      if (!deps) return;
      const signal = this.abort.signal;
      try {
        await deps.client.streamEvents(w.taskId, w.lastSeq, (ev) => this.onEvent(w, ev), signal);
        if (signal.aborted) return;
        const task = await deps.client.task(w.taskId);
        if (isTerminal(task.state)) {
          await this.endProgress(w);
          await this.send(w, finalMessage(w.label, task));
          this.log("info", `task ${w.taskId} ${task.state}; answer sent to ${w.target.channel}:${w.target.to}`);
          this.watches.delete(w.taskId);
          await this.save();
          return;
        }
        failures = 0; // the stream ended early (server restart): follow again
      } catch (e) {
        if (signal.aborted) return;
        if (e instanceof TunnelError && (e.status === 404 || e.status === 401 || e.status === 403)) {
          this.log("error", `stopped following task ${w.taskId}: ${e.message}`);
          this.stopLive(w.taskId);
          await this.send(w, `⚠️ ${w.label} task \`${shortId(w.taskId)}\`: the tunnel server says ${e.message}; its answer cannot be delivered here.`);
          this.watches.delete(w.taskId);
          await this.save();
          return;
        }
        this.log("warn", `following task ${w.taskId} failed (${(e as Error).message}); retrying`);
        failures++;
      }
      const delays = deps.retryDelaysMs ?? DEFAULT_RETRY_DELAYS;
      await sleep(delays[Math.min(failures, delays.length - 1)] ?? 1000, this.abort?.signal);
    }
  }

  private async onEvent(w: Watch, ev: TaskEvent): Promise<void> {
    w.lastSeq = Math.max(w.lastSeq, ev.seq);
    const deps = this.deps;
    if (ev.kind === "approval") {
      await deps?.onApproval?.(w, ev.data);
      void this.save();
      return;
    }
    if (!deps?.progress) return;
    const data = (ev.kind === "state" ? ev.data ?? {} : {}) as { state?: string; runner?: string };
    if (this.liveProgress(w)) {
      // The message appears when the agent starts, then follows what it does (also what it
      // did while the message was still being posted).
      if (data.state === "running") this.touch(w, !w.progress);
      else if (w.progress || this.live.has(w.taskId)) this.touch(w, false);
      return;
    }
    if (w.startNotified || data.state !== "running") return;
    w.startNotified = true;
    const waited = this.now() - w.addedAt;
    if (w.queuedAhead > 0 || waited >= deps.progressAfterMs) {
      const runner = data.runner ? ` on ${data.runner}` : "";
      await this.send(w, `▶️ ${w.label} started task \`${shortId(w.taskId)}\`${runner}.`);
    }
    void this.save();
  }

  /**
   * Something changed in a followed task (approvals.ts calls this when a question is asked or
   * answered): its progress message is refreshed at once.
   */
  setPhase(taskId: string, phase: string, _detail?: string): void {
    const w = this.watches.get(taskId);
    if (!w || !w.progress || !this.liveProgress(w)) return;
    this.touch(w, true);
    const l = this.live.get(taskId);
    if (l) l.waiting = phase === APPROVAL_PHASE;
  }

  /** Whether this task gets a live progress message (the channel lets the plugin edit). */
  private liveProgress(w: Watch): boolean {
    const deps = this.deps;
    const c = deps?.controls?.(w.target.channel);
    return !!deps?.progress && !!c && (c.usable?.(w.target) ?? true) && !this.live.get(w.taskId)?.off;
  }

  /** Marks the progress message stale; `now` refreshes it at once, else on the next tick. */
  private touch(w: Watch, now: boolean): void {
    if (w.ended) return;
    let l = this.live.get(w.taskId);
    if (!l) {
      l = { dirty: true, chain: Promise.resolve() };
      this.live.set(w.taskId, l);
    }
    l.dirty = true;
    if (!l.timer) {
      const every = this.deps?.progressEveryMs ?? DEFAULT_PROGRESS_EVERY_MS;
      const live = l;
      live.timer = setInterval(() => this.tick(w, live), every);
      live.timer.unref?.();
      this.typing(w, live);
    }
    if (now) this.tick(w, l);
  }

  /** One beat: "typing…" again before it fades, and the edit if anything changed. */
  private tick(w: Watch, l: Live): void {
    if (!this.abort || this.abort.signal.aborted || w.ended) return;
    if ((l.heldUntil ?? 0) > this.now()) return;
    if (!l.waiting) this.typing(w, l);
    if (!l.dirty || l.busy) return;
    l.dirty = false;
    l.busy = true;
    l.chain = l.chain
      .then(() => this.refresh(w, l))
      .catch((e) => this.failed(w, l, "progress", e))
      .finally(() => {
        l.busy = false;
      });
  }

  /** A failed edit or "typing…": after a 429, wait as told and show the latest state then. */
  private failed(w: Watch, l: Live, what: string, e: unknown): void {
    if (e instanceof RateLimited) {
      l.heldUntil = Math.max(l.heldUntil ?? 0, this.now() + e.retryAfterMs);
      if (what === "progress") l.dirty = true;
    }
    this.log("warn", `task ${w.taskId}: ${what}: ${(e as Error).message}`);
  }

  /** "typing…", sent again only when the last one is about to fade (5 s Telegram, 10 s Discord). */
  private typing(w: Watch, l: Live): void {
    const c = this.deps?.controls?.(w.target.channel);
    if (!c?.typing || w.ended) return;
    const every = Math.max(0, (c.typingLastsMs ?? 5000) - (this.deps?.progressEveryMs ?? DEFAULT_PROGRESS_EVERY_MS));
    const now = this.now();
    if (l.typedAt !== undefined && now - l.typedAt < every) return;
    l.typedAt = now;
    l.typingCall = c.typing(w.target).catch((e) => this.failed(w, l, "typing indicator", e));
  }

  private limit(w: Watch): number {
    const channel = w.target.channel === "discord" ? 2000 : 4000;
    return Math.min(channel, this.deps?.controls?.(w.target.channel)?.maxLength ?? channel);
  }

  /** Posts the progress message, or edits it to what the server renders now. */
  private async refresh(w: Watch, l: Live): Promise<void> {
    const deps = this.deps;
    if (!deps || l.off) return;
    const p = await deps.client.progress(w.taskId, this.limit(w));
    // The end is shown by endProgress, in order before the answer.
    if (isTerminal(p.state) || !this.watches.has(w.taskId)) return;
    await this.show(w, p.text);
  }

  private async show(w: Watch, text: string): Promise<void> {
    const deps = this.deps;
    if (!deps) return;
    if (w.progress) {
      if (w.progress.text === text) return;
      await deps.controls?.(w.target.channel)?.edit(w.target, w.progress.messageId, text);
      w.progress.text = text;
      return;
    }
    const id = messageIdOf(await this.sendOne(w, text));
    const l = this.live.get(w.taskId);
    if (!id) {
      // No id to edit later: one message is enough, no stream of new ones.
      if (l) l.off = true;
      this.log("warn", `task ${w.taskId}: the progress message got no message id; no live progress for it`);
      return;
    }
    w.progress = { messageId: id, text };
    w.startNotified = true;
    void this.save();
  }

  private stopLive(taskId: string): Live | undefined {
    const l = this.live.get(taskId);
    if (l) clearInterval(l.timer);
    this.live.delete(taskId);
    return l;
  }

  /**
   * The task ended: its progress message shows the outcome, before the answer is sent. Nothing
   * about the task may reach the chat after the answer, so this waits for the edit and the
   * "typing…" under way, and waits out a 429 (up to MAX_END_HOLD_MS) for the outcome edit.
   */
  private async endProgress(w: Watch): Promise<void> {
    w.ended = true;
    const l = this.stopLive(w.taskId);
    await l?.chain;
    await l?.typingCall;
    if (!w.progress || !this.deps) return;
    let held = l?.heldUntil ?? 0;
    let budget = MAX_END_HOLD_MS;
    for (let attempt = 1; ; attempt++) {
      const wait = Math.min(held - this.now(), budget);
      if (wait > 0) {
        budget -= wait;
        await sleep(wait, undefined);
      }
      try {
        const p = await this.deps.client.progress(w.taskId, this.limit(w));
        await this.show(w, p.text);
        return;
      } catch (e) {
        if (e instanceof RateLimited && attempt < 3 && budget > 0) {
          held = this.now() + e.retryAfterMs;
          continue;
        }
        this.log("warn", `task ${w.taskId}: could not show the outcome in the progress message: ${(e as Error).message}`);
        return;
      }
    }
  }

  /** Sends one message (no chunking: a progress text fits) and returns the adapter's result. */
  private async sendOne(w: Watch, text: string): Promise<unknown> {
    const deps = this.deps;
    const adapter = deps ? await deps.loadAdapter(w.target.channel) : undefined;
    if (!deps || !adapter?.sendText) return undefined;
    return adapter.sendText({
      cfg: deps.cfg(),
      to: w.target.to,
      text,
      ...(w.target.accountId ? { accountId: w.target.accountId } : {}),
      ...(w.target.threadId !== undefined ? { threadId: w.target.threadId } : {}),
    });
  }

  /** Sends text in chunks through the channel's outbound adapter; never throws. */
  async send(w: Watch, text: string): Promise<boolean> {
    const deps = this.deps;
    if (!deps) return false;
    let adapter: OutboundAdapter | undefined;
    try {
      adapter = await deps.loadAdapter(w.target.channel);
    } catch (e) {
      this.log("error", `loading the ${w.target.channel} outbound adapter failed: ${(e as Error).message}`);
      return false;
    }
    if (!adapter?.sendText) {
      this.log("error", `OpenClaw has no outbound adapter for channel ${w.target.channel}; message for task ${w.taskId} dropped`);
      return false;
    }
    const limit = Math.min(adapter.textChunkLimit ?? 4000, w.target.channel === "discord" ? 2000 : 4000);
    for (const chunk of chunkText(text, limit)) {
      let sent = false;
      for (let attempt = 0; attempt < 3 && !sent; attempt++) {
        try {
          await adapter.sendText({
            cfg: deps.cfg(),
            to: w.target.to,
            text: chunk,
            ...(w.target.accountId ? { accountId: w.target.accountId } : {}),
            ...(w.target.threadId !== undefined ? { threadId: w.target.threadId } : {}),
          });
          sent = true;
        } catch (e) {
          this.log("warn", `sending to ${w.target.channel}:${w.target.to} failed (${(e as Error).message})`);
          await sleep((deps.retryDelaysMs ?? DEFAULT_RETRY_DELAYS)[attempt] ?? 1000, undefined);
        }
      }
      if (!sent) {
        this.log("error", `gave up sending a message for task ${w.taskId} to ${w.target.channel}:${w.target.to}`);
        return false;
      }
    }
    return true;
  }

  private save(): Promise<void> {
    const file = this.file;
    if (!file) return this.saving;
    const data = JSON.stringify([...this.watches.values()], null, 1);
    this.saving = this.saving.then(async () => {
      try {
        await fs.mkdir(path.dirname(file), { recursive: true });
        const tmp = `${file}.${process.pid}.tmp`;
        await fs.writeFile(tmp, data, { mode: 0o600 });
        await fs.rename(tmp, file);
      } catch (e) {
        this.log("warn", `could not write ${file}: ${(e as Error).message}`);
      }
    });
    return this.saving;
  }
}

function messageIdOf(result: unknown): string | undefined {
  const id = (result as { messageId?: unknown } | undefined)?.messageId;
  return typeof id === "string" && id ? id : typeof id === "number" ? String(id) : undefined;
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

const KEY = Symbol.for("openclaw-plugin-tunnel.watcher");

/** The process-wide watcher. */
export function sharedWatcher(): Watcher {
  const g = globalThis as unknown as Record<symbol, Watcher | undefined>;
  return (g[KEY] ??= new Watcher());
}
