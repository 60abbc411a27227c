// Registration: commands, the delivery service, the agent tools and the message-id hook.
// `register()` runs several times per process (full, discovery, tool-discovery); it only
// registers and never starts work. The service's start() does.

import { ApprovalDelivery } from "./approvals.ts";
import { discordControls } from "./discord.ts";
import type { DiscordAccountResolver } from "./discord.ts";
import { telegramControls } from "./telegram.ts";
import type { TelegramAccountResolver } from "./telegram.ts";
import { agentCommands, stateCommand } from "./commands.ts";
import type { Deps } from "./commands.ts";
import { AGENTS, readConfig } from "./config.ts";
import { TunnelClient } from "./client.ts";
import { sharedMessageIds } from "./msgids.ts";
import { callTool, stateTool } from "./tools.ts";
import type { PluginApi } from "./types.ts";
import { sharedWatcher } from "./watcher.ts";
import type { WatcherDeps } from "./watcher.ts";

export const PLUGIN_ID = "tunnel";
export const SERVICE_ID = "tunnel-delivery";

export interface RegisterOptions {
  /** For tests: a watcher and message-id store of their own instead of the process-wide ones. */
  watcher?: ReturnType<typeof sharedWatcher>;
  messageIds?: ReturnType<typeof sharedMessageIds>;
  fetch?: typeof fetch;
  env?: Record<string, string | undefined>;
  progressAfterMs?: number;
  /** Least time between two edits of a live progress message (tests shorten it). */
  progressEveryMs?: number;
  retryDelaysMs?: number[];
  /** The Telegram bot token OpenClaw uses (index.ts), to edit approval questions to their outcome. */
  telegramAccount?: TelegramAccountResolver;
  /** The Discord bot token OpenClaw uses (index.ts), for the live progress message and typing. */
  discordAccount?: DiscordAccountResolver;
}

export function register(api: PluginApi, opts: RegisterOptions = {}): Deps {
  const config = readConfig(api.pluginConfig, opts.env);
  const client = new TunnelClient({ baseUrl: config.serverUrl, token: config.token, fetch: opts.fetch });
  const watcher = opts.watcher ?? sharedWatcher();
  const messageIds = opts.messageIds ?? sharedMessageIds();
  const logger = api.logger;
  // Edits and "typing…" where the plugin can do them: Telegram (Bot API) and Discord (REST),
  // with the bot token OpenClaw resolved for the account (OpenClaw's outbound adapter only
  // sends). Other channels get none: a "started" notice and the answer.
  const telegram = opts.telegramAccount ? telegramControls(opts.telegramAccount, () => api.config, opts.fetch) : undefined;
  const discord = opts.discordAccount ? discordControls(opts.discordAccount, () => api.config, opts.fetch, opts.env ?? process.env) : undefined;
  const controls = (channel: string) => (channel === "telegram" ? telegram : channel === "discord" ? discord : undefined);
  // Approvals (approvals.ts): questions posted by the watcher, answered by a tap or `-approve`.
  const approvals = new ApprovalDelivery({
    client,
    loadAdapter: (channel) => api.runtime.channel.outbound.loadAdapter(channel),
    cfg: () => api.config,
    logger,
    commandOf: (agent) => config.commands[agent as keyof typeof config.commands] ?? agent,
    editor: controls,
    watchOfApproval: (aid) => watcher.list().find((w) => w.approvals?.[aid]),
    // A question asked or answered shows in the live progress message at once.
    setPhase: (taskId, phase, detail) => watcher.setPhase(taskId, phase, detail),
  });
  const deps: Deps = { config, client, watcher, messageIds, logger, approvals };

  // Until a service starts, the latest registration configures the watcher; once one runs, its
  // own api stays in charge (a later discovery-mode registration must not take over sending).
  // What the watcher sends with: the same from registration and from the service, but for
  // where the OpenClaw config is read.
  const watcherSettings = (cfg: WatcherDeps["cfg"]): WatcherDeps => ({
    client,
    loadAdapter: (channel) => api.runtime.channel.outbound.loadAdapter(channel),
    cfg,
    logger,
    progress: config.progress,
    progressAfterMs: opts.progressAfterMs ?? 10_000,
    retryDelaysMs: opts.retryDelaysMs,
    onApproval: (w, data) => approvals.onEvent(w, data),
    controls,
    progressEveryMs: opts.progressEveryMs,
  });
  if (!watcher.running) watcher.configure(watcherSettings(() => api.config));

  for (const agent of AGENTS) for (const def of agentCommands(deps, agent)) api.registerCommand(def);
  api.registerCommand(stateCommand(deps));

  api.registerService({
    id: SERVICE_ID,
    async start(ctx) {
      // In server delivery no new task is followed; tasks submitted before a switch from
      // plugin delivery (kept in the state file) are still finished here.
      if (config.delivery !== "plugin") {
        logger.info("tunnel: delivery mode is server; the plugin service sends no new answers");
      }
      watcher.configure(watcherSettings(() => ctx.config ?? api.config));
      // OpenClaw drains a plugin instance before it stops its services; stop following (and so
      // close the event streams) as soon as this instance starts to retire.
      const lifecycle = api.lifecycle;
      lifecycle?.signal?.addEventListener("abort", () => void watcher.stop(), { once: true });
      lifecycle?.onDispose?.(() => watcher.stop());
      await watcher.start(ctx.stateDir);
      logger.info(`tunnel: delivery service started (server ${config.serverUrl}, following ${watcher.list().length} task(s))`);
    },
    async stop() {
      logger.info("tunnel: delivery service stopping");
      await watcher.stop();
    },
  });

  for (const agent of AGENTS) api.registerTool(callTool(deps, agent), { optional: true });
  api.registerTool(stateTool(deps), { optional: true });
  api.registerInteractiveHandler?.(approvals.interactiveHandler());

  api.on?.("message_received", (event, ctx) => {
    try {
      if (event.messageId && typeof event.content === "string") {
        messageIds.remember({ channel: ctx.channelId, senderId: event.senderId, text: event.content }, event.messageId);
      }
    } catch (e) {
      logger.warn(`tunnel: message_received hook: ${(e as Error).message}`);
    }
  });

  if (!config.token && api.registrationMode === "full") {
    logger.warn("tunnel: no token configured; set plugins.entries.tunnel.config.token");
  }
  return deps;
}
