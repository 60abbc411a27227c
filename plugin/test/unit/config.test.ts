import { test } from "node:test";
import assert from "node:assert/strict";

import { readConfig } from "../../src/config.ts";

test("defaults: local server, plugin delivery, /cc /cx /gemini /cli-state", () => {
  const c = readConfig({}, {});
  assert.equal(c.serverUrl, "http://127.0.0.1:3456");
  assert.equal(c.token, undefined);
  assert.equal(c.delivery, "plugin");
  assert.equal(c.progress, true);
  assert.equal(c.requireAuth, true);
  assert.deepEqual(c.commands, { claude: "cc", codex: "cx", gemini: "gemini", state: "cli-state" });
});

test("config wins over the environment, which wins over defaults", () => {
  const env = { TUNNEL_URL: "http://env:1/", TUNNEL_TOKEN: "tnl_env" };
  assert.equal(readConfig({}, env).serverUrl, "http://env:1");
  assert.equal(readConfig({}, env).token, "tnl_env");
  const c = readConfig({ serverUrl: "https://cfg.example/", token: "tnl_cfg" }, env);
  assert.equal(c.serverUrl, "https://cfg.example");
  assert.equal(c.token, "tnl_cfg");
});

test("command names, delivery and the rest can be set; bad values fall back", () => {
  const c = readConfig(
    {
      delivery: "server",
      progress: false,
      defaultProject: "web",
      timeoutMs: 60000,
      requireAuth: false,
      commands: { claude: "claude", codex: "Bad Name", state: "tunnel" },
    },
    {},
  );
  assert.equal(c.delivery, "server");
  assert.equal(c.progress, false);
  assert.equal(c.defaultProject, "web");
  assert.equal(c.timeoutMs, 60000);
  assert.equal(c.requireAuth, false);
  assert.deepEqual(c.commands, { claude: "claude", codex: "cx", gemini: "gemini", state: "tunnel" });
  assert.equal(readConfig({ delivery: "carrier-pigeon", timeoutMs: 5 }, {}).delivery, "plugin");
  assert.equal(readConfig({ timeoutMs: 5 }, {}).timeoutMs, undefined);
});
