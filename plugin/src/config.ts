// Plugin configuration: `plugins.entries.tunnel.config` in openclaw.json, with environment
// fallbacks that match the tunnel CLI ($TUNNEL_URL, $TUNNEL_TOKEN).

export const AGENTS = ["claude", "codex", "gemini"] as const;
export type Agent = (typeof AGENTS)[number];

export type DeliveryMode = "plugin" | "server";

export interface Config {
  serverUrl: string;
  token: string | undefined;
  defaultProject: string | undefined;
  delivery: DeliveryMode;
  progress: boolean;
  timeoutMs: number | undefined;
  requireAuth: boolean;
  commands: Record<Agent, string> & { state: string };
}

export const DEFAULT_SERVER_URL = "http://127.0.0.1:3456";

/**
 * Default command names. They follow the original (`/cc`, `/gemini`, `/cli-state`), except
 * Codex: OpenClaw reserves `/codex` for its bundled Codex integration, so the default is `/cx`.
 */
export const DEFAULT_COMMANDS: Config["commands"] = {
  claude: "cc",
  codex: "cx",
  gemini: "gemini",
  state: "cli-state",
};

export const AGENT_LABELS: Record<Agent, string> = {
  claude: "Claude",
  codex: "Codex",
  gemini: "Gemini",
};

function str(v: unknown): string | undefined {
  return typeof v === "string" && v.trim() !== "" ? v.trim() : undefined;
}

/** Reads the config; never throws (a bad value falls back to its default). */
export function readConfig(
  raw: Record<string, unknown> | undefined,
  env: Record<string, string | undefined> = process.env,
): Config {
  const r = raw ?? {};
  const cmds = (typeof r.commands === "object" && r.commands !== null ? r.commands : {}) as Record<
    string,
    unknown
  >;
  const commands = { ...DEFAULT_COMMANDS };
  for (const key of [...AGENTS, "state"] as const) {
    const name = str(cmds[key]);
    if (name && /^[a-z][a-z0-9_-]*$/.test(name)) commands[key] = name;
  }
  const timeout = typeof r.timeoutMs === "number" && r.timeoutMs >= 1000 ? Math.floor(r.timeoutMs) : undefined;
  return {
    serverUrl: (str(r.serverUrl) ?? str(env.TUNNEL_URL) ?? DEFAULT_SERVER_URL).replace(/\/+$/, ""),
    token: str(r.token) ?? str(env.TUNNEL_TOKEN),
    defaultProject: str(r.defaultProject),
    delivery: r.delivery === "server" ? "server" : "plugin",
    progress: r.progress !== false,
    timeoutMs: timeout,
    requireAuth: r.requireAuth !== false,
    commands,
  };
}
