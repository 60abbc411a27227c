// A fake OpenClaw plugin `api`: captures what the plugin registers, records log lines, and
// stands in for the outbound adapter so tests can see what the service sends.

import type {
  InteractiveRegistration,
  CommandContext,
  CommandDefinition,
  CommandResult,
  MessageHookContext,
  MessageReceivedEvent,
  OutboundAdapter,
  OutboundPayload,
  OutboundText,
  PluginApi,
  ServiceDefinition,
  ToolDefinition,
} from "../../src/types.ts";

export interface Sent extends OutboundText {
  channel: string;
  /** Set when it went through sendPayload (presentation blocks, e.g. approval buttons). */
  payload?: OutboundPayload["payload"];
}

export class FakeApi implements PluginApi {
  id = "tunnel";
  registrationMode = "full";
  config = { fake: "openclaw-config" };
  pluginConfig: Record<string, unknown>;
  readonly commands = new Map<string, CommandDefinition>();
  readonly services: ServiceDefinition[] = [];
  readonly tools = new Map<string, { tool: ToolDefinition; optional?: boolean }>();
  readonly hooks: ((e: MessageReceivedEvent, c: MessageHookContext) => void)[] = [];
  readonly interactive: InteractiveRegistration[] = [];
  readonly logs: { level: string; message: string }[] = [];
  readonly sent: Sent[] = [];
  /** Channels without an adapter (loadAdapter gives undefined). */
  readonly missingAdapters = new Set<string>();
  /** Channels whose adapter has no sendPayload (text only). */
  readonly noPayload = new Set<string>();
  /** Make the next N sendText calls throw. */
  failSends = 0;

  logger = {
    debug: (m: string) => this.logs.push({ level: "debug", message: m }),
    info: (m: string) => this.logs.push({ level: "info", message: m }),
    warn: (m: string) => this.logs.push({ level: "warn", message: m }),
    error: (m: string) => this.logs.push({ level: "error", message: m }),
  };

  runtime = {
    channel: {
      outbound: {
        loadAdapter: async (channel: string): Promise<OutboundAdapter | undefined> => {
          if (this.missingAdapters.has(channel)) return undefined;
          return {
            textChunkLimit: channel === "discord" ? 2000 : 4000,
            sendText: async (ctx: OutboundText) => {
              if (this.failSends > 0) {
                this.failSends--;
                throw new Error("fake send failure");
              }
              this.sent.push({ channel, ...ctx });
              return { channel, messageId: String(this.sent.length) };
            },
            ...(this.noPayload.has(channel)
              ? {}
              : {
                  sendPayload: async (ctx: OutboundPayload) => {
                    if (this.failSends > 0) {
                      this.failSends--;
                      throw new Error("fake send failure");
                    }
                    this.sent.push({ channel, ...ctx });
                    return { channel, messageId: String(this.sent.length) };
                  },
                }),
          };
        },
      },
    },
  };

  constructor(pluginConfig: Record<string, unknown> = {}) {
    this.pluginConfig = pluginConfig;
  }

  registerCommand = (c: CommandDefinition) => {
    if (this.commands.has(c.name)) throw new Error(`duplicate command ${c.name}`);
    this.commands.set(c.name, c);
  };
  registerService = (s: ServiceDefinition) => {
    this.services.push(s);
  };
  registerTool = (tool: ToolDefinition, opts?: { optional?: boolean }) => {
    this.tools.set(tool.name, { tool, optional: opts?.optional });
  };
  registerInteractiveHandler = (r: InteractiveRegistration) => {
    if (this.interactive.some((x) => x.channel === r.channel && x.namespace === r.namespace)) throw new Error(`duplicate namespace ${r.namespace}`);
    this.interactive.push(r);
  };
  on = (hook: "message_received", handler: (e: MessageReceivedEvent, c: MessageHookContext) => void) => {
    if (hook === "message_received") this.hooks.push(handler);
  };

  /** Runs a command the way OpenClaw does: name from the body, args after the first space. */
  async run(body: string, ctx: Partial<CommandContext> = {}): Promise<CommandResult> {
    const m = /^\/(\S+)\s*([\s\S]*)$/.exec(body.trim());
    if (!m) throw new Error(`not a command: ${body}`);
    const def = this.commands.get(m[1].toLowerCase());
    if (!def) throw new Error(`no command /${m[1]}`);
    const full: CommandContext = {
      ...TELEGRAM_DM,
      ...ctx,
      args: m[2] ? m[2] : undefined,
      commandBody: body.trim(),
    };
    return def.handler(full);
  }

  warnings(): string[] {
    return this.logs.filter((l) => l.level === "warn" || l.level === "error").map((l) => l.message);
  }
}

// Realistic handler contexts, as OpenClaw 2026.9.6 builds them (see the research notes on the
// harness run: Telegram values were observed; Discord values follow OpenClaw's native-command code).

export const TELEGRAM_DM: CommandContext = {
  channel: "telegram",
  channelId: undefined,
  isAuthorizedSender: true,
  senderId: "111",
  from: "telegram:111",
  to: "telegram:111",
  accountId: "default",
  commandBody: "",
  config: {},
  sessionKey: "agent:main:main",
};

export const TELEGRAM_TOPIC: CommandContext = {
  channel: "telegram",
  isAuthorizedSender: true,
  senderId: "111",
  from: "telegram:group:-100555:topic:42",
  to: "telegram:-100555",
  accountId: "default",
  messageThreadId: 42,
  commandBody: "",
  config: {},
  sessionKey: "agent:main:telegram:group:-100555:topic:42",
};

export const TELEGRAM_GROUP: CommandContext = {
  channel: "telegram",
  isAuthorizedSender: true,
  senderId: "222",
  from: "telegram:group:-100777",
  to: "telegram:-100777",
  accountId: "default",
  commandBody: "",
  config: {},
};

/** Telegram native (menu) command: `to` is slash:<senderId>. */
export const TELEGRAM_NATIVE_DM: CommandContext = {
  channel: "telegram",
  isAuthorizedSender: true,
  senderId: "111",
  from: "telegram:111",
  to: "slash:111",
  accountId: "default",
  commandBody: "",
  config: {},
};

export const DISCORD_TEXT: CommandContext = {
  channel: "discord",
  channelId: "discord",
  isAuthorizedSender: true,
  senderId: "900000000000000001",
  from: "discord:channel:800000000000000001",
  to: "channel:800000000000000001",
  accountId: "default",
  commandBody: "",
  config: {},
};

/** Discord native slash command in a guild channel: `to` is slash:<userId>, channelId the snowflake. */
export const DISCORD_SLASH: CommandContext = {
  channel: "discord",
  channelId: "800000000000000001",
  isAuthorizedSender: true,
  senderId: "900000000000000001",
  from: "discord:channel:800000000000000001",
  to: "slash:900000000000000001",
  accountId: "default",
  commandBody: "",
  config: {},
};

export const DISCORD_SLASH_DM: CommandContext = {
  channel: "discord",
  channelId: "700000000000000009",
  isAuthorizedSender: true,
  senderId: "900000000000000001",
  from: "discord:900000000000000001",
  to: "slash:900000000000000001",
  accountId: "default",
  commandBody: "",
  config: {},
};

/** A message in a Discord thread: the thread is a channel; its parent is threadParentId. */
export const DISCORD_THREAD: CommandContext = {
  channel: "discord",
  channelId: "discord",
  isAuthorizedSender: true,
  senderId: "900000000000000001",
  from: "discord:channel:810000000000000002",
  to: "channel:810000000000000002",
  threadParentId: "800000000000000001",
  accountId: "default",
  commandBody: "",
  config: {},
};
