// A small client for the tunnel HTTP API v1. The wire types mirror
// crates/tunnel-protocol/src/lib.rs (only the fields this plugin reads).

export type TaskState =
  | "queued"
  | "offered"
  | "running"
  | "cancelling"
  | "parked"
  | "succeeded"
  | "failed"
  | "cancelled"
  | "timed_out"
  | "lost";

export const TERMINAL_STATES: readonly TaskState[] = ["succeeded", "failed", "cancelled", "timed_out", "lost"];

export function isTerminal(state: TaskState): boolean {
  return TERMINAL_STATES.includes(state);
}

export type SessionMode = "continue" | "new" | { resume: string };

export interface ReplyTo {
  platform: "discord" | "telegram";
  channel: string;
  thread?: string;
  message?: string;
}

export interface SubmitTask {
  agent: string;
  prompt: string;
  conversation?: string;
  project?: string;
  model?: string;
  timeout_ms?: number;
  session?: SessionMode;
  reply_to?: ReplyTo;
  /** How the runner treats the agent's permission requests (the stricter of this and the runner's wins). */
  approvals?: ApprovalPolicy;
}

export interface TaskResult {
  text?: string;
  exit_code?: number;
  error?: string;
  stderr_tail?: string;
  session_id?: string;
  duration_ms?: number;
}

export interface Task {
  id: string;
  agent: string;
  prompt: string;
  conversation?: string;
  project?: string;
  session: SessionMode;
  state: TaskState;
  attempt: number;
  runner?: string;
  reason?: string;
  result?: TaskResult;
  queue_position?: number;
  not_before?: number;
  created_at: number;
  started_at?: number;
  finished_at?: number;
}

export interface TaskEvent {
  seq: number;
  attempt: number;
  kind: string;
  data: unknown;
  at: number;
}

export interface RunnerInfo {
  name: string;
  agents: string[];
  projects: string[];
  capacity: number;
  version?: string;
  last_seen: number;
  online: boolean;
  active_tasks: number;
}

export interface SessionBinding {
  conversation: string;
  agent: string;
  session_id?: string;
  runner?: string;
  updated_at: number;
  /** Another token's conversation (admin listings only); absent: the caller's own. */
  owner?: string;
}

export interface RecentSession {
  agent: string;
  session_id: string;
  runner?: string;
  conversation?: string;
  last_used: number;
}

export interface SessionList {
  sessions: SessionBinding[];
  recent: RecentSession[];
}

// --- approvals (crates/tunnel-protocol/src/approval.rs) ------------------------------------

export type ApprovalPolicy = "auto" | "ask" | "deny";
export type ApprovalState = "pending" | "allowed" | "denied" | "expired" | "cancelled";
export type Decision = "allow_once" | "allow_session" | "deny";

export interface ApprovalTool {
  kind: string;
  title: string;
  command?: string;
  paths?: string[];
  diff?: string;
}

export interface ApprovalOutcome {
  decision?: Decision;
  option_id?: string;
  message?: string;
  by: string;
  at: number;
}

export interface Approval {
  id: string;
  task_id: string;
  attempt: number;
  agent: string;
  runner?: string;
  state: ApprovalState;
  tool: ApprovalTool;
  options: { id: string; name: string; kind: string }[];
  asked_at: number;
  expires_at: number;
  outcome?: ApprovalOutcome;
}

export interface ApprovalAnswer {
  decision: Decision;
  message?: string;
  by?: string;
}

/** Any failure talking to the server, with the server's error code when it sent one. */
export class TunnelError extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = "TunnelError";
    this.status = status;
    this.code = code;
  }
}

export interface ClientOptions {
  baseUrl: string;
  token: string | undefined;
  /** Per-request timeout for ordinary calls (long polls add their wait). */
  timeoutMs?: number;
  fetch?: typeof fetch;
}

export class TunnelClient {
  readonly baseUrl: string;
  private readonly token: string | undefined;
  private readonly timeoutMs: number;
  private readonly fetchFn: typeof fetch;

  constructor(opts: ClientOptions) {
    this.baseUrl = opts.baseUrl.replace(/\/+$/, "");
    this.token = opts.token;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.fetchFn = opts.fetch ?? fetch;
  }

  private async request<T>(
    method: string,
    path: string,
    opts: { body?: unknown; headers?: Record<string, string>; timeoutMs?: number; auth?: boolean } = {},
  ): Promise<{ status: number; body: T }> {
    const headers: Record<string, string> = { accept: "application/json", ...opts.headers };
    if (opts.auth !== false) {
      if (!this.token) throw new TunnelError(0, "no_token", "no tunnel token is configured");
      headers.authorization = `Bearer ${this.token}`;
    }
    if (opts.body !== undefined) headers["content-type"] = "application/json";
    let res: Response;
    try {
      res = await this.fetchFn(this.baseUrl + path, {
        method,
        headers,
        body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
        signal: AbortSignal.timeout(opts.timeoutMs ?? this.timeoutMs),
      });
    } catch (e) {
      const cause = (e as { cause?: { code?: string; message?: string } }).cause;
      const why = cause?.code ?? cause?.message ?? (e as Error).message ?? String(e);
      throw new TunnelError(0, "unreachable", `cannot reach the tunnel server at ${this.baseUrl} (${why})`);
    }
    const text = await res.text();
    let body: unknown = undefined;
    if (text) {
      try {
        body = JSON.parse(text);
      } catch {
        body = undefined;
      }
    }
    if (!res.ok) {
      const err = (body as { error?: { code?: string; message?: string } } | undefined)?.error;
      throw new TunnelError(
        res.status,
        err?.code ?? `http_${res.status}`,
        err?.message ?? `HTTP ${res.status} from the tunnel server`,
      );
    }
    return { status: res.status, body: body as T };
  }

  async health(): Promise<boolean> {
    const r = await this.request<{ status: string }>("GET", "/healthz", { auth: false, timeoutMs: 5000 });
    return r.body?.status === "ok";
  }

  /** Submits a task; `created` is false when the idempotency key was seen before. */
  async submit(task: SubmitTask, idempotencyKey?: string): Promise<{ task: Task; created: boolean }> {
    const headers: Record<string, string> = {};
    if (idempotencyKey) headers["idempotency-key"] = idempotencyKey;
    const r = await this.request<Task>("POST", "/v1/tasks", { body: task, headers });
    return { task: r.body, created: r.status === 201 };
  }

  /** The task; with `waitSeconds`, answers when it ends or the wait runs out (server caps at 60). */
  async task(id: string, waitSeconds = 0): Promise<Task> {
    const q = waitSeconds > 0 ? `?wait=${waitSeconds}` : "";
    const r = await this.request<Task>("GET", `/v1/tasks/${encodeURIComponent(id)}${q}`, {
      timeoutMs: this.timeoutMs + waitSeconds * 1000,
    });
    return r.body;
  }

  /**
   * The task's progress as one chat message, rendered by the server as its own delivery
   * renders it: "⏳ claude · working… 12s" and the last tool uses while it runs, one line with
   * the outcome once it ended. `limit` is the chat's message limit (200 to 4096).
   */
  async progress(id: string, limit = 4096): Promise<{ state: TaskState; text: string }> {
    const r = await this.request<{ state: TaskState; text: string }>(
      "GET",
      `/v1/tasks/${encodeURIComponent(id)}/progress?limit=${Math.max(200, Math.min(4096, Math.floor(limit)))}`,
    );
    return r.body;
  }

  async tasks(filter: { conversation?: string; agent?: string; state?: TaskState; limit?: number }): Promise<Task[]> {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(filter)) if (v !== undefined) q.set(k, String(v));
    const r = await this.request<{ tasks: Task[] }>("GET", `/v1/tasks?${q}`);
    return r.body.tasks;
  }

  async cancel(id: string): Promise<Task> {
    const r = await this.request<Task>("POST", `/v1/tasks/${encodeURIComponent(id)}/cancel`);
    return r.body;
  }

  async events(id: string, after = 0): Promise<{ events: TaskEvent[]; state: TaskState }> {
    const r = await this.request<{ events: TaskEvent[]; state: TaskState }>(
      "GET",
      `/v1/tasks/${encodeURIComponent(id)}/events?format=json&after=${after}`,
    );
    return r.body;
  }

  /**
   * Follows a task's event log as Server-Sent Events from `after`, calling `onEvent` for each
   * event. Resolves when the stream ends (the server ends it when the task ends); rejects on a
   * network or HTTP error. `signal` aborts it.
   */
  async streamEvents(
    id: string,
    after: number,
    onEvent: (e: TaskEvent) => void | Promise<void>,
    signal: AbortSignal,
  ): Promise<void> {
    if (!this.token) throw new TunnelError(0, "no_token", "no tunnel token is configured");
    let res: Response;
    try {
      res = await this.fetchFn(`${this.baseUrl}/v1/tasks/${encodeURIComponent(id)}/events`, {
        headers: {
          accept: "text/event-stream",
          authorization: `Bearer ${this.token}`,
          "last-event-id": String(after),
        },
        signal,
      });
    } catch (e) {
      if (signal.aborted) return;
      throw new TunnelError(0, "unreachable", `cannot reach the tunnel server at ${this.baseUrl} (${(e as Error).message})`);
    }
    if (!res.ok || !res.body) {
      const text = await res.text().catch(() => "");
      let message = `HTTP ${res.status} from the tunnel server`;
      let code = `http_${res.status}`;
      try {
        const err = JSON.parse(text).error;
        message = err.message ?? message;
        code = err.code ?? code;
      } catch {
        // not JSON
      }
      throw new TunnelError(res.status, code, message);
    }
    const decoder = new TextDecoder();
    let buf = "";
    const reader = res.body.getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let idx: number;
        while ((idx = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, idx);
          buf = buf.slice(idx + 2);
          const data = parseSseBlock(block);
          if (data === undefined) continue;
          let ev: TaskEvent;
          try {
            ev = JSON.parse(data) as TaskEvent;
          } catch {
            continue;
          }
          if (typeof ev.seq === "number") await onEvent(ev);
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      throw new TunnelError(0, "unreachable", `event stream of task ${id} broke (${(e as Error).message})`);
    } finally {
      reader.releaseLock();
    }
  }

  /** Approval requests of this token's tasks, newest first. */
  async approvals(filter: { state?: ApprovalState; task?: string; limit?: number } = {}): Promise<Approval[]> {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(filter)) if (v !== undefined) q.set(k, String(v));
    const r = await this.request<{ approvals: Approval[] }>("GET", `/v1/approvals?${q}`);
    return r.body.approvals;
  }

  async approval(id: string): Promise<Approval> {
    const r = await this.request<Approval>("GET", `/v1/approvals/${encodeURIComponent(id)}`);
    return r.body;
  }

  /** Answers a pending request; a 409 (`already_decided`, `approval_expired`) says by whom and when. */
  async answerApproval(id: string, answer: ApprovalAnswer): Promise<Approval> {
    const r = await this.request<Approval>("POST", `/v1/approvals/${encodeURIComponent(id)}`, { body: answer });
    return r.body;
  }

  async runners(): Promise<RunnerInfo[]> {
    const r = await this.request<{ runners: RunnerInfo[] }>("GET", "/v1/runners");
    return r.body.runners;
  }

  async sessions(filter: { conversation?: string; agent?: string; limit?: number }): Promise<SessionList> {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(filter)) if (v !== undefined) q.set(k, String(v));
    const r = await this.request<SessionList>("GET", `/v1/sessions?${q}`);
    return r.body;
  }

  async newSession(conversation: string, agent: string): Promise<SessionBinding> {
    const r = await this.request<SessionBinding>("POST", "/v1/sessions/new", { body: { conversation, agent } });
    return r.body;
  }

  async resumeSession(conversation: string, agent: string, sessionId: string): Promise<SessionBinding> {
    const r = await this.request<SessionBinding>("POST", "/v1/sessions/resume", {
      body: { conversation, agent, session_id: sessionId },
    });
    return r.body;
  }
}

/** The `data` of one SSE block (multi-line data joined), or undefined for comments/keep-alives. */
export function parseSseBlock(block: string): string | undefined {
  const data: string[] = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? data.join("\n") : undefined;
}
