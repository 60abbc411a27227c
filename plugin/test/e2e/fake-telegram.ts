// A Telegram Bot API stand-in on 127.0.0.1 for the end-to-end test: OpenClaw's Telegram
// channel is pointed at it with `channels.telegram.apiRoot`.
//
// It speaks the real wire format (https://core.telegram.org/bots/api): `POST /bot<token>/<method>`
// with a JSON, form or query body; answers `{"ok":true,"result":…}` or
// `{"ok":false,"error_code":N,"description":"…"}` with the same HTTP status. getUpdates long-polls
// and honours offset/limit/timeout; sendMessage checks the text (empty, too long, HTML that
// Telegram could not parse) the way Telegram does and returns the sent Message. Inline keyboards
// (`reply_markup.inline_keyboard`, callback_data of 1–64 bytes) are checked and kept with the
// message; `injectCallback` queues a `callback_query` update for a tap on one of its buttons, and
// answerCallbackQuery, editMessageText (which drops the keyboard unless it is sent again) and
// editMessageReplyMarkup work on the kept messages.

import http from "node:http";
import type { AddressInfo } from "node:net";

export interface Call {
  method: string;
  params: Record<string, any>;
  at: number;
}

export interface InjectOptions {
  text: string;
  userId: number;
  chatId?: number;
  chatType?: "private" | "group" | "supergroup";
  threadId?: number;
}

const BOT = {
  id: 7000000001,
  is_bot: true,
  first_name: "Tunnel Test",
  username: "tunnel_test_bot",
  can_join_groups: true,
  can_read_all_group_messages: false,
  supports_inline_queries: false,
};

/** Tags Telegram accepts with parse_mode HTML. */
const HTML_TAGS = new Set([
  "b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre",
  "tg-spoiler", "span", "blockquote", "tg-emoji",
]);

class ApiError extends Error {
  readonly code: number;
  constructor(code: number, description: string) {
    super(description);
    this.code = code;
  }
}

/** Checks text the way Telegram's HTML parser does (tags known and balanced). */
export function checkHtml(text: string): void {
  const stack: string[] = [];
  const re = /<(\/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s[^<>]*)?)>|</g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text))) {
    if (m[0] === "<") throw new ApiError(400, `Bad Request: can't parse entities: Unexpected end tag at byte offset ${m.index}`);
    const [, close, tagRaw] = m;
    const tag = tagRaw.toLowerCase();
    if (!HTML_TAGS.has(tag)) {
      throw new ApiError(400, `Bad Request: can't parse entities: Unsupported start tag "${tag}" at byte offset ${m.index}`);
    }
    if (close) {
      if (stack.pop() !== tag) throw new ApiError(400, `Bad Request: can't parse entities: Can't find end tag corresponding to start tag "${tag}"`);
    } else {
      stack.push(tag);
    }
  }
  if (stack.length) throw new ApiError(400, `Bad Request: can't parse entities: Can't find end tag corresponding to start tag "${stack.pop()}"`);
}

/** The text as a user sees it: tags removed, entities decoded. */
export function visibleText(text: string, parseMode?: string): string {
  if (parseMode !== "HTML") return text;
  return text
    .replace(/<[^>]+>/g, "")
    .replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">")
    .replace(/&quot;/g, '"')
    .replace(/&#39;/g, "'")
    .replace(/&amp;/g, "&");
}

export class FakeTelegram {
  readonly token: string;
  readonly calls: Call[] = [];
  readonly sent: Record<string, any>[] = [];
  readonly unknown: string[] = [];
  private server: http.Server | undefined;
  private updates: Record<string, any>[] = [];
  private nextUpdateId: number;
  private nextMessageId = 500;
  private waiters: (() => void)[] = [];
  private readonly chats = new Map<number, Record<string, any>>();
  /** Messages the bot sent, by `${chat_id}:${message_id}`, as they are now (after edits). */
  readonly messages = new Map<string, Record<string, any>>();
  /** The text each message was first sent with, by the same key (edits do not change it). */
  readonly firstText = new Map<string, string>();
  /** Callback queries sent to the bot and not yet answered. */
  private readonly openQueries = new Set<string>();
  private nextQueryId = 9_000_000;

  constructor(token: string) {
    this.token = token;
    // Increasing across runs, so a state dir that remembers an offset never drops new updates.
    this.nextUpdateId = Math.floor(Date.now() / 1000) - 1_700_000_000;
  }

  get apiRoot(): string {
    const a = this.server!.address() as AddressInfo;
    return `http://127.0.0.1:${a.port}`;
  }

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => {
      this.handle(req, res).catch((e) => {
        res.writeHead(500, { "content-type": "application/json" });
        res.end(JSON.stringify({ ok: false, error_code: 500, description: `Internal Server Error: ${e}` }));
      });
    });
    await new Promise<void>((r) => this.server!.listen(0, "127.0.0.1", r));
  }

  async stop(): Promise<void> {
    for (const w of this.waiters.splice(0)) w();
    this.server?.closeAllConnections();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }

  callsOf(method: string): Call[] {
    return this.calls.filter((c) => c.method === method);
  }

  /** Makes a chat known (the bot can only send to chats it has seen). */
  addChat(chatId: number, type: "private" | "supergroup" = chatId < 0 ? "supergroup" : "private"): void {
    this.chats.set(chatId, type === "private" ? { id: chatId, type, first_name: "Tess" } : { id: chatId, type, title: "Test group", is_forum: true });
  }

  /** Queues a message from a user, as Telegram would deliver it to getUpdates. */
  inject(o: InjectOptions): Record<string, any> {
    const chatId = o.chatId ?? o.userId;
    const type = o.chatType ?? (chatId === o.userId ? "private" : "supergroup");
    const user = { id: o.userId, is_bot: false, first_name: "Tess", last_name: "Tester", username: `tester${o.userId}`, language_code: "en" };
    const chat: Record<string, any> =
      type === "private"
        ? { id: chatId, type, first_name: "Tess", last_name: "Tester", username: `tester${o.userId}` }
        : { id: chatId, type, title: "Test group", ...(o.threadId !== undefined ? { is_forum: true } : {}) };
    this.chats.set(chatId, chat);
    const message: Record<string, any> = {
      message_id: this.nextMessageId++,
      from: user,
      chat,
      date: Math.floor(Date.now() / 1000),
      text: o.text,
    };
    if (o.text.startsWith("/")) {
      const cmd = /^\/[A-Za-z0-9_]+(@[A-Za-z0-9_]+)?/.exec(o.text)?.[0] ?? o.text.split(/\s/)[0];
      message.entities = [{ type: "bot_command", offset: 0, length: cmd.length }];
    }
    if (o.threadId !== undefined) {
      message.message_thread_id = o.threadId;
      message.is_topic_message = true;
    }
    const update = { update_id: this.nextUpdateId++, message };
    this.updates.push(update);
    for (const w of this.waiters.splice(0)) w();
    return update;
  }

  /**
   * Delivers an update again, as Telegram does when the bot's confirmation (the next
   * getUpdates offset) did not reach it, e.g. the gateway stopped first: the same update, same
   * update_id, served once more whatever the offset.
   */
  redeliver(update: Record<string, any>): void {
    this.unconfirmed.add(update.update_id);
    this.updates.push(structuredClone(update));
    for (const w of this.waiters.splice(0)) w();
  }

  /** Updates served again once even below the confirmed offset (redeliver). */
  private readonly unconfirmed = new Set<number>();

  /**
   * Queues a tap on a button of a message the bot sent, as Telegram delivers it: a
   * `callback_query` with the whole message and the button's callback_data. Returns the update.
   */
  injectCallback(o: { chatId: number; messageId: number; userId: number; data: string; username?: string }): Record<string, any> {
    const message = this.messages.get(`${o.chatId}:${o.messageId}`);
    if (!message) throw new Error(`no message ${o.messageId} in chat ${o.chatId}`);
    const from = { id: o.userId, is_bot: false, first_name: "Tess", last_name: "Tester", username: o.username ?? `tester${o.userId}`, language_code: "en" };
    const id = String(this.nextQueryId++);
    this.openQueries.add(id);
    const update = {
      update_id: this.nextUpdateId++,
      callback_query: { id, from, message: structuredClone(message), chat_instance: String(-4_000_000_000 - o.chatId), data: o.data },
    };
    this.updates.push(update);
    for (const w of this.waiters.splice(0)) w();
    return update;
  }

  /** The buttons of a message as the user sees them now (text and callback_data). */
  keyboard(chatId: number, messageId: number): { text: string; callback_data?: string }[][] {
    return this.messages.get(`${chatId}:${messageId}`)?.reply_markup?.inline_keyboard ?? [];
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://x");
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const raw = Buffer.concat(chunks).toString("utf8");
    const send = (status: number, body: unknown) => {
      const data = JSON.stringify(body);
      res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(data) });
      res.end(data);
    };
    const m = /^\/bot([^/]+)\/([A-Za-z]+)$/.exec(url.pathname);
    if (!m) return send(404, { ok: false, error_code: 404, description: "Not Found" });
    const [, token, methodRaw] = m;
    const params: Record<string, any> = Object.fromEntries(url.searchParams);
    const ctype = (req.headers["content-type"] ?? "").toLowerCase();
    if (raw) {
      if (ctype.includes("json")) Object.assign(params, JSON.parse(raw));
      else if (ctype.includes("x-www-form-urlencoded")) Object.assign(params, Object.fromEntries(new URLSearchParams(raw)));
      else params._raw = raw.slice(0, 2000);
    }
    const method = methodRaw.toLowerCase(); // Telegram method names are case-insensitive
    this.calls.push({ method: methodRaw, params, at: Date.now() });
    if (token !== this.token) return send(401, { ok: false, error_code: 401, description: "Unauthorized" });
    try {
      const result = await this.dispatch(method, params);
      if (result === undefined) {
        this.unknown.push(methodRaw);
        return send(404, { ok: false, error_code: 404, description: "Not Found" });
      }
      send(200, { ok: true, result });
    } catch (e) {
      if (e instanceof ApiError) return send(e.code, { ok: false, error_code: e.code, description: e.message });
      throw e;
    }
  }

  private async dispatch(method: string, p: Record<string, any>): Promise<unknown> {
    switch (method) {
      case "getme":
        return BOT;
      case "deletewebhook":
      case "setmycommands":
      case "deletemycommands":
        return true;
      case "sendchataction":
        if (!this.chats.has(Number(p.chat_id))) throw new ApiError(400, "Bad Request: chat not found");
        if (!["typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice", "upload_document", "choose_sticker", "find_location", "record_video_note", "upload_video_note"].includes(String(p.action))) {
          throw new ApiError(400, "Bad Request: wrong parameter action in request");
        }
        return true;
      case "setmessagereaction":
        return true;
      case "getmycommands":
        return [];
      case "getwebhookinfo":
        return { url: "", has_custom_certificate: false, pending_update_count: this.updates.length };
      case "getupdates":
        return this.getUpdates(p);
      case "sendmessage":
        return this.sendMessage(p);
      case "editmessagetext":
        return this.editMessageText(p);
      case "editmessagereplymarkup":
        return this.editMessageReplyMarkup(p);
      case "answercallbackquery":
        return this.answerCallbackQuery(p);
      default:
        return undefined;
    }
  }

  private async getUpdates(p: Record<string, any>): Promise<unknown[]> {
    const offset = Number(p.offset ?? 0);
    const limit = Math.min(Number(p.limit ?? 100) || 100, 100);
    // Long polls are capped at 5 s here so a stopping gateway is not held up.
    const deadline = Date.now() + Math.min(Number(p.timeout ?? 0), 5) * 1000;
    for (;;) {
      // Updates below the offset are confirmed: Telegram forgets them.
      if (offset) this.updates = this.updates.filter((u) => u.update_id >= offset || this.unconfirmed.has(u.update_id));
      if (this.updates.length) {
        const out = this.updates.slice(0, limit);
        // A redelivered update is served once; the next offset confirms it for good.
        for (const u of out) if (this.unconfirmed.delete(u.update_id)) this.updates = this.updates.filter((x) => x !== u);
        return out;
      }
      const left = deadline - Date.now();
      if (left <= 0) return [];
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  private checkText(p: Record<string, any>): string {
    const text = typeof p.text === "string" ? p.text : p.text === undefined ? "" : String(p.text);
    if (!text.trim()) throw new ApiError(400, "Bad Request: message text is empty");
    if (p.parse_mode === "HTML") checkHtml(text);
    if (visibleText(text, p.parse_mode).length > 4096) throw new ApiError(400, "Bad Request: message is too long");
    return text;
  }

  /** An inline keyboard as Telegram checks it (form bodies carry it as a JSON string). */
  private replyMarkup(raw: unknown): Record<string, any> | undefined {
    if (raw === undefined) return undefined;
    let m: any = raw;
    if (typeof raw === "string") {
      try {
        m = JSON.parse(raw);
      } catch {
        throw new ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object");
      }
    }
    if (!m || typeof m !== "object") throw new ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object");
    if (m.inline_keyboard === undefined) return m;
    if (!Array.isArray(m.inline_keyboard)) throw new ApiError(400, "Bad Request: field \"inline_keyboard\" must be an Array");
    for (const row of m.inline_keyboard) {
      if (!Array.isArray(row)) throw new ApiError(400, "Bad Request: field \"inline_keyboard\" must be an Array of Array");
      for (const b of row) {
        if (typeof b?.text !== "string" || !b.text) throw new ApiError(400, "Bad Request: can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard");
        if (b.callback_data !== undefined) {
          const n = Buffer.byteLength(String(b.callback_data), "utf8");
          if (n < 1 || n > 64) throw new ApiError(400, "Bad Request: BUTTON_DATA_INVALID");
        } else if (b.url === undefined && b.web_app === undefined) {
          throw new ApiError(400, "Bad Request: can't parse inline keyboard button: InlineKeyboardButton must have exactly one optional field");
        }
      }
    }
    return m;
  }

  private kept(p: Record<string, any>): Record<string, any> {
    const msg = this.messages.get(`${Number(p.chat_id)}:${Number(p.message_id)}`);
    if (!msg) throw new ApiError(400, "Bad Request: message to edit not found");
    return msg;
  }

  private editMessageText(p: Record<string, any>): Record<string, any> {
    const msg = this.kept(p);
    const text = visibleText(this.checkText(p), p.parse_mode);
    const markup = this.replyMarkup(p.reply_markup);
    if (msg.text === text && JSON.stringify(msg.reply_markup) === JSON.stringify(markup)) {
      throw new ApiError(400, "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message");
    }
    msg.text = text;
    msg.edit_date = Math.floor(Date.now() / 1000);
    // Telegram drops the inline keyboard of an edited message unless the edit sends it again.
    if (markup?.inline_keyboard?.length) msg.reply_markup = markup;
    else delete msg.reply_markup;
    return structuredClone(msg);
  }

  private editMessageReplyMarkup(p: Record<string, any>): Record<string, any> {
    const msg = this.kept(p);
    const markup = this.replyMarkup(p.reply_markup);
    const before = JSON.stringify(msg.reply_markup ?? { inline_keyboard: [] });
    const after = JSON.stringify(markup?.inline_keyboard?.length ? markup : { inline_keyboard: [] });
    if (before === after) throw new ApiError(400, "Bad Request: message is not modified: specified new message content and reply markup are exactly the same as a current content and reply markup of the message");
    if (markup?.inline_keyboard?.length) msg.reply_markup = markup;
    else delete msg.reply_markup;
    msg.edit_date = Math.floor(Date.now() / 1000);
    return structuredClone(msg);
  }

  private answerCallbackQuery(p: Record<string, any>): boolean {
    const id = String(p.callback_query_id ?? "");
    if (!this.openQueries.delete(id)) throw new ApiError(400, "Bad Request: query is too old and response timeout expired or query ID is invalid");
    return true;
  }

  private sendMessage(p: Record<string, any>): Record<string, any> {
    if (p.chat_id === undefined || p.chat_id === "") throw new ApiError(400, "Bad Request: chat_id is empty");
    const text = this.checkText(p);
    const markup = this.replyMarkup(p.reply_markup);
    const chatId = Number(p.chat_id);
    const chat = this.chats.get(chatId);
    if (!chat) throw new ApiError(400, "Bad Request: chat not found");
    this.sent.push(p);
    const msg: Record<string, any> = {
      message_id: this.nextMessageId++,
      from: BOT,
      chat,
      date: Math.floor(Date.now() / 1000),
      text: visibleText(text, p.parse_mode),
    };
    if (p.message_thread_id !== undefined) {
      msg.message_thread_id = Number(p.message_thread_id);
      msg.is_topic_message = true;
    }
    if (markup?.inline_keyboard?.length) msg.reply_markup = markup;
    this.messages.set(`${chatId}:${msg.message_id}`, structuredClone(msg));
    this.firstText.set(`${chatId}:${msg.message_id}`, msg.text);
    return msg;
  }
}
