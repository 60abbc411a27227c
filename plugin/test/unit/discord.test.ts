// The Discord controls (discord.ts) against the Discord stand-in over real HTTP: the edit and
// "typing…" requests on the wire, a DM's channel, 429 → RateLimited, errors without the token.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import { RateLimited } from "../../src/controls.ts";
import { discordApiBase, discordControls } from "../../src/discord.ts";
import { BOT_USER, FakeDiscord } from "../e2e/fake-discord.ts";

const TOKEN = "MTQwMDAwMDAwMDAwMDAwMDAwMQ.GfAkEe.unit-token_XYZ";
let dc: FakeDiscord;

before(async () => {
  dc = new FakeDiscord(TOKEN);
  await dc.start();
});
after(() => dc.stop());

function controls(token: string | null = TOKEN) {
  return discordControls(() => (token ? { token } : undefined), () => ({}), fetch, { DISCORD_API_URL: `${dc.apiUrl}/` });
}

/** A message the bot posted in a channel (through the stand-in's REST, as OpenClaw's adapter does). */
async function post(channelId: string, content: string): Promise<string> {
  const res = await fetch(`${dc.apiUrl}/channels/${channelId}/messages`, {
    method: "POST",
    headers: { authorization: `Bot ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify({ content }),
  });
  assert.equal(res.status, 200);
  return ((await res.json()) as { id: string }).id;
}

test("DISCORD_API_URL moves the REST base, as it does for OpenClaw's Discord channel", () => {
  assert.equal(discordApiBase({}), "https://discord.com/api/v10");
  assert.equal(discordApiBase({ DISCORD_API_URL: "http://127.0.0.1:9/api/v10/" }), "http://127.0.0.1:9/api/v10");
});

test("edit in a DM: the DM channel once, then PATCH with the bot token, no pings, cut to 2000 characters", async () => {
  const user = "1400000000000000201";
  const chan = dc.dmChannel(user).id;
  const id = await post(chan, "⏳ claude · working… 0s");
  const c = controls();
  assert.equal(c.usable?.({ channel: "discord", to: `user:${user}` }), true);
  await c.edit({ channel: "discord", to: `user:${user}` }, id, "⏳ claude · working… 3s\n› Bash: cargo test");
  assert.equal(dc.messages.get(id)!.content, "⏳ claude · working… 3s\n› Bash: cargo test");
  await c.edit({ channel: "discord", to: `user:${user}` }, id, "x".repeat(2500));
  assert.equal([...dc.messages.get(id)!.content].length, 2000);
  assert.ok(dc.messages.get(id)!.content.endsWith("…"));
  assert.equal(dc.callsOf("POST", /^\/users\/@me\/channels$/).length, 1, "the DM channel is looked up once");
  const patch = dc.callsOf("PATCH", new RegExp(`^/channels/${chan}/messages/${id}$`))[0];
  assert.deepEqual(patch.body, { content: "⏳ claude · working… 3s\n› Bash: cargo test", allowed_mentions: { parse: [] } });
  assert.equal(patch.status, 200);
});

test("typing in a channel is POST /channels/{id}/typing (204); it lasts 10 s", async () => {
  const chan = dc.dmChannel("1400000000000000202").id;
  const c = controls();
  await c.typing!({ channel: "discord", to: `channel:${chan}` });
  assert.equal(dc.callsOf("POST", new RegExp(`^/channels/${chan}/typing$`))[0].status, 204);
  assert.equal(c.typingLastsMs, 10_000);
  assert.equal(c.maxLength, 2000);
});

test("a 429 becomes RateLimited with Discord's retry_after", async () => {
  const chan = dc.dmChannel("1400000000000000203").id;
  const id = await post(chan, "⏳ claude · working… 0s");
  dc.rateLimitOnce(/^PATCH /, 1.25);
  await assert.rejects(
    controls().edit({ channel: "discord", to: `channel:${chan}` }, id, "⏳ claude · working… 3s"),
    (e: unknown) => e instanceof RateLimited && e.retryAfterMs === 1250,
  );
  assert.equal(dc.messages.get(id)!.content, "⏳ claude · working… 0s", "nothing changed");
});

test("errors name Discord's code and never the token; without a token nothing is sent", async () => {
  const chan = dc.dmChannel("1400000000000000204").id;
  const err = await controls()
    .edit({ channel: "discord", to: `channel:${chan}` }, "1400000000000000999", "x")
    .then(() => undefined, (e: Error) => e);
  assert.ok(err);
  assert.match(err.message, /^Discord PATCH \/channels\/…\/messages\/…: 404 Unknown Message \(10008\)$/);
  const bad = await discordControls(() => ({ token: "wrong-token" }), () => ({}), fetch, { DISCORD_API_URL: dc.apiUrl })
    .typing!({ channel: "discord", to: `channel:${chan}` })
    .then(() => undefined, (e: Error) => e);
  assert.match(bad!.message, /401 401: Unauthorized/);
  assert.ok(!bad!.message.includes("wrong-token"));
  const before = dc.calls.length;
  const none = controls(null);
  assert.equal(none.usable?.({ channel: "discord", to: `channel:${chan}` }), false);
  await assert.rejects(none.edit({ channel: "discord", to: `channel:${chan}` }, "1", "x"), /no Discord bot token/);
  assert.equal(dc.calls.length, before);
  assert.ok(BOT_USER.bot);
});
