// The two Bot API calls OpenClaw's outbound adapter does not offer: editing a message the
// plugin sent (the live progress message, an approval question's outcome) and the "typing…"
// indicator. Both use the bot token and API root OpenClaw itself resolved for the account.

import { RateLimited } from "./controls.ts";
import type { ChatControls } from "./controls.ts";
import type { DeliveryTarget } from "./identity.ts";

export type { ChatControls } from "./controls.ts";

/** The bot token and API root of a Telegram account, from OpenClaw's own resolution. */
export type TelegramAccountResolver = (cfg: unknown, accountId: string | undefined) => { token: string; apiRoot?: string } | undefined;

function chatId(target: DeliveryTarget): string {
  return target.to.replace(/^telegram:/, "");
}

/** Telegram's editMessageText and sendChatAction through the Bot API. */
export function telegramControls(resolve: TelegramAccountResolver, cfg: () => unknown, fetchImpl: typeof fetch = fetch): ChatControls {
  async function call(target: DeliveryTarget, method: string, body: Record<string, unknown>): Promise<void> {
    const acct = resolve(cfg(), target.accountId);
    if (!acct?.token) throw new Error("no Telegram bot token");
    const root = (acct.apiRoot ?? "https://api.telegram.org").replace(/\/+$/, "");
    const res = await fetchImpl(`${root}/bot${acct.token}/${method}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ chat_id: chatId(target), ...body }),
      signal: AbortSignal.timeout(15_000),
    });
    const json = (await res.json().catch(() => ({}))) as { ok?: boolean; description?: string; parameters?: { retry_after?: number } };
    if (res.status === 429) throw new RateLimited(`Telegram ${method}`, (json.parameters?.retry_after ?? 5) * 1000);
    // Editing to the same text is not an error worth a log line.
    if (!json.ok && !/message is not modified/.test(json.description ?? "")) {
      throw new Error(`Telegram ${method}: ${res.status} ${json.description ?? ""}`.trim());
    }
  }
  const thread = (t: DeliveryTarget) => (t.threadId !== undefined && /^\d+$/.test(String(t.threadId)) ? { message_thread_id: Number(t.threadId) } : {});
  return {
    edit: (target, messageId, text) => call(target, "editMessageText", { message_id: Number(messageId), text }),
    typing: (target) => call(target, "sendChatAction", { action: "typing", ...thread(target) }),
    // "typing…" shows for up to 5 s.
    typingLastsMs: 5000,
    maxLength: 4096,
  };
}
