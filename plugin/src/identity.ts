// Which conversation a command came from, and where its answer goes.
//
// The original used `ctx.to`, which is `slash:<userId>` for native slash commands: every user's
// slash commands then landed in one per-user "conversation", and the answer went nowhere. Here
// the identity comes from `from` (and `to` only when it is a real target), plus the thread or
// topic, and never from a `slash:` value.

import type { CommandContext } from "./types.ts";
import type { ReplyTo } from "./client.ts";

/** Where the plugin's service sends later messages (OpenClaw outbound adapter arguments). */
export interface DeliveryTarget {
  channel: string;
  to: string;
  accountId?: string;
  threadId?: string | number;
}

export interface Identity {
  /** The tunnel conversation id: tasks of one conversation share the agent session. */
  conversation: string;
  target: DeliveryTarget;
  /** For server delivery; a string says why the server cannot deliver here. */
  replyTo: ReplyTo | string;
}

function strip(value: string | undefined, channel: string): string | undefined {
  if (!value) return undefined;
  const v = value.trim();
  if (!v) return undefined;
  return v.toLowerCase().startsWith(`${channel}:`) ? v.slice(channel.length + 1) : v;
}

function usable(to: string | undefined): string | undefined {
  return to && !to.startsWith("slash:") ? to : undefined;
}

function threadOf(ctx: CommandContext): string | undefined {
  const t = ctx.messageThreadId;
  if (t === undefined || t === null || t === "") return undefined;
  return String(t);
}

/** Derives the identity, or returns an error message when the context names no conversation. */
export function identify(ctx: CommandContext): Identity | { error: string } {
  const channel = (ctx.channel || "").toLowerCase();
  if (!channel) return { error: "OpenClaw did not say which channel this command came from." };
  const account = ctx.accountId && ctx.accountId !== "default" ? ctx.accountId : undefined;
  const prefix = account ? `${channel}@${account}` : channel;
  const accountId = ctx.accountId || undefined;
  if (channel === "telegram") return telegram(ctx, prefix, accountId);
  if (channel === "discord") return discord(ctx, prefix, accountId);
  return generic(ctx, channel, prefix, accountId);
}

function telegram(ctx: CommandContext, prefix: string, accountId?: string): Identity | { error: string } {
  const from = strip(ctx.from, "telegram");
  const to = strip(usable(ctx.to), "telegram");
  let chat: string | undefined;
  let thread: string | undefined;
  const group = from && /^group:(-?\d+)(?::topic:(\d+))?$/.exec(from);
  const target = to && /^(-?\d+|@\w+)(?::topic:(\d+))?$/.exec(to);
  if (group) {
    chat = group[1];
    thread = group[2];
  } else if (target) {
    chat = target[1];
    thread = target[2];
  } else if (from && /^-?\d+$/.test(from)) {
    chat = from;
  } else if (ctx.senderId && /^\d+$/.test(ctx.senderId)) {
    // A private chat's id is the user's id.
    chat = ctx.senderId;
  }
  if (!chat) return { error: "Could not tell which Telegram chat this command came from." };
  thread = thread ?? threadOf(ctx);
  const conversation = `${prefix}:${chat}${thread ? `:topic:${thread}` : ""}`;
  return {
    conversation,
    target: {
      channel: "telegram",
      to: chat,
      ...(accountId ? { accountId } : {}),
      ...(thread ? { threadId: /^\d+$/.test(thread) ? Number(thread) : thread } : {}),
    },
    replyTo: { platform: "telegram", channel: chat, ...(thread ? { thread } : {}) },
  };
}

function discord(ctx: CommandContext, prefix: string, accountId?: string): Identity | { error: string } {
  const from = strip(ctx.from, "discord");
  const to = strip(usable(ctx.to), "discord");
  // For native slash commands channelId is the channel's snowflake; for text commands it is
  // the provider id "discord". Only a snowflake counts.
  const snowflake = ctx.channelId && /^\d+$/.test(ctx.channelId) ? ctx.channelId : undefined;
  const chanFrom = from && /^channel:(\d+)$/.exec(from);
  const chanTo = to && /^channel:(\d+)$/.exec(to);
  const chan = chanFrom?.[1] ?? chanTo?.[1];
  const extra = accountId ? { accountId } : {};
  if (chan) {
    // A Discord thread is a channel of its own; its id is the conversation.
    return {
      conversation: `${prefix}:channel:${chan}`,
      target: { channel: "discord", to: `channel:${chan}`, ...extra },
      replyTo: { platform: "discord", channel: chan },
    };
  }
  const user = (from && /^(?:user:)?(\d+)$/.exec(from)?.[1]) ?? (ctx.senderId && /^\d+$/.test(ctx.senderId) ? ctx.senderId : undefined);
  if (user) {
    return {
      conversation: `${prefix}:dm:${user}`,
      target: { channel: "discord", to: `user:${user}`, ...extra },
      replyTo: snowflake
        ? { platform: "discord", channel: snowflake }
        : "the server cannot find this Discord DM channel; use the plugin delivery mode",
    };
  }
  return { error: "Could not tell which Discord channel this command came from." };
}

function generic(ctx: CommandContext, channel: string, prefix: string, accountId?: string): Identity | { error: string } {
  const raw = usable(ctx.to) ?? ctx.from ?? (ctx.senderId ? `${ctx.senderId}` : undefined);
  const base = strip(raw, channel);
  if (!raw || !base) return { error: `Could not tell which ${channel} conversation this command came from.` };
  const thread = threadOf(ctx);
  return {
    conversation: `${prefix}:${base}${thread ? `:thread:${thread}` : ""}`,
    target: {
      channel,
      to: raw,
      ...(accountId ? { accountId } : {}),
      ...(thread ? { threadId: thread } : {}),
    },
    replyTo: `server delivery supports Discord and Telegram only, not ${channel}; use the plugin delivery mode`,
  };
}
