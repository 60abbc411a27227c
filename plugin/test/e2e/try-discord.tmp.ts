import { spawn } from "node:child_process";
import { openSync, readFileSync } from "node:fs";
import path from "node:path";
import { FakeDiscord } from "./fake-discord.ts";
const W = process.argv[2];
const dc = new FakeDiscord("MTQwMDAwMDAwMDAwMDAwMDAwMQ.GfAkEe.discord-e2e-token_XYZ");
await dc.start();
const env = { ...process.env, HOME: path.join(W, "home"), OPENCLAW_HOME: path.join(W, "home"), OPENCLAW_STATE_DIR: path.join(W, "state"), OPENCLAW_CONFIG_PATH: path.join(W, "state", "openclaw.json"), TMPDIR: path.join(W, "tmp"), OPENCLAW_NO_AUTO_UPDATE: "1", NO_COLOR: "1", DISCORD_API_URL: dc.apiUrl };
const log = openSync(path.join(W, "try.out"), "w");
const g = spawn(process.env.OPENCLAW_BIN!, ["gateway", "run", "--verbose"], { env, stdio: ["ignore", log, log] });
const t0 = Date.now();
let seen = 0;
while (Date.now() - t0 < Number(process.argv[3] ?? 200) * 1000) {
  await new Promise((r) => setTimeout(r, 1000));
  for (const c of dc.calls.slice(seen)) console.log(((c.at - t0) / 1000).toFixed(1), c.method, c.path, c.status, JSON.stringify(c.body ?? null).slice(0, 200));
  seen = dc.calls.length;
  if (dc.connected && !(globalThis as any).done) { console.log("CONNECTED", (Date.now() - t0) / 1000); (globalThis as any).done = 1; if (process.argv[4]) { dc.inject({ content: process.argv[4], userId: "1400000000000000111" }); } }
}
console.log("unknown", dc.unknown);
g.kill("SIGTERM");
await new Promise((r) => setTimeout(r, 3000));
await dc.stop();
process.exit(0);
