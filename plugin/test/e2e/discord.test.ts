// End to end on Discord, in the real `openclaw` with its real Discord channel plugin
// (`@openclaw/discord`, installed with `openclaw plugins install` from npm, as a user does:
// OpenClaw refuses to run it from a local path), otherwise offline: the channel's REST calls and its Gateway WebSocket go to a Discord stand-in
// (fake-discord.ts) through `DISCORD_API_URL`. A user sends `/cc …` in a DM (a Gateway
// MESSAGE_CREATE), the plugin submits to a real `tunnel serve`, the test plays the runner, and
// the live progress message is created, edited with each step, shows "typing…", ends in the
// outcome, and then the answer follows; nothing after it.
//
// Needs OPENCLAW_BIN (test.sh installs openclaw), TUNNEL_BIN, and the npm registry or a warm
// npm cache for @openclaw/discord (test.sh sets npm_config_cache; the install prefers the cache).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { BOT_USER, FakeDiscord } from "./fake-discord.ts";
import { PLUGIN_DIR, TestRunner, TunnelServer, freePort } from "../support/server.ts";

const OPENCLAW_BIN = process.env.OPENCLAW_BIN;
const OPENCLAW_VERSION = process.env.OPENCLAW_VERSION ?? "2026.9.6";
const BOT_TOKEN = "MTQwMDAwMDAwMDAwMDAwMDAwMQ.GfAkEe.discord-e2e-token_XYZ";
const USER = "1400000000000000111";

let work: string;
let env: NodeJS.ProcessEnv;
let server: TunnelServer;
let runner: TestRunner;
let dc: FakeDiscord;
let gateway: ChildProcess | undefined;

function run(args: string[], timeoutMs: number): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(OPENCLAW_BIN!, args, { env, timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`openclaw ${args.join(" ")} failed: ${err.message}\n${stdout}\n${stderr}`));
      else resolve({ stdout, stderr });
    });
  });
}

function gatewayLog(): string {
  try {
    return readFileSync(path.join(work, "gateway.out"), "utf8");
  } catch {
    return "";
  }
}

async function until<T>(what: string, fn: () => T | undefined | false, ms: number): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) {
      const calls = dc.calls.map((c) => `${c.method} ${c.path} ${c.status}`).join("\n");
      throw new Error(`timed out after ${ms} ms waiting for ${what}\n--- gateway log tail ---\n${gatewayLog().slice(-4000)}\n--- Discord calls ---\n${calls}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The DM channel the bot and the user share. */
function dm(): string {
  return dc.dmChannel(USER).id;
}

/** What the bot posted in the DM, in order, as the user reads it now. */
function posted(): string[] {
  return dc.botMessages(dm()).map((m) => m.content);
}

before(async () => {
  assert.ok(OPENCLAW_BIN, "OPENCLAW_BIN is not set: run the tests with ./test.sh, which installs openclaw");
  work = mkdtempSync(path.join(process.env.TMPDIR ?? tmpdir(), "tunnel-plugin-e2e-discord-"));
  for (const d of ["home", "state", "tmp"]) mkdirSync(path.join(work, d), { recursive: true });
  dc = new FakeDiscord(BOT_TOKEN);
  await dc.start();
  server = await TunnelServer.start({});
  const clientToken = await server.token("client", "openclaw-plugin");
  runner = new TestRunner(server, await server.token("runner"), "e2e-runner", ["claude", "codex", "gemini"]);
  const configPath = path.join(work, "state", "openclaw.json");
  writeFileSync(
    configPath,
    JSON.stringify(
      {
        gateway: { mode: "local", port: await freePort(), bind: "loopback", auth: { mode: "token", token: "e2e-gateway-token" } },
        logging: { file: path.join(work, "openclaw.log") },
        update: { checkOnStart: false },
        models: { catalogRefresh: { enabled: false } },
      },
      null,
      2,
    ),
  );
  env = {
    ...process.env,
    HOME: path.join(work, "home"),
    OPENCLAW_HOME: path.join(work, "home"),
    OPENCLAW_STATE_DIR: path.join(work, "state"),
    OPENCLAW_CONFIG_PATH: configPath,
    TMPDIR: path.join(work, "tmp"),
    OPENCLAW_NO_AUTO_UPDATE: "1",
    NO_COLOR: "1",
    DISCORD_API_URL: dc.apiUrl,
    // After the first run the package comes from the npm cache (test.sh sets npm_config_cache).
    npm_config_prefer_offline: "true",
  };
  delete env.DISCORD_BOT_TOKEN;
  // The Discord channel is an external plugin since 2026.5; only the official npm package runs
  // with the trust it needs (a local path is refused). The version matches OpenClaw's.
  await run(["plugins", "install", `@openclaw/discord@${OPENCLAW_VERSION}`, "--accept-capabilities"], 300_000);
  await run(["plugins", "install", "--link", PLUGIN_DIR, "--force", "--accept-capabilities"], 240_000);
  const cfg = JSON.parse(readFileSync(configPath, "utf8"));
  cfg.plugins.entries.tunnel.config = { serverUrl: server.url, token: clientToken };
  // The channel's settings only now: with them in place, any openclaw command would first
  // install the "missing" Discord plugin by itself.
  // Text commands only: registering ~100 native slash commands one by one takes minutes on a
  // loaded machine and is not what this test is about.
  cfg.channels = { discord: { enabled: true, token: BOT_TOKEN, dmPolicy: "allowlist", allowFrom: [USER], commands: { native: false } } };
  writeFileSync(configPath, JSON.stringify(cfg, null, 2));

  const log = openSync(path.join(work, "gateway.out"), "w");
  gateway = spawn(OPENCLAW_BIN!, ["gateway", "run", "--verbose"], { env, stdio: ["ignore", log, log] });
  // Ready when the Discord channel has a Gateway session and the plugin's service runs.
  await until("the Discord channel to connect to the Gateway", () => dc.connected, 400_000);
  await until("the tunnel delivery service", () => /tunnel: delivery service started/.test(gatewayLog()), 60_000);
});

after(async () => {
  const g = gateway;
  if (g && g.exitCode === null && g.signalCode === null) {
    const exited = new Promise((r) => g.once("exit", r));
    g.kill("SIGTERM");
    await Promise.race([exited, new Promise((r) => setTimeout(r, 20_000))]);
    if (g.exitCode === null && g.signalCode === null) g.kill("SIGKILL");
  }
  await dc?.stop();
  await server?.stop();
  if (work && !process.env.KEEP_E2E) rmSync(work, { recursive: true, force: true });
  else if (work) process.stderr.write(`kept ${work}\n`);
});

test("Discord DM, plugin delivery: one progress message, edited with each step, typing shown, ending in the outcome before the answer, nothing after", async (t) => {
  await runner.touch();
  dc.inject({ content: "/cc run the tests", userId: USER });
  // OpenClaw handles the message when it gets to it: on a loaded machine that can take minutes.
  let offer: Awaited<ReturnType<TestRunner["claim"]>>;
  for (const end = Date.now() + 300_000; !offer && Date.now() < end; ) offer = await runner.claim(20_000);
  assert.ok(offer, "the task reached the runner");
  assert.equal(offer.task.prompt, "run the tests");
  assert.equal(offer.task.conversation, `discord:dm:${USER}`);
  const ack = await until("the acknowledgement", () => posted().find((c) => c.includes("Queued for Claude")), 90_000);
  assert.match(ack, /^⏳ Queued for Claude — task `?[0-9a-f]{8}`?, next in line\./);
  await runner.ack(offer);
  const acked = Date.now();

  // The progress message: created once (POST), then edited in place (PATCH) with each step.
  const progress = await until("the progress message", () => dc.botMessages(dm()).find((m) => /^⏳ claude · /.test(dc.firstContent.get(m.id) ?? "")), 90_000);
  const shownAfter = Date.now() - acked;
  assert.match(progress.content, /^⏳ claude · working… \d+s$/);
  await runner.events(offer, [{ n: 1, kind: "tool_use", data: { name: "Bash", input: { command: "cargo test --workspace" } } }]);
  await until("the edit with the step", () => dc.messages.get(progress.id)!.content.includes("› Bash: cargo test --workspace"), 90_000);
  assert.match(dc.messages.get(progress.id)!.content, /^⏳ claude · working… \d+s\n› Bash: cargo test --workspace$/);

  // Discord says 429 to the next edit: the plugin waits retry_after before it edits again.
  dc.rateLimitOnce(new RegExp(`^PATCH /channels/${dm()}/messages/${progress.id}$`), 1.5);
  await runner.events(offer, [{ n: 2, kind: "tool_use", data: { name: "Read", input: { file_path: "src/lib.rs" } } }]);
  await until("the second step", () => dc.messages.get(progress.id)!.content.includes("› Read: src/lib.rs"), 90_000);
  const patches = () => dc.callsOf("PATCH", new RegExp(`^/channels/${dm()}/messages/${progress.id}$`));
  const limited = patches().find((c) => c.status === 429);
  assert.ok(limited, "one edit was answered 429");
  const after429 = patches().find((c) => c.at > limited.at)!;
  assert.ok(after429.at - limited.at >= 1400, `the next edit waited retry_after (${after429.at - limited.at} ms)`);
  for (const c of patches()) assert.deepEqual(c.body.allowed_mentions, { parse: [] }, "an edit pings nobody");

  const typing = dc.callsOf("POST", new RegExp(`^/channels/${dm()}/typing$`));
  assert.ok(typing.length >= 1, "typing… is shown while it runs");
  const gaps = patches().slice(1).map((c, i) => c.at - patches()[i].at);
  t.diagnostic(`Discord live progress via OpenClaw: message shown ${shownAfter} ms after the runner's ack; gaps between edits ${gaps.join(", ")} ms; ${typing.length} typing calls`);

  await runner.finish(offer, "succeeded", { text: "all 212 tests pass", session_id: "e2e00000-0000-4000-8000-0000000000d1", duration_ms: 4000 });
  await until("the answer", () => posted().find((c) => c.endsWith("all 212 tests pass")), 90_000);
  assert.equal(dc.messages.get(progress.id)!.content, "✅ claude · done in 4s — the answer follows");

  // In order: the acknowledgement, the progress message (now the outcome), the answer; the
  // outcome edit came before the answer was created, and nothing reached the chat after it.
  await new Promise((r) => setTimeout(r, 4000));
  const shown = posted();
  assert.equal(shown.length, 3, `the acknowledgement, the progress message and the answer: ${JSON.stringify(shown)}`);
  assert.match(shown[0], /Queued for Claude/);
  assert.equal(shown[1], "✅ claude · done in 4s — the answer follows");
  assert.match(shown[2], /^✅ Claude · 4s · session `e2e00000-0000-4000-8000-0000000000d1`\n\nall 212 tests pass$/);
  const answerAt = dc.callsOf("POST", new RegExp(`^/channels/${dm()}/messages$`)).find((c) => String(c.body.content).includes("all 212 tests pass"))!.at;
  const lastEdit = patches().at(-1)!;
  assert.ok(lastEdit.at <= answerAt, "the outcome edit came before the answer");
  const late = dc.calls.filter((c) => c.at > answerAt && c.path.startsWith(`/channels/${dm()}`) && c.method !== "GET");
  assert.deepEqual(late.map((c) => `${c.method} ${c.path}`), [], "nothing about the task after the answer (no edit, no typing)");
  assert.equal(dc.callsOf("POST", new RegExp(`^/channels/${dm()}/messages$`)).filter((c) => String(c.body.content).startsWith("⏳ claude")).length, 1, "one progress message");
});

test("the Discord stand-in saw no route it does not know, and the bot's token was never logged", () => {
  assert.deepEqual(dc.unknown, []);
  assert.ok(dc.identifies.length >= 1);
  assert.equal(dc.identifies[0].token.replace(/^Bot /, ""), BOT_TOKEN);
  const logs = gatewayLog() + (() => {
    try {
      return readFileSync(path.join(work, "openclaw.log"), "utf8");
    } catch {
      return "";
    }
  })();
  assert.ok(!logs.includes(BOT_TOKEN), "the token is not in the gateway's logs");
  assert.ok(BOT_USER.bot);
});
