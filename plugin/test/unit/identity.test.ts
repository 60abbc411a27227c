import { test } from "node:test";
import assert from "node:assert/strict";

import { identify } from "../../src/identity.ts";
import type { Identity } from "../../src/identity.ts";
import type { CommandContext } from "../../src/types.ts";
import {
  DISCORD_SLASH,
  DISCORD_SLASH_DM,
  DISCORD_TEXT,
  DISCORD_THREAD,
  TELEGRAM_DM,
  TELEGRAM_GROUP,
  TELEGRAM_NATIVE_DM,
  TELEGRAM_TOPIC,
} from "../support/fake-api.ts";

function id(ctx: CommandContext): Identity {
  const r = identify(ctx);
  if ("error" in r) throw new Error(r.error);
  return r;
}

test("Telegram DM: the chat id, sent back to the same chat", () => {
  const r = id(TELEGRAM_DM);
  assert.equal(r.conversation, "telegram:111");
  assert.deepEqual(r.target, { channel: "telegram", to: "111", accountId: "default" });
  assert.deepEqual(r.replyTo, { platform: "telegram", channel: "111" });
});

test("Telegram native command (to = slash:<id>) gives the same conversation as the text command", () => {
  assert.equal(id(TELEGRAM_NATIVE_DM).conversation, id(TELEGRAM_DM).conversation);
  assert.ok(!id(TELEGRAM_NATIVE_DM).target.to.includes("slash"));
});

test("Telegram forum topic: chat plus topic, and the topic goes to the adapter as threadId", () => {
  const r = id(TELEGRAM_TOPIC);
  assert.equal(r.conversation, "telegram:-100555:topic:42");
  assert.deepEqual(r.target, { channel: "telegram", to: "-100555", accountId: "default", threadId: 42 });
  assert.deepEqual(r.replyTo, { platform: "telegram", channel: "-100555", thread: "42" });
});

test("Telegram topics of one group are different conversations; the group itself is a third", () => {
  const other = id({ ...TELEGRAM_TOPIC, from: "telegram:group:-100555:topic:43", messageThreadId: 43 });
  const plain = id({ ...TELEGRAM_TOPIC, from: "telegram:group:-100555", messageThreadId: undefined });
  assert.equal(other.conversation, "telegram:-100555:topic:43");
  assert.equal(plain.conversation, "telegram:-100555");
  assert.equal(id(TELEGRAM_GROUP).conversation, "telegram:-100777");
});

test("Telegram topic known only from messageThreadId still counts", () => {
  const r = id({ ...TELEGRAM_TOPIC, from: "telegram:group:-100555" });
  assert.equal(r.conversation, "telegram:-100555:topic:42");
});

test("a non-default account is part of the conversation", () => {
  const r = id({ ...TELEGRAM_DM, accountId: "work" });
  assert.equal(r.conversation, "telegram@work:111");
  assert.equal(r.target.accountId, "work");
});

test("Discord text command in a channel", () => {
  const r = id(DISCORD_TEXT);
  assert.equal(r.conversation, "discord:channel:800000000000000001");
  assert.deepEqual(r.target, { channel: "discord", to: "channel:800000000000000001", accountId: "default" });
  assert.deepEqual(r.replyTo, { platform: "discord", channel: "800000000000000001" });
});

test("Discord slash command: never the slash:<userId> of ctx.to (the original's bug)", () => {
  const r = id(DISCORD_SLASH);
  assert.equal(r.conversation, id(DISCORD_TEXT).conversation);
  assert.equal(r.target.to, "channel:800000000000000001");
  assert.ok(!JSON.stringify(r).includes("slash:"));
});

test("Discord slash command with only channelId and to=slash still finds the channel via from", () => {
  const r = id({ ...DISCORD_SLASH, from: "discord:channel:800000000000000001" });
  assert.equal(r.conversation, "discord:channel:800000000000000001");
});

test("Discord thread: the thread is its own conversation", () => {
  const r = id(DISCORD_THREAD);
  assert.equal(r.conversation, "discord:channel:810000000000000002");
  assert.equal(r.target.to, "channel:810000000000000002");
});

test("Discord DM slash command: per-user conversation, DM channel for the server", () => {
  const r = id(DISCORD_SLASH_DM);
  assert.equal(r.conversation, "discord:dm:900000000000000001");
  assert.equal(r.target.to, "user:900000000000000001");
  assert.deepEqual(r.replyTo, { platform: "discord", channel: "700000000000000009" });
});

test("Discord DM text command: no DM channel id, so server delivery says why it cannot", () => {
  const r = id({ ...DISCORD_SLASH_DM, channelId: "discord", to: "user:900000000000000001" });
  assert.equal(r.conversation, "discord:dm:900000000000000001");
  assert.equal(typeof r.replyTo, "string");
});

test("other channels use to/from and cannot use server delivery", () => {
  const r = id({
    channel: "slack",
    isAuthorizedSender: true,
    from: "slack:channel:C123",
    to: "channel:C123",
    messageThreadId: "1700000000.000100",
    commandBody: "",
    config: {},
  });
  assert.equal(r.conversation, "slack:channel:C123:thread:1700000000.000100");
  assert.deepEqual(r.target, { channel: "slack", to: "channel:C123", threadId: "1700000000.000100" });
  assert.equal(typeof r.replyTo, "string");
});

test("a context that names no conversation is an error, not a guess", () => {
  const r = identify({ channel: "telegram", isAuthorizedSender: true, commandBody: "", config: {}, to: "slash:abc" });
  assert.ok("error" in r);
});
