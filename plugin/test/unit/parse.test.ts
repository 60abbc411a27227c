import { test } from "node:test";
import assert from "node:assert/strict";

import { keyword, parseCommand } from "../../src/parse.ts";

test("a plain prompt is submitted as is", () => {
  assert.deepEqual(parseCommand(undefined, "fix the flaky test in api.rs"), {
    kind: "submit",
    prompt: "fix the flaky test in api.rs",
  });
});

test("empty args show help", () => {
  assert.deepEqual(parseCommand(undefined, undefined), { kind: "help" });
  assert.deepEqual(parseCommand(undefined, "   "), { kind: "help" });
});

test("keywords are whole words, not prefixes (the original's /cc newsletter bug)", () => {
  assert.deepEqual(parseCommand(undefined, "newsletter draft please"), { kind: "submit", prompt: "newsletter draft please" });
  assert.deepEqual(parseCommand(undefined, "recently changed files?"), { kind: "submit", prompt: "recently changed files?" });
  assert.deepEqual(parseCommand(undefined, "sessions are leaking"), { kind: "submit", prompt: "sessions are leaking" });
  assert.deepEqual(parseCommand(undefined, "resumes are parsed wrong"), { kind: "submit", prompt: "resumes are parsed wrong" });
});

test("Chinese keywords only count as whole words (the original's /cc 现在几点 bug)", () => {
  assert.deepEqual(parseCommand(undefined, "现在几点"), { kind: "submit", prompt: "现在几点" });
  assert.deepEqual(parseCommand(undefined, "最近的提交有什么问题"), { kind: "submit", prompt: "最近的提交有什么问题" });
  assert.deepEqual(parseCommand(undefined, "新会话帮我看看"), { kind: "submit", prompt: "新会话帮我看看" });
  assert.deepEqual(parseCommand(undefined, "现在"), { kind: "now" });
  assert.deepEqual(parseCommand(undefined, "当前"), { kind: "now" });
  assert.deepEqual(parseCommand(undefined, "最近"), { kind: "recent" });
  assert.deepEqual(parseCommand(undefined, "新会话"), { kind: "new" });
  assert.deepEqual(parseCommand(undefined, "新会话 重构登录模块"), { kind: "new", prompt: "重构登录模块" });
  assert.deepEqual(parseCommand(undefined, "接续 0a1b2c3d-1111 继续"), { kind: "resume", id: "0a1b2c3d-1111", prompt: "继续" });
  assert.deepEqual(parseCommand(undefined, "停止"), { kind: "stop", all: false });
  assert.deepEqual(parseCommand(undefined, "状态"), { kind: "status" });
});

test("English keywords as the first word", () => {
  assert.deepEqual(parseCommand(undefined, "new"), { kind: "new" });
  assert.deepEqual(parseCommand(undefined, "NEW write tests"), { kind: "new", prompt: "write tests" });
  assert.deepEqual(parseCommand(undefined, "-new write tests"), { kind: "new", prompt: "write tests" });
  assert.deepEqual(parseCommand(undefined, "recent"), { kind: "recent" });
  assert.deepEqual(parseCommand(undefined, "session"), { kind: "now" });
  assert.deepEqual(parseCommand(undefined, "now"), { kind: "now" });
  assert.deepEqual(parseCommand(undefined, "stop"), { kind: "stop", all: false });
  assert.deepEqual(parseCommand(undefined, "stop all"), { kind: "stop", all: true });
  assert.deepEqual(parseCommand(undefined, "status"), { kind: "status" });
  assert.deepEqual(parseCommand(undefined, "help"), { kind: "help" });
});

test("argument-less keywords followed by text are prompts", () => {
  assert.deepEqual(parseCommand(undefined, "status of the build?"), { kind: "submit", prompt: "status of the build?" });
  assert.deepEqual(parseCommand(undefined, "stop the server from crashing"), {
    kind: "submit",
    prompt: "stop the server from crashing",
  });
  assert.deepEqual(parseCommand(undefined, "now add a test"), { kind: "submit", prompt: "now add a test" });
});

test("keyword resume needs something that looks like a session id", () => {
  assert.deepEqual(parseCommand(undefined, "resume the work from yesterday"), {
    kind: "submit",
    prompt: "resume the work from yesterday",
  });
  assert.deepEqual(parseCommand(undefined, "resume 3f2a9c1e-aaaa-4bbb-8ccc-0123456789ab go on"), {
    kind: "resume",
    id: "3f2a9c1e-aaaa-4bbb-8ccc-0123456789ab",
    prompt: "go on",
  });
});

test("explicit sub-commands", () => {
  assert.deepEqual(parseCommand("new", undefined), { kind: "new" });
  assert.deepEqual(parseCommand("new", "letter to the team"), { kind: "new", prompt: "letter to the team" });
  assert.deepEqual(parseCommand("resume", "abc_123:x"), { kind: "resume", id: "abc_123:x" });
  assert.deepEqual(parseCommand("resume", "abc123 and then more"), { kind: "resume", id: "abc123", prompt: "and then more" });
  assert.equal(parseCommand("resume", undefined).kind, "usage");
  assert.equal(parseCommand("resume", "-rf /").kind, "usage");
  assert.deepEqual(parseCommand("recent", ""), { kind: "recent" });
  assert.equal(parseCommand("recent", "extra").kind, "usage");
  assert.deepEqual(parseCommand("stop", "ALL"), { kind: "stop", all: true });
  assert.equal(parseCommand("stop", "everything").kind, "usage");
  assert.deepEqual(parseCommand("status", undefined), { kind: "status" });
  assert.deepEqual(parseCommand("now", undefined), { kind: "now" });
});

test("keyword() normalises dashes and case and rejects non-keywords", () => {
  assert.equal(keyword("--Recent"), "recent");
  assert.equal(keyword("接续"), "resume");
  assert.equal(keyword("toString"), undefined);
  assert.equal(keyword("newer"), undefined);
});
