// Issue #16, end to end with real parts and no model: OpenClaw's own ACP path. The real
// `openclaw` gateway (Telegram channel pointed at the Bot API stand-in) runs `/acp spawn` through
// its acpx runtime plugin, configured to launch `tunnel acp` as an ACP agent; `tunnel acp` turns
// the prompt into a task on a real `tunnel serve`; a real `tunnel runner` drives the runner
// tests' ACP fixture agent; its answer comes back the whole way to the stand-in's sendMessage.
// This plugin (tunnel's OpenClaw plugin) is not loaded here: nothing but OpenClaw and acpx is
// between the chat and `tunnel acp`.
//
// Needs OPENCLAW_ACP_BIN (openclaw.mjs of an openclaw that bundles acpx: 2026.4.29, see test.sh),
// OPENCLAW_ACP_NODE (the Node 24 to run it with, npm beside it), OPENCLAW_PLUGIN_STAGE_DIR (where
// OpenClaw installs its bundled plugins' dependencies, kept between runs) and TUNNEL_BIN.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { FakeTelegram, visibleText } from "./fake-telegram.ts";
import { PLUGIN_DIR, TunnelServer, freePort, tunnelBin } from "../support/server.ts";

const OPENCLAW_ACP_BIN = process.env.OPENCLAW_ACP_BIN;
const OPENCLAW_ACP_NODE = process.env.OPENCLAW_ACP_NODE ?? process.execPath;
const BOT_TOKEN = "123456789:FAKE-tunnel-acp-e2e-token";
const USER = 111;
const FIXTURES = path.resolve(PLUGIN_DIR, "../crates/tunnel-runner/tests/fixtures");

let work: string;
let server: TunnelServer;
let tg: FakeTelegram;
let runner: ChildProcess | undefined;
let gateway: ChildProcess | undefined;
let gatewayStartMs = 0;

function readOr(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch {
    return "";
  }
}

function logs(): string {
  const calls = tg?.calls;
  return [
    `--- Bot API calls ---\n${(calls ?? []).slice(-15).map((c) => `${c.method} ${JSON.stringify(c.params).slice(0, 200)}`).join("\n")}`,
    `--- sent to Telegram ---\n${(tg?.sent ?? []).map((p) => JSON.stringify(visibleText(p.text, p.parse_mode))).join("\n")}`,
    `--- gateway log tail ---\n${readOr(path.join(work, "gateway.out")).slice(-6000)}`,
    `--- runner log tail ---\n${readOr(path.join(work, "runner", "runner.log")).slice(-3000)}`,
    `--- agent log tail ---\n${readOr(path.join(work, "web", ".agent.log")).slice(-2000)}`,
  ].join("\n");
}

async function until<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, ms: number): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (gateway && gateway.exitCode !== null) throw new Error(`the gateway exited (${gateway.exitCode}) while waiting for ${what}\n${logs()}`);
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}\n${logs()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Messages the bot sent to a chat, as the user would read them. */
function sentTo(chatId: number): string[] {
  return tg.sent.filter((p) => Number(p.chat_id) === chatId).map((p) => visibleText(p.text, p.parse_mode));
}

async function stop(child: ChildProcess | undefined): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  await Promise.race([exited, new Promise((r) => setTimeout(r, 20_000))]);
  if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
}

before(async () => {
  assert.ok(OPENCLAW_ACP_BIN, "OPENCLAW_ACP_BIN is not set: run the tests with ./test.sh, which installs openclaw with acpx");
  work = mkdtempSync(path.join(process.env.TMPDIR ?? tmpdir(), "tunnel-acp-e2e-"));
  for (const d of ["home", "state", "tmp", "runner", "web"]) mkdirSync(path.join(work, d), { recursive: true });
  tg = new FakeTelegram(BOT_TOKEN);
  await tg.start();
  server = await TunnelServer.start();

  // A real runner on "another machine": project `web`, the runner tests' ACP fixture agent.
  const rdir = path.join(work, "runner");
  writeFileSync(
    path.join(rdir, "runner.toml"),
    [
      "[runner]",
      `name = "home"`,
      `spool_dir = ${JSON.stringify(path.join(rdir, "spool"))}`,
      `work_dir = ${JSON.stringify(path.join(rdir, "work"))}`,
      "[runner.projects]",
      `web = ${JSON.stringify(path.join(work, "web"))}`,
      "[runner.agents.tiny]",
      `kind = "acp"`,
      `program = "python3"`,
      `args = [${JSON.stringify(path.join(FIXTURES, "acp-agent.py"))}]`,
      `env = { ACP_AGENT_LOG = ${JSON.stringify(path.join(work, "web", ".agent.log"))} }`,
      "[runner.agents.claude]\nenabled = false",
      "[runner.agents.codex]\nenabled = false",
      "[runner.agents.gemini]\nenabled = false",
      "",
    ].join("\n"),
  );
  const runnerToken = await server.token("runner", "home");
  runner = spawn(tunnelBin(), ["runner", "--config", path.join(rdir, "runner.toml"), "--server", server.url, "--token", runnerToken], {
    env: { ...process.env, XDG_DATA_HOME: rdir, XDG_CONFIG_HOME: rdir, WORKER_TOKEN: "", WORKER_URL: "" },
    stdio: ["ignore", "ignore", openSync(path.join(rdir, "runner.log"), "w")],
  });
  await until("the runner to register", async () => {
    const r = await server.call("GET", "/v1/runners", server.adminToken);
    return r.body.runners?.some((x: any) => x.name === "home" && (x.acp_agents ?? []).includes("tiny"));
  }, 60_000);

  // The user's machine: OpenClaw, its acpx runtime plugin, and `tunnel acp` as the agent
  // "tunnel" (a client token in tunnel's own config file, as a user would keep it).
  const home = path.join(work, "home");
  mkdirSync(path.join(home, ".config", "tunnel"), { recursive: true });
  writeFileSync(
    path.join(home, ".config", "tunnel", "tunnel.toml"),
    `[client]\nserver = ${JSON.stringify(server.url)}\ntoken = ${JSON.stringify(await server.token("client", "openclaw-acp"))}\n`,
  );
  const config = {
    gateway: { mode: "local", port: await freePort(), bind: "loopback", auth: { mode: "token", token: "acp-e2e-gateway-token" } },
    logging: { file: path.join(work, "openclaw.log") },
    update: { checkOnStart: false },
    // `/acp` is an owner command.
    commands: { ownerAllowFrom: [`telegram:${USER}`] },
    channels: {
      telegram: { enabled: true, botToken: BOT_TOKEN, apiRoot: tg.apiRoot, dmPolicy: "allowlist", allowFrom: [String(USER)] },
    },
    // The config the README gives: ACP on, through acpx, with `tunnel acp` as an allowed agent.
    acp: { enabled: true, backend: "acpx", allowedAgents: ["tunnel"] },
    plugins: {
      // Only what this path needs (OpenClaw installs each bundled plugin's dependencies on start).
      allow: ["acpx", "telegram"],
      entries: {
        acpx: {
          enabled: true,
          config: { agents: { tunnel: { command: `${tunnelBin()} acp --agent tiny --project web` } } },
        },
      },
    },
  };
  writeFileSync(path.join(work, "state", "openclaw.json"), JSON.stringify(config, null, 2));
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    HOME: home,
    XDG_CONFIG_HOME: path.join(home, ".config"),
    OPENCLAW_HOME: home,
    OPENCLAW_STATE_DIR: path.join(work, "state"),
    OPENCLAW_CONFIG_PATH: path.join(work, "state", "openclaw.json"),
    TMPDIR: path.join(work, "tmp"),
    // Kept between runs (OpenClaw would put it in TMPDIR): loading it is most of this test's time.
    NODE_COMPILE_CACHE: path.join(process.env.TMPDIR ?? tmpdir(), "openclaw-acp-compile-cache"),
    OPENCLAW_NO_AUTO_UPDATE: "1",
    NO_COLOR: "1",
  };
  delete env.TUNNEL_URL;
  delete env.TUNNEL_TOKEN;
  delete env.WORKER_TOKEN;
  delete env.WORKER_URL;
  const log = openSync(path.join(work, "gateway.out"), "w");
  const started = Date.now();
  gateway = spawn(OPENCLAW_ACP_NODE, [OPENCLAW_ACP_BIN!, "gateway", "run", "--verbose"], { env, stdio: ["ignore", log, log] });
  await until("the gateway to poll Telegram", () => tg.callsOf("getUpdates").length > 0, 300_000);
  gatewayStartMs = Date.now() - started;
});

after(async () => {
  await stop(gateway);
  await stop(runner);
  await tg?.stop();
  await server?.stop();
  if (work && !process.env.KEEP_E2E) rmSync(work, { recursive: true, force: true });
});

/** The server's tasks whose prompt has `needle` (admin view: every owner's tasks). */
async function tasksWith(needle: string): Promise<any[]> {
  const r = await server.call("GET", "/v1/tasks?limit=100", server.adminToken);
  assert.equal(r.status, 200);
  return r.body.tasks.filter((t: any) => String(t.prompt).includes(needle));
}

test("/acp spawn in Telegram reaches an agent on a remote tunnel runner, and its answer comes back to the chat", async (t) => {
  t.diagnostic(`gateway start → polling Telegram: ${gatewayStartMs} ms`);
  let at = Date.now();
  tg.inject({ text: "/acp spawn tunnel --bind here", userId: USER });
  const spawned = await until("the spawn reply", () => sentTo(USER).find((x) => /Spawned ACP session/.test(x)), 300_000);
  t.diagnostic(`/acp spawn answered in ${Date.now() - at} ms: ${spawned}`);
  assert.match(spawned, /^✅ Spawned ACP session agent:tunnel:acp:[0-9a-f-]+ \(persistent, backend acpx\)\. Bound this conversation/);

  // The reply can come before the binding is stored (a loaded machine showed it): once
  // `/acp status` here names the session, a message here routes to it.
  const key = /agent:tunnel:acp:[0-9a-f-]+/.exec(spawned)![0];
  tg.inject({ text: "/acp status", userId: USER });
  const status = await until("the /acp status reply", () => sentTo(USER).find((x) => x !== spawned && x.includes(key)), 180_000);
  t.diagnostic(`/acp status: ${status.replace(/\n/g, " | ")}`);

  // A plain message in the bound chat is a prompt to `tunnel acp`, hence a task on the runner.
  const nonce = randomBytes(6).toString("hex");
  at = Date.now();
  tg.inject({ text: `hello from telegram ${nonce}`, userId: USER });
  const answer = await until("the agent's answer at sendMessage", () => sentTo(USER).find((x) => x.includes(nonce)), 180_000);
  t.diagnostic(`message → answer in Telegram: ${Date.now() - at} ms`);
  // The fixture agent's own reply ("echo: " + the prompt it received), and nothing else.
  assert.equal(answer, `echo: hello from telegram ${nonce}`);

  // It ran as a task on the remote runner, with the fixture agent, in the mapped project.
  const [task, ...others] = await tasksWith(nonce);
  assert.deepEqual(others, [], "one task for the message");
  assert.equal(task.prompt, `hello from telegram ${nonce}`);
  assert.equal(task.runner, "home");
  assert.equal(task.agent, "tiny");
  assert.equal(task.project, "web");
  assert.equal(task.state, "succeeded");
  assert.match(task.conversation, /^acp-/);
  const events = await server.call("GET", `/v1/tasks/${task.id}/events?format=json`, server.adminToken);
  const text = events.body.events.filter((e: any) => e.kind === "text").map((e: any) => e.data.text).join("");
  assert.equal(text, `echo: hello from telegram ${nonce}`, "the runner reported the agent's answer as the task's events");
  // The agent process on the runner got the prompt over ACP.
  const received = readOr(path.join(work, "web", ".agent.log")).split("\n").filter(Boolean).map((l) => JSON.parse(l));
  assert.ok(received.some((m) => m.method === "session/prompt" && JSON.stringify(m.params.prompt).includes(nonce)), "the agent received the prompt");

  // A follow-up in the same chat continues the same session: the same conversation on the server.
  const nonce2 = randomBytes(6).toString("hex");
  at = Date.now();
  tg.inject({ text: `and again ${nonce2}`, userId: USER });
  const second = await until("the second answer", () => sentTo(USER).find((x) => x.includes(nonce2)), 180_000);
  t.diagnostic(`follow-up → answer: ${Date.now() - at} ms`);
  assert.equal(second, `echo: and again ${nonce2}`);
  const [task2] = await tasksWith(nonce2);
  assert.equal(task2.conversation, task.conversation, "the follow-up is in the same conversation");
  assert.equal(task2.runner, "home");

  // `/acp status` showed acpx's session id: the server's conversation, made at session/new.
  // Nothing else was said in the chat.
  assert.match(status, new RegExp(`\\nagent: tunnel\\nacpx session id: ${task.conversation}\\n`));
  assert.deepEqual(sentTo(USER), [spawned, status, answer, second]);
  assert.deepEqual(tg.unknown, []);
});
