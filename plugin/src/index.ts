// The OpenClaw entry point. Everything else is in plugin.ts, which tests load without OpenClaw.

import { definePluginEntry } from "openclaw/plugin-sdk/plugin-entry";
import type { OpenClawPluginApi, PluginCommandContext } from "openclaw/plugin-sdk/plugin-entry";
import type { MessagePresentation } from "openclaw/plugin-sdk/interactive-runtime";
import { resolveTelegramAccount } from "openclaw/plugin-sdk/telegram-account";
import { resolveDiscordAccount } from "openclaw/plugin-sdk/discord";

import { PLUGIN_ID, register } from "./plugin.ts";
import type { CommandContext, PluginApi, Presentation } from "./types.ts";

// Compile-time checks that the SDK's real types still fit the narrow ones the code uses.
const ctxFits = (c: PluginCommandContext): CommandContext => c;
const apiFits = (api: OpenClawPluginApi) => {
  const registerCommand: PluginApi["registerCommand"] = api.registerCommand;
  const registerService: PluginApi["registerService"] = api.registerService;
  const runtime: PluginApi["runtime"] = api.runtime;
  const logger: PluginApi["logger"] = api.logger;
  const lifecycle: PluginApi["lifecycle"] = api.lifecycle;
  const registerInteractiveHandler: PluginApi["registerInteractiveHandler"] = api.registerInteractiveHandler;
  return [registerCommand, registerService, runtime, logger, lifecycle, registerInteractiveHandler];
};
const presentationFits = (p: Presentation): MessagePresentation => p;
void ctxFits;
void apiFits;
void presentationFits;

/** The Telegram bot token and API root OpenClaw uses (to edit approval questions). */
function telegramAccount(cfg: unknown, accountId: string | undefined): { token: string; apiRoot?: string } | undefined {
  const a = resolveTelegramAccount({ cfg: cfg as Parameters<typeof resolveTelegramAccount>[0]["cfg"], accountId });
  if (!a?.token) return undefined;
  const apiRoot = (a.config as { apiRoot?: unknown }).apiRoot;
  return { token: a.token, apiRoot: typeof apiRoot === "string" ? apiRoot : undefined };
}

/**
 * The Discord bot token OpenClaw uses (to edit the live progress message). `plugin-sdk/discord`
 * is the only public way to it in 2026.9.6 (a compatibility facade over the installed Discord
 * channel plugin); without that plugin there are no Discord commands to answer either.
 */
function discordAccount(cfg: unknown, accountId: string | undefined): { token: string } | undefined {
  try {
    const a = resolveDiscordAccount({ cfg: cfg as Parameters<typeof resolveDiscordAccount>[0]["cfg"], accountId });
    return a?.token ? { token: a.token } : undefined;
  } catch {
    return undefined;
  }
}

export default definePluginEntry({
  id: PLUGIN_ID,
  name: "Tunnel",
  description: "Hand coding tasks from chat to Claude Code, Codex and Gemini CLI on runner machines.",
  register(api: OpenClawPluginApi) {
    register(api as unknown as PluginApi, { telegramAccount, discordAccount });
  },
});
