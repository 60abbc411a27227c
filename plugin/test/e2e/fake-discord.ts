// A Discord stand-in on 127.0.0.1 for the end-to-end test: REST API v10 and the Gateway
// WebSocket. OpenClaw's Discord channel is pointed at it with `DISCORD_API_URL`
// (http://127.0.0.1:<port>/api/v10), which moves its REST calls, `GET /gateway/bot` and the
// Gateway origin (ws://127.0.0.1:<port>) here; the plugin honours the same variable.
//
// It speaks the real wire format (discord-api-docs, API v10): `Authorization: Bot <token>`
// (401 `{"message":"401: Unauthorized","code":0}` otherwise); message objects with string
// snowflake ids; create (content 1–2000 characters, else 50006 / 50035), edit (the bot's own
// messages only, else 50005), typing (204), DM channels; 429 with `retry_after` (seconds) in the
// body and `Retry-After` when a test asks for one; `{"message":"404: Not Found","code":0}` for
// routes it does not know (recorded in `unknown`). The Gateway sends HELLO, answers IDENTIFY with
// READY and heartbeats with ACK, and dispatches MESSAGE_CREATE for `inject`. The WebSocket
// server is a minimal RFC 6455 one (JSON text frames, no compression), written here so the test
// needs no dependency.

import { createHash, randomUUID } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import type { Duplex } from "node:stream";

export interface DiscordCall {
  method: string;
  /** The route below /api/v10, e.g. /channels/123/messages. */
  path: string;
  body: any;
  at: number;
  status: number;
}

export const BOT_USER = { id: "1400000000000000001", username: "tunnel-test", discriminator: "0", global_name: null, avatar: null, bot: true };
const APPLICATION_ID = BOT_USER.id;

let snow = BigInt(Date.now() - 1420070400000) << 22n;
/** A fresh snowflake, increasing. */
export function snowflake(): string {
  snow += 1n << 12n;
  return snow.toString();
}

class ApiError extends Error {
  readonly status: number;
  readonly body: Record<string, unknown>;
  constructor(status: number, body: Record<string, unknown>) {
    super(String(body.message));
    this.status = status;
    this.body = body;
  }
}

/** One WebSocket connection (server side): text frames out, text frames in. */
class Socket {
  private buf = Buffer.alloc(0);
  private fragments: Buffer[] = [];
  closed = false;
  private readonly sock: Duplex;
  private readonly onText: (text: string) => void;
  private readonly onClose: () => void;
  constructor(sock: Duplex, onText: (text: string) => void, onClose: () => void) {
    this.sock = sock;
    this.onText = onText;
    this.onClose = onClose;
    sock.on("data", (d: Buffer) => this.read(d));
    sock.on("close", () => this.end());
    sock.on("error", () => this.end());
  }

  send(data: unknown): void {
    if (this.closed) return;
    this.frame(0x1, Buffer.from(JSON.stringify(data)));
  }

  close(code = 1000): void {
    if (this.closed) return;
    const b = Buffer.alloc(2);
    b.writeUInt16BE(code);
    this.frame(0x8, b);
    this.sock.end();
    this.end();
  }

  private end(): void {
    if (this.closed) return;
    this.closed = true;
    this.onClose();
  }

  private frame(opcode: number, payload: Buffer): void {
    const len = payload.length;
    const head = len < 126 ? Buffer.from([0x80 | opcode, len]) : len < 65536 ? Buffer.alloc(4) : Buffer.alloc(10);
    if (len >= 126 && len < 65536) {
      head[0] = 0x80 | opcode;
      head[1] = 126;
      head.writeUInt16BE(len, 2);
    } else if (len >= 65536) {
      head[0] = 0x80 | opcode;
      head[1] = 127;
      head.writeBigUInt64BE(BigInt(len), 2);
    }
    this.sock.write(Buffer.concat([head, payload]));
  }

  private read(d: Buffer): void {
    this.buf = Buffer.concat([this.buf, d]);
    for (;;) {
      if (this.buf.length < 2) return;
      const fin = (this.buf[0] & 0x80) !== 0;
      const opcode = this.buf[0] & 0x0f;
      const masked = (this.buf[1] & 0x80) !== 0;
      let len = this.buf[1] & 0x7f;
      let off = 2;
      if (len === 126) {
        if (this.buf.length < 4) return;
        len = this.buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) return;
        len = Number(this.buf.readBigUInt64BE(2));
        off = 10;
      }
      // A client must mask every frame (RFC 6455 §5.1).
      if (!masked) return this.close(1002);
      if (this.buf.length < off + 4 + len) return;
      const mask = this.buf.subarray(off, off + 4);
      const payload = Buffer.from(this.buf.subarray(off + 4, off + 4 + len));
      for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
      this.buf = this.buf.subarray(off + 4 + len);
      if (opcode === 0x8) return this.close(1000);
      if (opcode === 0x9) {
        this.frame(0xa, payload);
        continue;
      }
      if (opcode === 0xa) continue;
      this.fragments.push(payload);
      if (!fin) continue;
      const text = Buffer.concat(this.fragments).toString("utf8");
      this.fragments = [];
      this.onText(text);
    }
  }
}

export interface InjectOptions {
  content: string;
  userId: string;
  username?: string;
  /** A guild channel; a DM when absent. */
  channelId?: string;
  guildId?: string;
}

export class FakeDiscord {
  readonly calls: DiscordCall[] = [];
  readonly unknown: string[] = [];
  /** Messages in channels, by id, as they are now (after edits). */
  readonly messages = new Map<string, Record<string, any>>();
  /** The content each message was created with (edits do not change it). */
  readonly firstContent = new Map<string, string>();
  /** Gateway IDENTIFY payloads received. */
  readonly identifies: Record<string, any>[] = [];
  private readonly channels = new Map<string, Record<string, any>>();
  private readonly sockets = new Set<Socket>();
  private readonly ready = new Set<Socket>();
  private seq = 0;
  private server: http.Server | undefined;
  /** Routes (`METHOD /path` regexps) that answer 429 once, with this retry_after (seconds). */
  private readonly limits: { route: RegExp; retryAfter: number }[] = [];

  readonly token: string;
  constructor(token: string) {
    this.token = token;
  }

  get port(): number {
    return (this.server!.address() as AddressInfo).port;
  }

  /** What DISCORD_API_URL is set to. */
  get apiUrl(): string {
    return `http://127.0.0.1:${this.port}/api/v10`;
  }

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.on("upgrade", (req, sock) => this.upgrade(req, sock));
    await new Promise<void>((r) => this.server!.listen(0, "127.0.0.1", r));
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.close(1001);
    this.server?.closeAllConnections();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }

  /** Whether a Gateway session is up (READY sent). */
  get connected(): boolean {
    return this.ready.size > 0;
  }

  /** The next request matching `METHOD /path` answers 429 with this retry_after. */
  rateLimitOnce(route: RegExp, retryAfterSeconds: number): void {
    this.limits.push({ route, retryAfter: retryAfterSeconds });
  }

  callsOf(method: string, path: RegExp): DiscordCall[] {
    return this.calls.filter((c) => c.method === method && path.test(c.path));
  }

  /** The DM channel of a user (made on first use, like Discord's). */
  dmChannel(userId: string): Record<string, any> {
    for (const c of this.channels.values()) if (c.type === 1 && c.recipients[0].id === userId) return c;
    const c = { id: snowflake(), type: 1, last_message_id: null, flags: 0, recipients: [this.user(userId)] };
    this.channels.set(c.id, c);
    return c;
  }

  private user(id: string, username = `user${id.slice(-4)}`): Record<string, any> {
    return { id, username, discriminator: "0", global_name: username, avatar: null };
  }

  /** A user writes a message: MESSAGE_CREATE on the Gateway. Returns the message. */
  inject(o: InjectOptions): Record<string, any> {
    const channel = o.channelId ?? this.dmChannel(o.userId).id;
    const msg: Record<string, any> = {
      id: snowflake(),
      channel_id: channel,
      author: this.user(o.userId, o.username),
      content: o.content,
      timestamp: new Date().toISOString(),
      edited_timestamp: null,
      tts: false,
      mention_everyone: false,
      mentions: [],
      mention_roles: [],
      attachments: [],
      embeds: [],
      pinned: false,
      type: 0,
      flags: 0,
      nonce: randomUUID().replace(/-/g, "").slice(0, 19),
      ...(o.guildId ? { guild_id: o.guildId, member: { roles: [], joined_at: new Date().toISOString() } } : {}),
    };
    this.messages.set(msg.id, msg);
    this.dispatch("MESSAGE_CREATE", msg);
    return msg;
  }

  private dispatch(t: string, d: unknown): void {
    for (const s of this.ready) s.send({ op: 0, t, s: ++this.seq, d });
  }

  private upgrade(req: http.IncomingMessage, sock: Duplex): void {
    const key = req.headers["sec-websocket-key"];
    if (req.headers.upgrade?.toLowerCase() !== "websocket" || typeof key !== "string") {
      sock.end("HTTP/1.1 400 Bad Request\r\n\r\n");
      return;
    }
    const accept = createHash("sha1").update(`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest("base64");
    sock.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
    const s: Socket = new Socket(sock, (text) => this.gateway(s, text), () => {
      this.sockets.delete(s);
      this.ready.delete(s);
    });
    this.sockets.add(s);
    s.send({ op: 10, d: { heartbeat_interval: 41250 }, s: null, t: null });
  }

  private gateway(s: Socket, text: string): void {
    let p: { op?: number; d?: any };
    try {
      p = JSON.parse(text);
    } catch {
      return s.close(4002); // decode error
    }
    switch (p.op) {
      case 1: // heartbeat
        s.send({ op: 11, d: null, s: null, t: null });
        return;
      case 2: // identify
        if (p.d?.token !== this.token && p.d?.token !== `Bot ${this.token}`) return s.close(4004); // authentication failed
        this.identifies.push(p.d);
        this.ready.add(s);
        s.send({
          op: 0,
          t: "READY",
          s: ++this.seq,
          d: {
            v: 10,
            user: { ...BOT_USER, verified: true, mfa_enabled: false, flags: 0 },
            guilds: [],
            session_id: randomUUID().replace(/-/g, ""),
            resume_gateway_url: `ws://127.0.0.1:${this.port}`,
            shard: [0, 1],
            application: { id: APPLICATION_ID, flags: 0 },
            private_channels: [],
            relationships: [],
            user_settings: {},
            presences: [],
            guild_join_requests: [],
            geo_ordered_rtc_regions: [],
            session_type: "normal",
            auth_session_id_hash: "",
          },
        });
        return;
      case 3: // presence update
      case 4: // voice state update
      case 8: // request guild members
        return;
      case 6: // resume: not kept; the client identifies again
        s.send({ op: 9, d: false, s: null, t: null });
        return;
      default:
        return s.close(4001); // unknown opcode
    }
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const raw = Buffer.concat(chunks).toString("utf8");
    const url = new URL(req.url ?? "/", "http://x");
    const method = req.method ?? "GET";
    const path = url.pathname.replace(/^\/api\/v10/, "");
    let body: any;
    try {
      body = raw ? JSON.parse(raw) : undefined;
    } catch {
      body = raw;
    }
    const call: DiscordCall = { method, path, body, at: Date.now(), status: 0 };
    this.calls.push(call);
    const reply = (status: number, json?: unknown, headers: Record<string, string> = {}) => {
      call.status = status;
      res.writeHead(status, {
        ...(json === undefined ? {} : { "content-type": "application/json" }),
        "x-ratelimit-limit": "5",
        "x-ratelimit-remaining": "4",
        "x-ratelimit-reset-after": "1",
        "x-ratelimit-reset": String(Date.now() / 1000 + 1),
        "x-ratelimit-bucket": createHash("md5").update(`${method} ${path.replace(/\d{5,}/g, ":id")}`).digest("hex").slice(0, 16),
        ...headers,
      });
      res.end(json === undefined ? undefined : JSON.stringify(json));
    };
    if (!url.pathname.startsWith("/api/v10/")) return reply(404, { message: "404: Not Found", code: 0 });
    if (req.headers.authorization !== `Bot ${this.token}`) return reply(401, { message: "401: Unauthorized", code: 0 });
    const limit = this.limits.findIndex((l) => l.route.test(`${method} ${path}`));
    if (limit >= 0) {
      const { retryAfter } = this.limits.splice(limit, 1)[0];
      return reply(
        429,
        { message: "You are being rate limited.", retry_after: retryAfter, global: false },
        { "retry-after": String(Math.ceil(retryAfter)), "x-ratelimit-scope": "user", "x-ratelimit-remaining": "0" },
      );
    }
    try {
      const [status, json] = this.route(method, path, body);
      reply(status, json);
    } catch (e) {
      if (e instanceof ApiError) return reply(e.status, e.body);
      reply(500, { message: String(e), code: 0 });
    }
  }

  private channel(id: string): Record<string, any> {
    const c = this.channels.get(id);
    if (!c) throw new ApiError(404, { message: "Unknown Channel", code: 10003 });
    return c;
  }

  private checkContent(body: any, create: boolean): void {
    const content = body?.content;
    const other = body?.embeds?.length || body?.components?.length || body?.sticker_ids?.length || body?.attachments?.length;
    if (content === undefined || content === null || content === "") {
      if (create && !other) throw new ApiError(400, { message: "Cannot send an empty message", code: 50006 });
      return;
    }
    if (typeof content !== "string" || [...content].length > 2000) {
      throw new ApiError(400, {
        message: "Invalid Form Body",
        code: 50035,
        errors: { content: { _errors: [{ code: "BASE_TYPE_MAX_LENGTH", message: "Must be 2000 or fewer in length." }] } },
      });
    }
  }

  private route(method: string, path: string, body: any): [number, unknown?] {
    let m: RegExpExecArray | null;
    if (method === "GET" && path === "/gateway/bot") {
      return [200, { url: `ws://127.0.0.1:${this.port}`, shards: 1, session_start_limit: { total: 1000, remaining: 999, reset_after: 0, max_concurrency: 1 } }];
    }
    if (method === "GET" && path === "/gateway") return [200, { url: `ws://127.0.0.1:${this.port}` }];
    if (method === "GET" && path === "/users/@me") return [200, { ...BOT_USER, verified: true, mfa_enabled: false, flags: 0 }];
    if (method === "GET" && (path === "/oauth2/applications/@me" || path === "/applications/@me")) {
      return [200, { id: APPLICATION_ID, name: "tunnel-test", flags: 0, bot_public: false, bot_require_code_grant: false, bot: BOT_USER, owner: this.user("1400000000000000099") }];
    }
    if ((m = /^\/applications\/(\d+)(?:\/guilds\/\d+)?\/commands$/.exec(path))) {
      if (method === "GET") return [200, []];
      if (method === "POST" && body?.name) return [201, { id: snowflake(), application_id: m[1], version: snowflake(), type: 1, ...body }];
      if (method === "PUT" && Array.isArray(body)) {
        return [200, body.map((c: Record<string, unknown>) => ({ id: snowflake(), application_id: m![1], version: snowflake(), type: 1, ...c }))];
      }
    }
    if ((m = /^\/applications\/(\d+)(?:\/guilds\/\d+)?\/commands\/(\d+)$/.exec(path))) {
      if (method === "PATCH") return [200, { id: m[2], application_id: m[1], version: snowflake(), type: 1, ...body }];
      if (method === "DELETE") return [204];
    }
    if (method === "POST" && path === "/users/@me/channels") {
      const id = body?.recipient_id;
      if (typeof id !== "string" || !/^\d+$/.test(id)) throw new ApiError(400, { message: "Invalid Form Body", code: 50035 });
      return [200, this.dmChannel(id)];
    }
    if (method === "GET" && (m = /^\/channels\/(\d+)$/.exec(path))) return [200, this.channel(m[1])];
    if ((m = /^\/channels\/(\d+)\/typing$/.exec(path)) && method === "POST") {
      this.channel(m[1]);
      return [204];
    }
    if ((m = /^\/channels\/(\d+)\/messages$/.exec(path)) && method === "POST") {
      const c = this.channel(m[1]);
      this.checkContent(body, true);
      const msg = {
        id: snowflake(),
        channel_id: c.id,
        author: BOT_USER,
        content: body.content ?? "",
        timestamp: new Date().toISOString(),
        edited_timestamp: null,
        tts: false,
        mention_everyone: false,
        mentions: [],
        mention_roles: [],
        attachments: [],
        embeds: body.embeds ?? [],
        components: body.components ?? [],
        pinned: false,
        type: body.message_reference ? 19 : 0,
        flags: body.flags ?? 0,
        ...(body.message_reference ? { message_reference: body.message_reference } : {}),
      };
      this.messages.set(msg.id, msg);
      this.firstContent.set(msg.id, msg.content);
      c.last_message_id = msg.id;
      return [200, msg];
    }
    if ((m = /^\/channels\/(\d+)\/messages\/(\d+)$/.exec(path))) {
      this.channel(m[1]);
      const msg = this.messages.get(m[2]);
      if (!msg || msg.channel_id !== m[1]) throw new ApiError(404, { message: "Unknown Message", code: 10008 });
      if (method === "GET") return [200, msg];
      if (method === "PATCH") {
        if (msg.author.id !== BOT_USER.id) throw new ApiError(403, { message: "Cannot edit a message authored by another user", code: 50005 });
        this.checkContent(body, false);
        if (typeof body?.content === "string") msg.content = body.content;
        if (Array.isArray(body?.components)) msg.components = body.components;
        msg.edited_timestamp = new Date().toISOString();
        return [200, msg];
      }
      if (method === "DELETE") {
        this.messages.delete(m[2]);
        return [204];
      }
    }
    if ((m = /^\/channels\/(\d+)\/messages\/(\d+)\/reactions\/[^/]+\/@me$/.exec(path)) && (method === "PUT" || method === "DELETE")) {
      this.channel(m[1]);
      return [204];
    }
    this.unknown.push(`${method} ${path}`);
    throw new ApiError(404, { message: "404: Not Found", code: 0 });
  }

  /** Messages the bot posted in a channel, in order, as they are now. */
  botMessages(channelId: string): Record<string, any>[] {
    return [...this.messages.values()].filter((m) => m.channel_id === channelId && m.author.id === BOT_USER.id);
  }
}
