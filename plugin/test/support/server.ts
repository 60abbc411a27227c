// Starts a real `tunnel serve` on port 0 with a temporary database, makes tokens, and plays the
// runner over HTTP (claim → ack → events → finish), as the runner of issue 3 will.

import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const PLUGIN_DIR = path.resolve(here, "../..");

/** A TCP port free on loopback right now (for a child that must be told its port). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export function tunnelBin(): string {
  return path.resolve(PLUGIN_DIR, process.env.TUNNEL_BIN ?? "../target/debug/tunnel");
}

export interface Offer {
  task: { id: string; agent: string; prompt: string; conversation?: string; session: unknown; reply_to?: unknown; approvals?: string };
  attempt: number;
  lease_token: string;
  resume_session_id?: string;
}

export class TunnelServer {
  readonly url: string;
  readonly adminToken: string;
  private readonly child: ChildProcess;
  private readonly dir: string;
  stderr = "";

  private constructor(url: string, adminToken: string, child: ChildProcess, dir: string) {
    this.url = url;
    this.adminToken = adminToken;
    this.child = child;
    this.dir = dir;
  }

  /** Starts `tunnel serve`; `env` adds variables (e.g. TELEGRAM_BOT_TOKEN for server delivery). */
  static async start(env: Record<string, string> = {}): Promise<TunnelServer> {
    const dir = mkdtempSync(path.join(process.env.TMPDIR ?? tmpdir(), "tunnel-plugin-test-"));
    const adminToken = `admin-${Math.random().toString(36).slice(2)}-${Date.now().toString(36)}-Zq7`;
    const child = spawn(
      tunnelBin(),
      ["serve", "--port", "0", "--log-format", "json", "--database", path.join(dir, "t.db")],
      {
        env: { ...process.env, WORKER_TOKEN: adminToken, XDG_DATA_HOME: dir, XDG_CONFIG_HOME: dir, RUST_LOG: "info", ...env },
        stdio: ["ignore", "ignore", "pipe"],
      },
    );
    let stderr = "";
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`tunnel serve did not start in 15 s:\n${stderr}`)), 15_000);
      child.on("error", (e) => {
        clearTimeout(timer);
        reject(new Error(`cannot run ${tunnelBin()}: ${e.message} (set TUNNEL_BIN)`));
      });
      child.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`tunnel serve exited with ${code}:\n${stderr}`));
      });
      child.stderr!.setEncoding("utf8");
      child.stderr!.on("data", (d: string) => {
        stderr += d;
        const m = /"address":"([^"]+)"/.exec(stderr);
        if (m) {
          clearTimeout(timer);
          resolve(`http://${m[1]}`);
        }
      });
    });
    const s = new TunnelServer(url, adminToken, child, dir);
    child.stderr!.on("data", (d: string) => {
      s.stderr += d;
    });
    return s;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null) {
      const exited = new Promise((r) => this.child.once("exit", r));
      this.child.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      if (this.child.exitCode === null) this.child.kill("SIGKILL");
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  async call(method: string, p: string, token: string, body?: unknown): Promise<{ status: number; body: any }> {
    const res = await fetch(this.url + p, {
      method,
      headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : undefined };
  }

  async token(role: "client" | "runner" | "admin", name = `${role}-${Math.random().toString(36).slice(2, 8)}`): Promise<string> {
    const r = await this.call("POST", "/v1/tokens", this.adminToken, { name, role });
    if (r.status !== 201) throw new Error(`token create: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body.token;
  }
}

/** Plays a runner over HTTP. */
export class TestRunner {
  readonly server: TunnelServer;
  readonly token: string;
  readonly name: string;
  readonly agents: string[];

  constructor(server: TunnelServer, token: string, name = "runner-1", agents = ["claude", "codex", "gemini"]) {
    this.server = server;
    this.token = token;
    this.name = name;
    this.agents = agents;
  }

  /** Long-polls for a task; undefined when none came within waitMs. */
  async claim(waitMs = 10_000, projects: string[] = []): Promise<Offer | undefined> {
    const r = await this.server.call("POST", "/v1/claim", this.token, {
      runner: this.name,
      agents: this.agents,
      projects,
      wait_ms: waitMs,
    });
    if (r.status === 204) return undefined;
    if (r.status !== 200) throw new Error(`claim: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body as Offer;
  }

  /** A claim that must find nothing: the server then counts the runner as online. */
  async touch(): Promise<void> {
    const o = await this.claim(0);
    if (o) throw new Error(`touch claimed task ${o.task.id} unexpectedly`);
  }

  async ack(o: Offer): Promise<void> {
    const r = await this.server.call("POST", `/v1/tasks/${o.task.id}/ack`, this.token, {
      attempt: o.attempt,
      lease_token: o.lease_token,
    });
    if (r.status !== 200) throw new Error(`ack: ${r.status} ${JSON.stringify(r.body)}`);
  }

  async events(o: Offer, events: { n: number; kind: string; data: unknown }[]): Promise<{ cancel: boolean }> {
    const r = await this.server.call("POST", `/v1/tasks/${o.task.id}/events`, this.token, {
      attempt: o.attempt,
      lease_token: o.lease_token,
      events,
    });
    if (r.status !== 200) throw new Error(`events: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  async heartbeat(o: Offer): Promise<{ cancel: boolean }> {
    const r = await this.server.call("POST", `/v1/tasks/${o.task.id}/heartbeat`, this.token, {
      attempt: o.attempt,
      lease_token: o.lease_token,
    });
    if (r.status !== 200) throw new Error(`heartbeat: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  async finish(
    o: Offer,
    outcome: "succeeded" | "failed" | "cancelled" | "timed_out",
    result: Record<string, unknown>,
  ): Promise<any> {
    const r = await this.server.call("POST", `/v1/tasks/${o.task.id}/finish`, this.token, {
      attempt: o.attempt,
      lease_token: o.lease_token,
      outcome,
      result,
    });
    if (r.status !== 200) throw new Error(`finish: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  /** The agent asks for permission (`POST /v1/tasks/{id}/approvals`); returns the approval. */
  async ask(
    o: Offer,
    req: { key: string; tool: Record<string, unknown>; options?: { id: string; name: string; kind: string }[]; timeout_ms?: number },
  ): Promise<any> {
    const r = await this.server.call("POST", `/v1/tasks/${o.task.id}/approvals`, this.token, {
      attempt: o.attempt,
      lease_token: o.lease_token,
      options: [
        { id: "allow", name: "Allow", kind: "allow_once" },
        { id: "always", name: "Always allow", kind: "allow_always" },
        { id: "reject", name: "Reject", kind: "reject_once" },
      ],
      ...req,
    });
    if (r.status !== 200 && r.status !== 201) throw new Error(`ask: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  /** Waits for the answer (`…/approvals/{aid}/wait`, a long-poll); returns the approval. */
  async waitApproval(o: Offer, aid: string, waitMs = 10_000): Promise<any> {
    const r = await this.server.call("POST", `/v1/tasks/${o.task.id}/approvals/${aid}/wait`, this.token, {
      attempt: o.attempt,
      lease_token: o.lease_token,
      wait_ms: waitMs,
    });
    if (r.status !== 200) throw new Error(`wait: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  }

  /** Claims one task and answers it like a fake agent: "echo: <prompt>" and a session id. */
  async serveOne(answer: (o: Offer) => { text: string; session_id?: string } = defaultAnswer, waitMs = 15_000): Promise<Offer> {
    const o = await this.claim(waitMs);
    if (!o) throw new Error("no task to claim");
    await this.ack(o);
    const a = answer(o);
    await this.events(o, [{ n: 1, kind: "text", data: { text: a.text } }]);
    await this.finish(o, "succeeded", { text: a.text, session_id: a.session_id, duration_ms: 1200 });
    return o;
  }
}

export function defaultAnswer(o: Offer): { text: string; session_id: string } {
  return {
    text: `echo: ${o.task.prompt}`,
    session_id: o.resume_session_id ?? `5e55${o.task.id.replace(/-/g, "").slice(0, 4)}-0000-4000-8000-000000000001`,
  };
}
