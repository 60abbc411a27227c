// Plugin delivery: the background service follows the event log of every task this plugin
// submitted and sends progress and the answer through OpenClaw's outbound adapter, so it works
// on every channel OpenClaw has.
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
}

const DEFAULT_RETRY_DELAYS = [1000, 2000, 5000, 10_000, 30_000];

export class Watcher {
  private deps: WatcherDeps | undefined;
  private readonly watches = new Map<string, Watch>();
  private readonly loops = new Map<string, Promise<void>>();
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
    await Promise.allSettled([...this.loops.values()]);
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
    if (!deps?.progress || w.startNotified || ev.kind !== "state") return;
    const data = (ev.data ?? {}) as { state?: string; runner?: string };
    if (data.state !== "running") return;
    w.startNotified = true;
    const waited = this.now() - w.addedAt;
    if (w.queuedAhead > 0 || waited >= deps.progressAfterMs) {
      const runner = data.runner ? ` on ${data.runner}` : "";
      await this.send(w, `▶️ ${w.label} started task \`${shortId(w.taskId)}\`${runner}.`);
    }
    void this.save();
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
