import { test } from "node:test";
import assert from "node:assert/strict";

import { chunkText, finalMessage } from "../../src/format.ts";
import type { Task } from "../../src/client.ts";

function task(p: Partial<Task>): Task {
  return {
    id: "0b7d1f5e-1111-4222-8333-444455556666",
    agent: "claude",
    prompt: "p",
    session: "continue",
    state: "succeeded",
    attempt: 1,
    created_at: 0,
    ...p,
  };
}

test("a success shows the answer, the time and the session id", () => {
  const m = finalMessage("Claude", task({ result: { text: "All tests pass.", session_id: "sess-1", duration_ms: 65_000 } }));
  assert.equal(m, "✅ Claude · 1m 5s · session `sess-1`\n\nAll tests pass.");
});

test("a failure shows the error and the stderr tail, not only stdout (the original's bug)", () => {
  const m = finalMessage("Codex", task({ state: "failed", result: { error: "exit code 2", stderr_tail: "boom" } }));
  assert.match(m, /^❌ Codex failed/);
  assert.match(m, /exit code 2/);
  assert.match(m, /stderr:\n```\nboom\n```/);
});

test("cancelled, lost and timed out read differently", () => {
  assert.match(finalMessage("Claude", task({ state: "cancelled" })), /^🛑 Claude task `0b7d1f5e` cancelled\.$/);
  assert.match(finalMessage("Claude", task({ state: "lost", reason: "lease expired" })), /lost: its runner stopped answering \(lease expired\)/);
  assert.match(finalMessage("Claude", task({ state: "timed_out" })), /^⏱️ Claude timed out/);
});

test("a cancel is one line that says it once (issue #18)", () => {
  // What the server records for a cancel: reason "cancelled", the runner's error, the signal.
  const t = task({
    state: "cancelled",
    reason: "cancelled",
    started_at: 1000,
    finished_at: 13_000,
    result: { error: "cancelled; the agent was stopped", exit_code: 143, stderr_tail: "Terminated" } as Task["result"],
  });
  assert.equal(finalMessage("Claude", t), "🛑 Claude task `0b7d1f5e` cancelled after 12s.");
  const gone = task({ state: "cancelled", reason: "cancelled; runner r1 stopped responding before confirming" });
  assert.equal(finalMessage("Claude", gone), "🛑 Claude task `0b7d1f5e` cancelled (runner r1 stopped responding before confirming).");
});

test("short text is one chunk", () => {
  assert.deepEqual(chunkText("hello", 2000), ["hello"]);
});

test("long text is split at the limit, on paragraph boundaries, losing nothing", () => {
  const paras = Array.from({ length: 30 }, (_, i) => `Paragraph ${i} ` + "word ".repeat(40).trim());
  const text = paras.join("\n\n");
  const chunks = chunkText(text, 1000);
  assert.ok(chunks.length > 1);
  for (const c of chunks) assert.ok(c.length <= 1000, `chunk of ${c.length}`);
  assert.equal(chunks.join("\n\n"), text);
  assert.ok(chunks[0].endsWith("word"));
});

test("a split inside a code fence closes and reopens it", () => {
  const code = Array.from({ length: 200 }, (_, i) => `let x${i} = ${i};`).join("\n");
  const text = "Here:\n```rust\n" + code + "\n```\nDone.";
  const chunks = chunkText(text, 1000);
  assert.ok(chunks.length >= 3);
  for (const c of chunks) {
    assert.ok(c.length <= 1000);
    assert.equal((c.match(/^```/gm) ?? []).length % 2, 0, `unbalanced fences in:\n${c}`);
  }
  assert.ok(chunks[1].startsWith("```rust\n"));
  // Every line of the code survives.
  for (let i = 0; i < 200; i++) assert.ok(chunks.some((c) => c.includes(`let x${i} = ${i};`)));
});

test("a single word longer than the limit is cut hard", () => {
  const chunks = chunkText("x".repeat(2500), 1000);
  assert.equal(chunks.join(""), "x".repeat(2500));
  for (const c of chunks) assert.ok(c.length <= 1000);
});
