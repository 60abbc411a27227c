// Argument parsing for the agent commands.
//
// Keywords are matched as whole words, never as prefixes: the original plugin turned
// `/cc newsletter` into "reset the session, then submit `sletter`", and `/cc 现在几点` into
// "show the current session". Here a keyword counts only when it is the whole first word.

export type Sub = "new" | "recent" | "resume" | "now" | "stop" | "status" | "help";

export type Parsed =
  | { kind: "help" }
  | { kind: "submit"; prompt: string }
  | { kind: "new"; prompt?: string }
  | { kind: "resume"; id: string; prompt?: string }
  | { kind: "usage"; sub: Sub; message: string }
  | { kind: "recent" }
  | { kind: "now" }
  | { kind: "stop"; all: boolean }
  | { kind: "status" };

/** English keywords and the original's Chinese ones (plus 停止/状态/帮助 for the new commands). */
export const KEYWORDS: Record<string, Sub> = {
  new: "new",
  reset: "new",
  新会话: "new",
  recent: "recent",
  最近: "recent",
  resume: "resume",
  接续: "resume",
  now: "now",
  current: "now",
  session: "now",
  当前: "now",
  现在: "now",
  stop: "stop",
  cancel: "stop",
  停止: "stop",
  status: "status",
  状态: "status",
  help: "help",
  帮助: "help",
};

const ALL_WORDS = new Set(["all", "全部"]);

/** A native session id as the server accepts it (letters, digits and -_.:). */
export const SESSION_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$/;
/** In the keyword form `/cc resume <id>`, only an id that looks like one (hex/UUID, ≥ 8). */
const KEYWORD_RESUME_ID_RE = /^[0-9a-f][0-9a-f-]{7,}$/i;

function splitFirst(s: string): [string, string] {
  const m = /^(\S+)\s*([\s\S]*)$/.exec(s.trim());
  return m ? [m[1], m[2].trim()] : ["", ""];
}

/** Which sub-command a first word names, if any (`-new`, `--new`, `New` and `新会话` all count). */
export function keyword(word: string): Sub | undefined {
  const w = word.replace(/^-{1,2}/, "").toLowerCase();
  return Object.prototype.hasOwnProperty.call(KEYWORDS, w) ? KEYWORDS[w] : undefined;
}

/**
 * Parses a command. `sub` is set for the explicit sub-commands (`/cc-new …`); for the main
 * command (`/cc …`) it is undefined and a leading keyword may select one.
 */
export function parseCommand(sub: Sub | undefined, rawArgs: string | undefined): Parsed {
  const args = (rawArgs ?? "").trim();
  if (sub) return parseSub(sub, args, true);
  if (!args) return { kind: "help" };
  const [first, rest] = splitFirst(args);
  const kw = keyword(first);
  if (!kw) return { kind: "submit", prompt: args };
  switch (kw) {
    case "new":
      return parseSub("new", rest, false);
    case "resume": {
      const [id] = splitFirst(rest);
      // `/cc resume the work from yesterday` is a prompt, not a resume of session "the".
      if (!KEYWORD_RESUME_ID_RE.test(id)) return { kind: "submit", prompt: args };
      return parseSub("resume", rest, false);
    }
    case "stop":
      if (!rest) return { kind: "stop", all: false };
      if (ALL_WORDS.has(rest.toLowerCase())) return { kind: "stop", all: true };
      return { kind: "submit", prompt: args };
    default:
      // Keywords that take no argument only count when they are all there is:
      // `/cc status of the build?` is a prompt.
      return rest ? { kind: "submit", prompt: args } : parseSub(kw, "", false);
  }
}

function parseSub(sub: Sub, args: string, explicit: boolean): Parsed {
  switch (sub) {
    case "new":
      return args ? { kind: "new", prompt: args } : { kind: "new" };
    case "resume": {
      const [id, prompt] = splitFirst(args);
      if (!id) return { kind: "usage", sub, message: "Give the session id to resume." };
      if (!SESSION_ID_RE.test(id)) {
        return { kind: "usage", sub, message: `\`${id.slice(0, 80)}\` is not a session id.` };
      }
      return prompt ? { kind: "resume", id, prompt } : { kind: "resume", id };
    }
    case "stop":
      if (!args) return { kind: "stop", all: false };
      if (ALL_WORDS.has(args.toLowerCase())) return { kind: "stop", all: true };
      return { kind: "usage", sub, message: "Use it alone, or with `all` to cancel queued tasks too." };
    case "recent":
    case "now":
    case "status":
    case "help":
      if (args && explicit) {
        return { kind: "usage", sub, message: "This command takes no arguments." };
      }
      return { kind: sub };
  }
}
