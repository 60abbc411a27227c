// The two Discord REST calls OpenClaw offers a plugin no public way to make: editing a message
// the plugin sent (the live progress message, an approval question's outcome) and the
// "typing…" indicator. OpenClaw 2026.9.6's Discord outbound adapter only sends (sendText returns
// the message id), `api.runtime.channel` has no edit, and the message tool's `edit` action is
// internal to the agent loop; so, as for Telegram, the plugin calls the platform's API itself
// with the bot token OpenClaw resolved for the account (`resolveDiscordAccount`). The token goes
// into the Authorization header only, never into a log line or an error message.
//
// Wire format (Discord API v10): PATCH /channels/{channel}/messages/{message} {content},
// POST /channels/{channel}/typing (204), POST /users/@me/channels {recipient_id} for a DM's
// channel. A 429 carries `retry_after` (seconds) in its body and `Retry-After` as a header;
// it becomes RateLimited and the watcher waits that long.

import { RateLimited } from "./controls.ts";
import type { ChatControls } from "./controls.ts";
import type { DeliveryTarget } from "./identity.ts";

/** The bot token of a Discord account, from OpenClaw's own resolution. */
export type DiscordAccountResolver = (cfg: unknown, accountId: string | undefined) => { token: string } | undefined;

/** Discord's longest message content. */
export const DISCORD_MAX_LENGTH = 2000;

const DEFAULT_API = "https://discord.com/api/v10";
const USER_AGENT = "DiscordBot (https://github.com/tunnel-dev/tunnel, 0.1.0)";

/**
 * Where Discord's REST API is: `DISCORD_API_URL` when set (the override OpenClaw's own Discord
 * channel honours, e.g. a proxy or a test stand-in), else discord.com.
 */
export function discordApiBase(env: Record<string, string | undefined> = process.env): string {
  const v = env.DISCORD_API_URL?.trim();
  return (v || DEFAULT_API).replace(/\/+$/, "");
}

/** Truncates to Discord's limit without splitting a surrogate pair. */
function fit(text: string): string {
  if (text.length <= DISCORD_MAX_LENGTH) return text;
  let cut = DISCORD_MAX_LENGTH - 1;
  if (/[\uD800-\uDBFF]/.test(text[cut - 1] ?? "")) cut--;
  return `${text.slice(0, cut)}…`;
}

export function discordControls(
  resolve: DiscordAccountResolver,
  cfg: () => unknown,
  fetchImpl: typeof fetch = fetch,
  env: Record<string, string | undefined> = process.env,
): ChatControls {
  // A DM's channel id per account and user (Discord returns the same channel every time).
  const dmChannels = new Map<string, Promise<string>>();

  async function call(target: DeliveryTarget, method: string, route: string, body?: unknown): Promise<unknown> {
    const acct = resolve(cfg(), target.accountId);
    if (!acct?.token) throw new Error("no Discord bot token");
    const what = `Discord ${method} ${route.replace(/\d{5,}/g, "…")}`;
    const res = await fetchImpl(`${discordApiBase(env)}${route}`, {
      method,
      headers: {
        authorization: `Bot ${acct.token}`,
        "user-agent": USER_AGENT,
        ...(body === undefined ? {} : { "content-type": "application/json" }),
      },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      signal: AbortSignal.timeout(15_000),
    });
    if (res.status === 204) return undefined;
    const json = (await res.json().catch(() => ({}))) as { message?: string; code?: number; retry_after?: number };
    if (res.status === 429) {
      const header = Number(res.headers.get("retry-after"));
      const secs = typeof json.retry_after === "number" ? json.retry_after : Number.isFinite(header) ? header : 5;
      throw new RateLimited(what, secs * 1000);
    }
    if (!res.ok) throw new Error(`${what}: ${res.status} ${json.message ?? ""}${json.code ? ` (${json.code})` : ""}`.trim());
    return json;
  }

  /** The channel a target's messages are in: `channel:<id>`, or a user's DM channel. */
  async function channelOf(target: DeliveryTarget): Promise<string> {
    const to = target.to.replace(/^discord:/, "");
    const chan = /^(?:channel:)?(\d+)$/.exec(to);
    if (chan) return chan[1];
    const user = /^user:(\d+)$/.exec(to);
    if (!user) throw new Error(`not a Discord channel or user: ${target.to}`);
    const key = `${target.accountId ?? ""}:${user[1]}`;
    let p = dmChannels.get(key);
    if (!p) {
      p = call(target, "POST", "/users/@me/channels", { recipient_id: user[1] }).then((dm) => {
        const id = (dm as { id?: unknown } | undefined)?.id;
        if (typeof id !== "string") throw new Error("Discord did not return the DM channel");
        return id;
      });
      dmChannels.set(key, p);
      p.catch(() => dmChannels.delete(key));
    }
    return p;
  }

  return {
    usable: (target) => !!resolve(cfg(), target.accountId)?.token,
    async edit(target, messageId, text) {
      const chan = await channelOf(target);
      // No pings from an edit: progress text quotes commands and paths, not people.
      await call(target, "PATCH", `/channels/${chan}/messages/${messageId}`, { content: fit(text), allowed_mentions: { parse: [] } });
    },
    async typing(target) {
      await call(target, "POST", `/channels/${await channelOf(target)}/typing`);
    },
    // "typing…" lasts about 10 s on Discord, or until the bot's next message.
    typingLastsMs: 10_000,
    maxLength: DISCORD_MAX_LENGTH,
  };
}
