// Chat message ids for Idempotency-Key.
//
// A command handler's context carries no message id, but OpenClaw's `message_received` hook
// does. The hook remembers (channel, sender, text) → message id for a short while, and the
// command handler takes the id of the message that carried its command. When no id is known
// the submit goes without a key (a retry could then run twice, which is what a chat user
// resending the same text on purpose expects anyway).

export interface MessageKey {
  channel: string;
  senderId?: string;
  text: string;
}

interface Entry {
  id: string;
  at: number;
}

const TTL_MS = 120_000;
const MAX = 500;

/** `/cc@my_bot  hello` and `/cc hello` are the same command. */
export function normalizeCommandText(text: string): string {
  return text
    .trim()
    .replace(/^(\/[A-Za-z0-9_-]+)@[A-Za-z0-9_]+/, "$1")
    .replace(/\s+/g, " ");
}

function key(k: MessageKey): string {
  return `${k.channel.toLowerCase()}\u001f${k.senderId ?? ""}\u001f${normalizeCommandText(k.text)}`;
}

export class MessageIds {
  private readonly entries = new Map<string, Entry[]>();
  private readonly now: () => number;

  constructor(now: () => number = Date.now) {
    this.now = now;
  }

  remember(k: MessageKey, messageId: string): void {
    if (!messageId || !k.text.trim().startsWith("/")) return;
    const kk = key(k);
    const list = this.entries.get(kk) ?? [];
    if (list.some((e) => e.id === messageId)) return;
    list.push({ id: messageId, at: this.now() });
    this.entries.set(kk, list);
    if (this.entries.size > MAX) this.prune();
  }

  /** The oldest unclaimed id for this message, removed so a second identical message gets its own. */
  take(k: MessageKey): string | undefined {
    const kk = key(k);
    const cutoff = this.now() - TTL_MS;
    const list = (this.entries.get(kk) ?? []).filter((e) => e.at >= cutoff);
    const first = list.shift();
    if (list.length) this.entries.set(kk, list);
    else this.entries.delete(kk);
    return first?.id;
  }

  private prune(): void {
    const cutoff = this.now() - TTL_MS;
    for (const [k, list] of this.entries) {
      const keep = list.filter((e) => e.at >= cutoff);
      if (keep.length) this.entries.set(k, keep);
      else this.entries.delete(k);
    }
  }
}

const KEY = Symbol.for("openclaw-plugin-tunnel.msgids");

export function sharedMessageIds(): MessageIds {
  const g = globalThis as unknown as Record<symbol, MessageIds | undefined>;
  return (g[KEY] ??= new MessageIds());
}
