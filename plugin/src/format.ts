// Chat texts: acknowledgements, answers, and splitting long text for a platform's limit.

import type { Task } from "./client.ts";

export function shortId(id: string): string {
  return id.slice(0, 8);
}

export function excerpt(text: string, max = 60): string {
  const one = text.replace(/\s+/g, " ").trim();
  return one.length > max ? `${one.slice(0, max - 1)}…` : one;
}

export function duration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${m % 60}m`;
}

export function ago(ms: number, now: number = Date.now()): string {
  return `${duration(now - ms)} ago`;
}

/** Where a queued task stands: "next in line" or "N ahead". */
export function position(task: Task): string {
  const n = task.queue_position ?? 0;
  return n === 0 ? "next in line" : `${n} ahead of it`;
}

/** The message sent when a task ends. */
export function finalMessage(label: string, task: Task): string {
  const r = task.result ?? {};
  const took =
    r.duration_ms !== undefined
      ? duration(r.duration_ms)
      : task.started_at && task.finished_at
        ? duration(task.finished_at - task.started_at)
        : undefined;
  const meta = [took, r.session_id ? `session \`${r.session_id}\`` : undefined].filter(Boolean).join(" · ");
  const tail = meta ? ` · ${meta}` : "";
  switch (task.state) {
    case "succeeded": {
      const text = r.text?.trim() ? r.text.trim() : "(no text in the answer)";
      return `✅ ${label}${tail}\n\n${text}`;
    }
    case "cancelled": {
      // One line: the reason is shown only for what it adds to "cancelled".
      const extra = (task.reason ?? "").trim().replace(/^cancell?ed[;,:\s]*/i, "");
      const after = took ? ` after ${took}` : "";
      return `🛑 ${label} task \`${shortId(task.id)}\` cancelled${after}${extra ? ` (${extra})` : ""}.`;
    }
    case "timed_out":
      return `⏱️ ${label} timed out${tail}.${detail(task)}`;
    case "lost":
      return `⚠️ ${label} task \`${shortId(task.id)}\` was lost: its runner stopped answering${task.reason ? ` (${task.reason})` : ""}.`;
    default:
      return `❌ ${label} failed${tail}.${detail(task)}`;
  }
}

function detail(task: Task): string {
  const r = task.result ?? {};
  const parts: string[] = [];
  if (r.error) parts.push(r.error.trim());
  if (r.text?.trim()) parts.push(r.text.trim());
  if (r.stderr_tail?.trim()) parts.push(`stderr:\n\`\`\`\n${r.stderr_tail.trim().slice(-1500)}\n\`\`\``);
  if (!parts.length && task.reason) parts.push(task.reason);
  return parts.length ? `\n\n${parts.join("\n\n")}` : "";
}

/**
 * Splits text into chunks of at most `limit` characters, preferring paragraph, then line,
 * then word boundaries. A chunk that ends inside a ``` fence closes it and the next reopens it.
 */
export function chunkText(text: string, limit: number): string[] {
  const max = Math.max(200, limit);
  const out: string[] = [];
  let rest = text;
  let reopen = "";
  while (rest.length > 0) {
    const room = max - reopen.length - 4; // leave room for a closing fence
    let piece: string;
    if (reopen.length + rest.length <= max) {
      piece = rest;
      rest = "";
    } else {
      let cut = rest.lastIndexOf("\n\n", room);
      if (cut < room / 2) cut = rest.lastIndexOf("\n", room);
      if (cut < room / 2) cut = rest.lastIndexOf(" ", room);
      if (cut < room / 2) cut = room;
      piece = rest.slice(0, cut);
      rest = rest.slice(cut).replace(/^\s+/, "");
    }
    let chunk = reopen + piece;
    const fences = (chunk.match(/^```/gm) ?? []).length;
    reopen = "";
    if (fences % 2 === 1 && rest.length > 0) {
      const lang = /^```(\S*)/m.exec(chunk.slice(chunk.lastIndexOf("```")))?.[1] ?? "";
      chunk += "\n```";
      reopen = "```" + lang + "\n";
    }
    out.push(chunk);
  }
  return out;
}
