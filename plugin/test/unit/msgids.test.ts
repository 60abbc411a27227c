import { test } from "node:test";
import assert from "node:assert/strict";

import { MessageIds, normalizeCommandText } from "../../src/msgids.ts";

test("the bot mention and spacing do not matter", () => {
  assert.equal(normalizeCommandText("/cc@tunnel_bot   hello  world "), "/cc hello world");
});

test("an id is taken once, by the same channel, sender and text", () => {
  let now = 1000;
  const ids = new MessageIds(() => now);
  ids.remember({ channel: "telegram", senderId: "111", text: "/cc@bot hi" }, "501");
  assert.equal(ids.take({ channel: "telegram", senderId: "222", text: "/cc hi" }), undefined);
  assert.equal(ids.take({ channel: "discord", senderId: "111", text: "/cc hi" }), undefined);
  assert.equal(ids.take({ channel: "telegram", senderId: "111", text: "/cc hi" }), "501");
  assert.equal(ids.take({ channel: "telegram", senderId: "111", text: "/cc hi" }), undefined);
});

test("two identical messages get their own ids, oldest first; old ones expire", () => {
  let now = 0;
  const ids = new MessageIds(() => now);
  const k = { channel: "telegram", senderId: "1", text: "/cc again" };
  ids.remember(k, "a");
  ids.remember(k, "a"); // the same message reported twice
  ids.remember(k, "b");
  assert.equal(ids.take(k), "a");
  assert.equal(ids.take(k), "b");
  ids.remember(k, "c");
  now += 10 * 60_000;
  assert.equal(ids.take(k), undefined);
});

test("plain chat text (not a command) is not remembered", () => {
  const ids = new MessageIds();
  ids.remember({ channel: "telegram", senderId: "1", text: "hello" }, "9");
  assert.equal(ids.take({ channel: "telegram", senderId: "1", text: "hello" }), undefined);
});
