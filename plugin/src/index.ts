// The OpenClaw entry point. Everything else is in plugin.ts, which tests load without OpenClaw.

import { definePluginEntry } from "openclaw/plugin-sdk/plugin-entry";
import type { OpenClawPluginApi, PluginCommandContext } from "openclaw/plugin-sdk/plugin-entry";

import { PLUGIN_ID, register } from "./plugin.ts";
import type { CommandContext, PluginApi } from "./types.ts";

// Compile-time checks that the SDK's real types still fit the narrow ones the code uses.
const ctxFits = (c: PluginCommandContext): CommandContext => c;
const apiFits = (api: OpenClawPluginApi) => {
  const registerCommand: PluginApi["registerCommand"] = api.registerCommand;
  const registerService: PluginApi["registerService"] = api.registerService;
  const runtime: PluginApi["runtime"] = api.runtime;
  const logger: PluginApi["logger"] = api.logger;
  const lifecycle: PluginApi["lifecycle"] = api.lifecycle;
  return [registerCommand, registerService, runtime, logger, lifecycle];
};
void ctxFits;
void apiFits;

export default definePluginEntry({
  id: PLUGIN_ID,
  name: "Tunnel",
  description: "Hand coding tasks from chat to Claude Code, Codex and Gemini CLI on runner machines.",
  register(api: OpenClawPluginApi) {
    register(api as unknown as PluginApi);
  },
});
