// What the plugin can do to a chat beyond sending, where the channel lets it (telegram.ts,
// discord.ts): edit a message it sent (the live progress message, an approval question's
// outcome) and show "typing…". OpenClaw's outbound adapter only sends.

import type { DeliveryTarget } from "./identity.ts";

export interface ChatControls {
  /** Replaces the text of a message this plugin sent (plain text; drops any buttons). */
  edit(target: DeliveryTarget, messageId: string, text: string): Promise<void>;
  /** Shows "typing…" in the chat for a few seconds. */
  typing?(target: DeliveryTarget): Promise<void>;
  /** How long one "typing…" lasts on this channel (ms); it is sent again before it fades. */
  typingLastsMs?: number;
  /** Whether the plugin can reach this chat's account at all (a bot token is configured). */
  usable?(target: DeliveryTarget): boolean;
  /** The channel's longest message (characters). */
  maxLength?: number;
}

/**
 * The chat platform said "too many requests" (HTTP 429) and how long to wait. The watcher holds
 * the task's progress edits until then instead of retrying blindly.
 */
export class RateLimited extends Error {
  readonly retryAfterMs: number;
  constructor(what: string, retryAfterMs: number) {
    super(`${what}: rate limited, retry after ${Math.ceil(retryAfterMs)} ms`);
    this.name = "RateLimited";
    this.retryAfterMs = retryAfterMs;
  }
}
