// Agent tools for the OpenClaw model: cc_call, codex_call, gemini_call and tunnel_state.
//
// Each call tool submits a task and returns its task id and, once known, the agent's session
// id, so a follow-up call can pass `session_id` and continue the same agent session (the
// original threw the id away). With `wait_seconds` it waits for the answer.

import { AGENT_LABELS } from "./config.ts";
import type { Agent } from "./config.ts";
import { isTerminal, TunnelError } from "./client.ts";
import type { SubmitTask, Task } from "./client.ts";
import { stateReport } from "./commands.ts";
import type { Deps } from "./commands.ts";
import { SESSION_ID_RE } from "./parse.ts";
import type { ToolDefinition, ToolResult } from "./types.ts";

export const TOOL_NAMES: Record<Agent, string> = { claude: "cc_call", codex: "codex_call", gemini: "gemini_call" };
export const STATE_TOOL = "tunnel_state";
/** The longest a tool call waits for an answer. */
export const MAX_WAIT_SECONDS = 1800;

function result(payload: Record<string, unknown>): ToolResult {
  return { content: [{ type: "text", text: JSON.stringify(payload, null, 2) }], details: payload };
}

/** What a tool call returns about a task. */
export function taskSummary(task: Task): Record<string, unknown> {
  const r = task.result ?? {};
  const out: Record<string, unknown> = { task_id: task.id, state: task.state, done: isTerminal(task.state) };
  if (task.runner) out.runner = task.runner;
  if (task.queue_position !== undefined) out.queue_position = task.queue_position;
  if (r.session_id) out.session_id = r.session_id;
  if (r.text !== undefined) out.text = r.text;
  if (r.error) out.error = r.error;
  if (task.reason && !isTerminal(task.state)) out.reason = task.reason;
  return out;
}

/** Waits up to `seconds` for the task to end, in long polls the server allows (≤ 60 s each). */
export async function waitFor(deps: Deps, task: Task, seconds: number, signal?: AbortSignal): Promise<Task> {
  const deadline = Date.now() + seconds * 1000;
  let t = task;
  while (!isTerminal(t.state) && !signal?.aborted) {
    const left = Math.floor((deadline - Date.now()) / 1000);
    if (left <= 0) break;
    t = await deps.client.task(t.id, Math.min(left, 55));
  }
  return t;
}

function waitSeconds(v: unknown): number {
  return typeof v === "number" && Number.isFinite(v) && v > 0 ? Math.min(Math.floor(v), MAX_WAIT_SECONDS) : 0;
}

function errorResult(deps: Deps, what: string, e: unknown): ToolResult {
  const message = e instanceof TunnelError ? `${e.code}: ${e.message}` : (e as Error)?.message ?? String(e);
  deps.logger.warn(`tunnel: ${what} failed: ${message}`);
  return result({ error: message });
}

export function callTool(deps: Deps, agent: Agent): ToolDefinition {
  const name = TOOL_NAMES[agent];
  const label = AGENT_LABELS[agent];
  return {
    name,
    label: `${label} (tunnel)`,
    description:
      `Run a coding task with ${label} on a tunnel runner machine. Returns task_id and, when the task has ` +
      `run, session_id and the answer text. Pass session_id from an earlier call to continue that ${label} ` +
      `session, or conversation to continue that conversation's session. Set wait_seconds to wait for the ` +
      `answer; otherwise check later with ${STATE_TOOL} and task_id.`,
    parameters: {
      type: "object",
      additionalProperties: false,
      required: ["prompt"],
      properties: {
        prompt: { type: "string", description: `What ${label} should do.` },
        session_id: { type: "string", description: `A ${label} session id from an earlier call, to continue it.` },
        new_session: { type: "boolean", description: "Start a fresh session (ignores the conversation's session)." },
        conversation: { type: "string", description: "A tunnel conversation id whose session to continue." },
        project: { type: "string", description: "A project a runner declared (default: the plugin's defaultProject)." },
        wait_seconds: {
          type: "number",
          description: `Wait up to this many seconds for the answer (0 = return at once; at most ${MAX_WAIT_SECONDS}).`,
        },
      },
    },
    async execute(_id, raw, signal) {
      try {
        const p = (raw ?? {}) as Record<string, unknown>;
        const prompt = typeof p.prompt === "string" ? p.prompt.trim() : "";
        if (!prompt) return result({ error: "prompt is required" });
        const body: SubmitTask = { agent, prompt, session: "continue" };
        if (typeof p.session_id === "string" && p.session_id.trim()) {
          const sid = p.session_id.trim();
          if (!SESSION_ID_RE.test(sid)) return result({ error: `${sid} is not a session id` });
          body.session = { resume: sid };
        } else if (p.new_session === true) {
          body.session = "new";
        }
        if (typeof p.conversation === "string" && p.conversation.trim()) body.conversation = p.conversation.trim();
        const project = typeof p.project === "string" && p.project.trim() ? p.project.trim() : deps.config.defaultProject;
        if (project) body.project = project;
        if (deps.config.timeoutMs) body.timeout_ms = deps.config.timeoutMs;
        const { task } = await deps.client.submit(body);
        deps.logger.info(`tunnel: ${name} submitted task ${task.id}`);
        const done = await waitFor(deps, task, waitSeconds(p.wait_seconds), signal);
        return result(taskSummary(done));
      } catch (e) {
        return errorResult(deps, name, e);
      }
    },
  };
}

export function stateTool(deps: Deps): ToolDefinition {
  return {
    name: STATE_TOOL,
    label: "Tunnel state",
    description:
      "With task_id: the state, session_id and answer of a tunnel task (optionally waiting up to wait_seconds " +
      "for it to end). Without: whether the tunnel server is reachable and which runners and agents are online.",
    parameters: {
      type: "object",
      additionalProperties: false,
      properties: {
        task_id: { type: "string", description: "A task id returned by cc_call, codex_call or gemini_call." },
        wait_seconds: { type: "number", description: `Wait up to this many seconds (at most ${MAX_WAIT_SECONDS}).` },
      },
    },
    async execute(_id, raw, signal) {
      try {
        const p = (raw ?? {}) as Record<string, unknown>;
        if (typeof p.task_id === "string" && p.task_id.trim()) {
          const task = await deps.client.task(p.task_id.trim());
          return result(taskSummary(await waitFor(deps, task, waitSeconds(p.wait_seconds), signal)));
        }
        const report = await stateReport(deps, undefined, true);
        return { content: [{ type: "text", text: report }], details: { report } };
      } catch (e) {
        return errorResult(deps, STATE_TOOL, e);
      }
    },
  };
}
