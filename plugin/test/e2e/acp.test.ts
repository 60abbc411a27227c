// Issue #16, end to end with real parts and no model: OpenClaw's own ACP path. The real
// `openclaw` gateway (Telegram channel pointed at the Bot API stand-in) runs `/acp spawn` through
// its acpx runtime plugin, configured to launch `tunnel acp` as an ACP agent; `tunnel acp` turns
// the prompt into a task on a real `tunnel serve`; a real `tunnel runner` drives the runner
// tests' ACP fixture agent; its answer comes back the whole way to the stand-in's sendMessage.
// This plugin (tunnel's OpenClaw plugin) is not loaded here: nothing but OpenClaw and acpx is
// between the chat and `tunnel acp`.
//
// Needs OPENCLAW_ACP_BIN, ACPX_PLUGIN_DIR (the acpx runtime plugin; test.sh installs both) and
// TUNNEL_BIN.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";

import { FakeTelegram, visibleText } from "./fake-telegram.ts";
import { PLUGIN_DIR, TunnelServer, tunnelBin } from "../support/server.ts";

const OPENCLAW_ACP_BIN = process.env.OPENCLAW_ACP_BIN;
const BOT_TOKEN = "123456789:FAKE-tunnel-acp-e2e-token";
const USER = 111;
const FIXTURES = path.resolve(PLUGIN_DIR, "../crates/tunnel-runner/tests/fixtures");

let work: string;
let server: TunnelServer;
let tg: FakeTelegram;
let runner: ChildProcess | undefined;
let gateway: ChildProcess | undefined;

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

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
    OPENCLAW_NO_AUTO_UPDATE: "1",
    NO_COLOR: "1",
  };
  delete env.TUNNEL_URL;
  delete env.TUNNEL_TOKEN;
  delete env.WORKER_TOKEN;
  delete env.WORKER_URL;
  const log = openSync(path.join(work, "gateway.out"), "w");
  gateway = spawn(OPENCLAW_ACP_BIN!, ["gateway", "run", "--verbose"], { env, stdio: ["ignore", log, log] });
  await until("the gateway to poll Telegram", () => tg.callsOf("getUpdates").length > 0, 180_000);
});

after(async () => {
  await stop(gateway);
  await stop(runner);
  await tg?.stop();
  await server?.stop();
  if (work && !process.env.KEEP_E2E) rmSync(work, { recursive: true, force: true });
});

test("/acp spawn in Telegram reaches an agent on a remote tunnel runner, and its answer comes back to the chat", async (t) => {
  tg.inject({ text: "/acp spawn tunnel --bind here", userId: USER });
  const spawned = await until("the spawn reply", () => sentTo(USER).find((x) => /tunnel/i.test(x)), 300_000);
  t.diagnostic(`spawn reply: ${spawned}`);

  const nonce = randomBytes(6).toString("hex");
  const sentAt = Date.now();
  tg.inject({ text: `hello from telegram ${nonce}`, userId: USER });
  const answer = await until("the agent's answer at sendMessage", () => sentTo(USER).find((x) => x.includes(nonce)), 180_000);
  t.diagnostic(`answer ${Date.now() - sentAt} ms after the message: ${answer}`);
  assert.match(answer, new RegExp(`echo: hello from telegram ${nonce}`));
});
