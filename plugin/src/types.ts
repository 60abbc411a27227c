// The parts of OpenClaw's plugin API this plugin uses, as narrow structural types.
//
// The plugin code depends on these and not on the SDK's own types, so the unit tests can hand
// it a small fake `api`. `src/index.ts` checks at compile time that the real SDK types
// (openclaw/plugin-sdk/plugin-entry) are assignable to them, so a drift in the SDK fails the
// type check instead of a chat command.

export interface Logger {
  debug?: (message: string) => void;
  info: (message: string) => void;
  warn: (message: string) => void;
  error: (message: string) => void;
}

/** What a command handler receives (a subset of the SDK's PluginCommandContext). */
export interface CommandContext {
  senderId?: string;
  channel: string;
  channelId?: string;
  isAuthorizedSender: boolean;
  args?: string;
  commandBody: string;
  config: unknown;
  from?: string;
  to?: string;
  accountId?: string;
  messageThreadId?: string | number;
  threadParentId?: string;
  sessionKey?: string;
}

export interface CommandResult {
  text?: string;
  isError?: boolean;
  /** No reply at all (OpenClaw would otherwise send "No response generated"). */
  suppressReply?: boolean;
}

export interface CommandDefinition {
  name: string;
  description: string;
  acceptsArgs?: boolean;
  requireAuth?: boolean;
  handler: (ctx: CommandContext) => CommandResult | Promise<CommandResult>;
}

export interface ServiceContext {
  config: unknown;
  stateDir: string;
  logger: Logger;
}

export interface ServiceDefinition {
  id: string;
  start: (ctx: ServiceContext) => void | Promise<void>;
  stop?: (ctx: ServiceContext) => void | Promise<void>;
}

export interface ToolResult {
  content: { type: "text"; text: string }[];
  details: unknown;
}

export interface ToolDefinition {
  name: string;
  label: string;
  description: string;
  parameters: Record<string, unknown>;
  execute: (toolCallId: string, params: unknown, signal?: AbortSignal) => Promise<ToolResult>;
}

/** What an outbound adapter's sendText takes (a subset of ChannelOutboundContext). */
export interface OutboundText {
  // The host's config object, passed through untouched (typed `any` so the real adapter, which
  // wants its own OpenClawConfig type, fits).
  cfg: any;
  to: string;
  text: string;
  accountId?: string | null;
  threadId?: string | number | null;
}

/** A reply payload with OpenClaw `presentation` blocks (a subset of ReplyPayload). */
export interface OutboundPayload extends OutboundText {
  payload: { text?: string; presentation?: Presentation };
}

export interface OutboundAdapter {
  sendText?: (ctx: OutboundText) => Promise<unknown>;
  /** Sends a payload with presentation blocks (Telegram renders buttons as an inline keyboard). */
  sendPayload?: (ctx: OutboundPayload) => Promise<unknown>;
  textChunkLimit?: number;
}

/** OpenClaw's portable message presentation (docs/plugins/message-presentation.md), the part used here. */
export interface Presentation {
  title?: string;
  tone?: "neutral" | "info" | "success" | "warning" | "danger";
  blocks: (
    | { type: "text"; text: string }
    | { type: "context"; text: string }
    | {
        type: "buttons";
        buttons: {
          label: string;
          action: { type: "callback"; value: string };
          style?: "primary" | "secondary" | "success" | "danger";
        }[];
      }
  )[];
}

/** What a Telegram interactive handler receives (OpenClaw's TelegramInteractiveHandlerContext, subset). */
export interface TelegramInteractiveContext {
  channel: "telegram";
  accountId: string;
  conversationId: string;
  senderId?: string;
  senderUsername?: string;
  threadId?: number;
  isGroup: boolean;
  auth: { isAuthorizedSender: boolean };
  callback: { data: string; namespace: string; payload: string; messageId: number; chatId: string; messageText?: string };
  respond: {
    reply: (p: { text: string }) => Promise<void>;
    editMessage: (p: { text: string }) => Promise<void>;
    clearButtons: () => Promise<void>;
  };
}

export interface InteractiveRegistration {
  channel: string;
  namespace: string;
  // OpenClaw types the context per channel; the handler checks the channel itself.
  handler: (ctx: any) => Promise<{ handled?: boolean } | void>;
}

/** Event passed to the `message_received` hook (subset). */
export interface MessageReceivedEvent {
  from: string;
  content: string;
  messageId?: string;
  senderId?: string;
  threadId?: string | number;
}

export interface MessageHookContext {
  channelId: string;
  accountId?: string;
  conversationId?: string;
}

export interface PluginApi {
  id: string;
  registrationMode?: string;
  config: unknown;
  pluginConfig?: Record<string, unknown>;
  logger: Logger;
  runtime: {
    channel: {
      outbound: {
        loadAdapter: (channel: string) => Promise<OutboundAdapter | undefined>;
      };
    };
  };
  /** The plugin instance's lifecycle: its signal aborts when OpenClaw retires the instance. */
  lifecycle?: {
    signal?: AbortSignal;
    onDispose?: (dispose: () => void | Promise<void>) => () => void;
  };
  registerCommand: (command: CommandDefinition) => void;
  registerService: (service: ServiceDefinition) => void;
  registerTool: (tool: ToolDefinition, opts?: { optional?: boolean }) => void;
  /** Claims callback buttons whose data starts with `<namespace>:` (approvals). */
  registerInteractiveHandler?: (registration: InteractiveRegistration) => void;
  on?: (
    hook: "message_received",
    handler: (event: MessageReceivedEvent, ctx: MessageHookContext) => void,
  ) => void;
}
