/**
 * llmworker's client for TypeScript: submit tasks, follow their events, wait for their
 * records, publish through QStash, and verify the callbacks the worker signs.
 *
 * It needs nothing but `fetch` (Node 20+, edge runtimes, browsers behind the app's own
 * backend: never ship an API key to a browser). `publish` loads `@upstash/qstash` and
 * `verifyCallback` loads `standardwebhooks` when called: install them where you use them.
 *
 * The types come from the worker's OpenAPI document (`src/schema.ts`, generated).
 */

import type { components } from "./schema.js";

type Schemas = components["schemas"];
export type TaskRecord = Schemas["TaskRecord"];
export type TaskSpec = Schemas["TaskSpec"];
export type ErrorAnswer = Schemas["ErrorAnswer"];
export type StatusEvent = Schemas["StatusEvent"];
export type TextEvent = Schemas["TextEvent"];
export type Usage = Schemas["Usage"];
export type Quota = Schemas["Quota"];

/** One of a task's events; the last is its final record. `id` resumes after it. */
export type TaskEvent =
  | { type: "status"; id: string | null; data: StatusEvent }
  | { type: "tokens" | "reasoning"; id: string | null; data: TextEvent }
  | { type: "progress"; id: string | null; data: Record<string, unknown> }
  | { type: "record"; id: string | null; data: TaskRecord };

/** A submission's fields besides `kind` and `input`. */
export type TaskFields = Partial<Omit<TaskSpec, "kind" | "input">>;

export interface ClientOptions {
  /** The worker's URL; default LLMWORKER_URL, else http://127.0.0.1:8080. */
  url?: string;
  /** An API_KEYS or ADMIN_KEYS entry; default LLMWORKER_API_KEY. */
  apiKey?: string;
  /** An admin key acting for this tenant (`?tenant=` on every request). */
  tenant?: string;
  /** Failed reconnections in a row before `events` gives up (default 5). */
  reconnects?: number;
  /** Milliseconds a request (not an event stream) may take (default 30,000). */
  timeoutMs?: number;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
}

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
// The worker writes a comment on a quiet stream every 15 s: past this, the connection is
// taken for half-open and followed again.
const STREAM_IDLE_MS = 45_000;
// A proxy whose replicas restart answers these: the stream is followed again.
const RETRIED_STATUSES = new Set([502, 503, 504]);

/** The worker refused a request: its `error` code, `message`, and what helps. */
export class LLMWorkerError extends Error {
  readonly status: number;
  readonly error: string;
  readonly field?: string;
  /** Seconds to wait before trying again (429: Retry-After). */
  readonly retryAfter?: number;
  readonly body: unknown;

  constructor(status: number, body: unknown, retryAfter?: number) {
    const answer = (typeof body === "object" && body !== null ? body : {}) as Partial<ErrorAnswer>;
    const message = answer.message ?? (typeof body === "string" ? body : `HTTP ${status}`);
    super(`${status} ${answer.error ?? "error"}: ${message}`);
    this.name = "LLMWorkerError";
    this.status = status;
    this.error = answer.error ?? "http_error";
    this.field = answer.field ?? undefined;
    this.retryAfter = retryAfter ?? answer.retry_after ?? undefined;
    this.body = body;
  }
}

/** The worker could not be reached (or a stream could not be followed again). */
export class WorkerUnreachable extends Error {
  readonly url: string;

  constructor(url: string, what: string, cause: unknown) {
    super(`${what}: the worker at ${url} could not be reached (${describe(cause)})`, { cause });
    this.name = "WorkerUnreachable";
    this.url = url;
  }
}

function describe(cause: unknown): string {
  if (cause instanceof Error) {
    const inner = (cause as { cause?: unknown }).cause;
    return inner instanceof Error ? `${cause.message}: ${inner.message}` : cause.message;
  }
  return String(cause);
}

function env(name: string): string | undefined {
  // Edge runtimes and browsers have no process.
  const p = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return p?.env?.[name] || undefined;
}

const QSTASH_MODULE = "@upstash/qstash";
const WEBHOOKS_MODULE = "standardwebhooks";

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(signal.reason);
      },
      { once: true },
    );
  });

/** The complete lines at the start of `buffer` (a line break is \r\n, \n or \r; a
 * final \r waits for the next chunk, which may bring its \n). */
function takeLines(buffer: string): { text: string; length: number; end: number }[] {
  const lines: { text: string; length: number; end: number }[] = [];
  let start = 0;
  while (start < buffer.length) {
    const rest = buffer.slice(start);
    const at = rest.search(/\r\n|\r|\n/);
    if (at < 0 || (rest[at] === "\r" && at === rest.length - 1)) break;
    const end = rest[at] === "\r" && rest[at + 1] === "\n" ? 2 : 1;
    lines.push({ text: rest.slice(0, at), length: at, end });
    start += at + end;
  }
  return lines;
}

/** Reads Server-Sent Events: one event per blank line, comments skipped. */
class SSEParser {
  private id: string | null = null;
  private type = "message";
  private data: string[] = [];

  line(line: string): { id: string | null; type: string; data: string } | null {
    if (line === "") {
      if (this.data.length === 0) {
        this.type = "message";
        return null;
      }
      const event = { id: this.id, type: this.type, data: this.data.join("\n") };
      this.id = null;
      this.type = "message";
      this.data = [];
      return event;
    }
    if (line.startsWith(":")) return null; // a keep-alive comment
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "id") this.id = value;
    else if (name === "event") this.type = value;
    else if (name === "data") this.data.push(value);
    return null;
  }

  reset(): void {
    this.id = null;
    this.type = "message";
    this.data = [];
  }
}

export class LLMWorker {
  readonly url: string;
  private readonly headers: Record<string, string>;
  private readonly tenant?: string;
  private readonly reconnects: number;
  private readonly timeoutMs: number;
  private readonly fetch: typeof fetch;

  constructor(options: ClientOptions = {}) {
    this.url = (options.url ?? env("LLMWORKER_URL") ?? "http://127.0.0.1:8080").replace(/\/+$/, "");
    const key = options.apiKey ?? env("LLMWORKER_API_KEY");
    this.headers = key ? { authorization: `Bearer ${key}` } : {};
    this.tenant = options.tenant;
    this.reconnects = options.reconnects ?? 5;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  private address(path: string, query: Record<string, string | undefined> = {}): string {
    const url = new URL(this.url + path);
    for (const [name, value] of Object.entries({ ...query, tenant: this.tenant })) {
      if (value !== undefined) url.searchParams.set(name, value);
    }
    return url.toString();
  }

  private async request<T>(
    method: string,
    path: string,
    options: { body?: unknown; query?: Record<string, string | undefined> } = {},
  ): Promise<T> {
    const headers: Record<string, string> = { ...this.headers, accept: "application/json" };
    if (options.body !== undefined) headers["content-type"] = "application/json";
    let response: Response;
    try {
      response = await this.fetch(this.address(path, options.query), {
        method,
        headers,
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (cause) {
      throw new WorkerUnreachable(this.url, `${method} ${path}`, cause);
    }
    return (await answer(response)) as T;
  }

  /** Queue a task; its record (status `queued`). A repeated `id` or `idempotency_key`
   * answers the task admitted before. */
  submit(kind: string, input: unknown = {}, fields: TaskFields = {}): Promise<TaskRecord> {
    return this.request("POST", "/v1/tasks", { body: { kind, input, ...fields } });
  }

  get(taskId: string): Promise<TaskRecord> {
    return this.request("GET", `/v1/tasks/${encodeURIComponent(taskId)}`);
  }

  /** The task admitted with this idempotency key (for a published task: QStash's
   * message id). */
  find(idempotencyKey: string): Promise<TaskRecord> {
    return this.request("GET", "/v1/tasks", { query: { idempotency_key: idempotencyKey } });
  }

  /** Cancel: a queued task never runs, a running one stops. */
  cancel(taskId: string): Promise<TaskRecord> {
    return this.request("DELETE", `/v1/tasks/${encodeURIComponent(taskId)}`);
  }

  /** A new task from a finished task's input (`retry_of` names the old one). */
  retry(taskId: string): Promise<TaskRecord> {
    return this.request("POST", `/v1/tasks/${encodeURIComponent(taskId)}/retry`, { body: {} });
  }

  /** Token and cost totals (`from`/`to`: YYYY-MM-DD or `7d`; `group_by`: day, model,
   * tier or user). */
  usage(query: Record<string, string | undefined> = {}): Promise<Usage> {
    return this.request("GET", "/v1/usage", { query });
  }

  /** A user's limits, used, reserved and remaining today and this month, and credits. */
  quota(user: string, tier?: string): Promise<Quota> {
    return this.request("GET", `/v1/users/${encodeURIComponent(user)}/quota`, { query: { tier } });
  }

  /**
   * The task's events as they happen, ending with its final record. A dropped stream is
   * followed again after the last event seen (`Last-Event-ID`), on any replica; after
   * `reconnects` failed tries in a row it gives up with {@link WorkerUnreachable} (or the
   * worker's last refusal).
   */
  async *events(
    taskId: string,
    options: { lastEventId?: string; signal?: AbortSignal } = {},
  ): AsyncGenerator<TaskEvent, void, undefined> {
    const path = `/v1/tasks/${encodeURIComponent(taskId)}/events`;
    let last = options.lastEventId ?? "0-0";
    let failures = 0;
    const parser = new SSEParser();
    while (true) {
      // Each connection has its own abort: the caller's signal, or a stream silent past
      // STREAM_IDLE_MS (the worker sends a comment every 15 s: a silent one is half-open).
      const connection = new AbortController();
      const abort = () => connection.abort(options.signal?.reason);
      options.signal?.addEventListener("abort", abort, { once: true });
      let idle: ReturnType<typeof setTimeout> | undefined;
      const watch = (ms: number) => {
        clearTimeout(idle);
        idle = setTimeout(() => connection.abort(new Error(`no data for ${ms} ms`)), ms);
      };
      let reader: ReadableStreamDefaultReader<string> | undefined;
      let delivered = false;
      try {
        watch(this.timeoutMs);
        const response = await this.fetch(this.address(path), {
          headers: { ...this.headers, accept: "text/event-stream", "last-event-id": last },
          signal: connection.signal,
        });
        if (!response.ok || !response.body) await answer(response);
        reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        parser.reset();
        while (true) {
          watch(STREAM_IDLE_MS);
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          for (const line of takeLines(buffer)) {
            buffer = buffer.slice(line.length + line.end);
            const raw = parser.line(line.text);
            if (raw === null) continue;
            failures = 0;
            delivered = true;
            if (raw.id) last = raw.id;
            const event = { type: raw.type, id: raw.id, data: JSON.parse(raw.data) } as TaskEvent;
            yield event;
            if (event.type === "record") return;
          }
        }
        // The stream ended without the record: the replica serving it stopped (follow it
        // on another one), or the task expired meanwhile.
        const record = await this.get(taskId);
        if (record.status && FINAL.has(record.status)) {
          yield { type: "record", id: null, data: record };
          return;
        }
        // Ended with nothing new (a replica that keeps closing it): counted as a failure.
        if (!delivered && ++failures > this.reconnects) {
          throw new WorkerUnreachable(this.url, `following task ${taskId} (its stream keeps ending)`, "no events");
        }
        await sleep(delivered ? 100 : 250 * 2 ** failures, options.signal);
      } catch (error) {
        if (options.signal?.aborted) throw error;
        if (error instanceof WorkerUnreachable && error.message.includes("keeps ending")) throw error;
        if (error instanceof LLMWorkerError && !RETRIED_STATUSES.has(error.status)) throw error;
        failures += 1;
        if (failures > this.reconnects) {
          if (error instanceof LLMWorkerError || error instanceof WorkerUnreachable) throw error;
          throw new WorkerUnreachable(
            this.url,
            `following task ${taskId} (gave up after ${this.reconnects} reconnections)`,
            error,
          );
        }
        await sleep(250 * 2 ** failures, options.signal);
      } finally {
        // Also when the caller stops early (break, an exception): the worker's side of the
        // stream is closed, not left open.
        clearTimeout(idle);
        options.signal?.removeEventListener("abort", abort);
        await reader?.cancel().catch(() => undefined);
        connection.abort();
      }
    }
  }

  /** The task's final record: its events followed to the end, or, with `timeoutMs`,
   * its record asked for until then (then a TimeoutError). */
  async wait(taskId: string, options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<TaskRecord> {
    if (options.timeoutMs === undefined) {
      for await (const event of this.events(taskId, { signal: options.signal })) {
        if (event.type === "record") return event.data;
      }
      throw new Error("unreachable: events() ends with the record");
    }
    const deadline = Date.now() + options.timeoutMs;
    while (true) {
      const record = await this.get(taskId);
      if (record.status && FINAL.has(record.status)) return record;
      const left = deadline - Date.now();
      if (left <= 0) {
        const error = new Error(`task ${taskId} did not finish within ${options.timeoutMs} ms`);
        error.name = "TimeoutError";
        throw error;
      }
      await sleep(Math.min(200, left), options.signal);
    }
  }

  /** Submit and wait: the final record. */
  async run(kind: string, input: unknown = {}, fields: TaskFields = {}): Promise<TaskRecord> {
    return this.wait((await this.submit(kind, input, fields)).id);
  }

  /**
   * Publish the task through QStash to the worker's `/v1/qstash` (`workerUrl`, else
   * PUBLIC_URL, else this client's URL); QStash's message id, which becomes the task's
   * idempotency key ({@link find}, {@link waitPublished}). Needs `@upstash/qstash`.
   */
  async publish(
    kind: string,
    input: unknown = {},
    options: TaskFields & {
      qstashToken?: string;
      qstashUrl?: string;
      workerUrl?: string;
      deduplicationId?: string;
      delay?: number;
    } = {},
  ): Promise<string> {
    const { qstashToken, qstashUrl, workerUrl, deduplicationId, delay, ...fields } = options;
    const token = qstashToken ?? env("QSTASH_TOKEN");
    if (!token) {
      throw new Error(
        "QSTASH_TOKEN is not set: publish() sends through QStash and needs its token " +
          "(Upstash console, QStash), as qstashToken or in the environment",
      );
    }
    let module: typeof import("@upstash/qstash");
    try {
      // Left to the runtime: bundlers must not require an optional peer at build time.
      module = await import(/* webpackIgnore: true */ /* @vite-ignore */ QSTASH_MODULE);
    } catch {
      throw new Error("publish() needs the @upstash/qstash package: npm install @upstash/qstash");
    }
    const qstash = new module.Client({ token, baseUrl: qstashUrl ?? env("QSTASH_URL") });
    const target = (workerUrl ?? env("PUBLIC_URL") ?? this.url).replace(/\/+$/, "");
    const sent = await qstash.publishJSON({
      url: `${target}/v1/qstash`,
      body: { kind, input, ...fields },
      ...(deduplicationId ? { deduplicationId } : {}),
      ...(delay !== undefined ? { delay } : {}),
    });
    return (sent as { messageId: string }).messageId;
  }

  /** The final record of a task published through QStash: found by its message id once
   * QStash has delivered it, then followed to its end. */
  async waitPublished(messageId: string, options: { timeoutMs?: number } = {}): Promise<TaskRecord> {
    const deadline = options.timeoutMs === undefined ? Infinity : Date.now() + options.timeoutMs;
    let delay = 50;
    while (true) {
      try {
        const found = await this.find(messageId);
        const left = deadline - Date.now();
        return await this.wait(found.id, Number.isFinite(left) ? { timeoutMs: Math.max(0, left) } : {});
      } catch (error) {
        if (!(error instanceof LLMWorkerError) || error.status !== 404) throw error;
      }
      if (Date.now() >= deadline) {
        const error = new Error(`QStash message ${messageId} was not delivered in time`);
        error.name = "TimeoutError";
        throw error;
      }
      delay = Math.min(delay * 2, 1000);
      await sleep(Math.min(delay, Math.max(0, deadline - Date.now())));
    }
  }
}

async function answer(response: Response): Promise<unknown> {
  const text = await response.text();
  let body: unknown = text;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: kept as text
  }
  if (response.status >= 400) {
    const header = response.headers.get("retry-after");
    const seconds = header === null ? undefined : Number(header);
    throw new LLMWorkerError(response.status, body, Number.isFinite(seconds) ? seconds : undefined);
  }
  return body;
}

/**
 * Verify a callback the worker signed (Standard Webhooks: `webhook-id`,
 * `webhook-timestamp`, `webhook-signature`, keyed by CALLBACK_SECRET); the task's record.
 * Throws when the signature, or the timestamp (5 minutes' tolerance), does not hold.
 * Pass the raw body as received (before any JSON parsing). Needs `standardwebhooks`.
 */
export async function verifyCallback(
  body: string,
  headers: Headers | Record<string, string | string[] | undefined>,
  secret: string,
): Promise<TaskRecord> {
  let module: typeof import("standardwebhooks");
  try {
    module = await import(/* webpackIgnore: true */ /* @vite-ignore */ WEBHOOKS_MODULE);
  } catch {
    throw new Error("verifyCallback() needs the standardwebhooks package: npm install standardwebhooks");
  }
  const get = (name: string): string => {
    const value = headers instanceof Headers ? headers.get(name) : headers[name] ?? headers[name.toLowerCase()];
    return Array.isArray(value) ? value[0] ?? "" : value ?? "";
  };
  const signed = {
    "webhook-id": get("webhook-id"),
    "webhook-timestamp": get("webhook-timestamp"),
    "webhook-signature": get("webhook-signature"),
  };
  return new module.Webhook(secret).verify(body, signed) as TaskRecord;
}
