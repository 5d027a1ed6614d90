// The client against a real `llmworker serve` (started by tests/test_typescript_client.py,
// which passes LLMWORKER_URL and CALLBACK_SECRET): node --test test/
import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import { test } from "node:test";

import { LLMWorker, LLMWorkerError, WorkerUnreachable, verifyCallback } from "../dist/index.js";

const URL_ = process.env.LLMWORKER_URL;
const SECRET = process.env.CALLBACK_SECRET;
assert.ok(URL_, "LLMWORKER_URL names the worker under test");
const worker = new LLMWorker({ url: URL_ });
const chat = (content) => ({ messages: [{ role: "user", content }] });

test("submit, get, find, wait, run and retry a task", async () => {
  const key = `ts-${Date.now()}`;
  const queued = await worker.submit("chat", chat("hello from ts"), { user: "ts-user", idempotency_key: key });
  assert.equal(queued.status, "queued");
  assert.equal((await worker.get(queued.id)).id, queued.id);
  assert.equal((await worker.find(key)).id, queued.id);
  const again = await worker.submit("chat", chat("hello from ts"), { user: "ts-user", idempotency_key: key });
  assert.equal(again.id, queued.id, "the same idempotency key finds the same task");
  const done = await worker.wait(queued.id);
  assert.equal(done.status, "succeeded");
  assert.match(JSON.stringify(done.result), /simulated reply/);
  const ran = await worker.run("chat", chat("and again"), { user: "ts-user" });
  assert.equal(ran.status, "succeeded");
  const retried = await worker.retry(ran.id);
  assert.equal(retried.retry_of, ran.id);
  assert.equal((await worker.wait(retried.id, { timeoutMs: 20_000 })).status, "succeeded");
});

test("cancel a queued task", async () => {
  // One task at a time per free user: the second waits, and is cancelled there.
  const first = await worker.submit("chat", chat("first"), { user: "ts-cancel" });
  const second = await worker.submit("chat", chat("second"), { user: "ts-cancel" });
  const cancelled = await worker.cancel(second.id);
  assert.equal(cancelled.status, "cancelled");
  assert.equal((await worker.wait(second.id)).status, "cancelled");
  await worker.wait(first.id);
});

test("errors carry the worker's error, message, field and retry_after", async () => {
  await assert.rejects(worker.submit("no-such-kind", {}), (error) => {
    assert.ok(error instanceof LLMWorkerError);
    assert.equal(error.status, 422);
    assert.equal(error.error, "invalid_field");
    assert.equal(error.field, "kind");
    assert.match(error.message, /Unknown kind/);
    return true;
  });
  await assert.rejects(worker.get("01ZZZZZZZZZZZZZZZZZZZZZZZZ"), (error) => error.status === 404);
  // A user allowed one task a day: the second is refused until the day resets.
  const put = await fetch(`${URL_}/v1/users/ts-quota/quota`, {
    method: "PUT",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ tasks_per_day: 1 }),
  });
  assert.equal(put.status, 200);
  await worker.submit("chat", chat("one"), { user: "ts-quota" });
  await assert.rejects(worker.submit("chat", chat("two"), { user: "ts-quota" }), (error) => {
    assert.equal(error.error, "quota_exceeded");
    assert.ok(error.retryAfter > 0, "Retry-After is read");
    return true;
  });
});

/** A TCP proxy to the worker that cuts its first connection once `after` bytes of the
 * answer went through: an event stream dropped mid-way. */
function cuttingProxy(target, after) {
  const { hostname, port } = new URL(target);
  let connections = 0;
  const server = net.createServer((client) => {
    const first = connections++ === 0;
    const upstream = net.connect(Number(port), hostname);
    let seen = 0;
    client.pipe(upstream);
    upstream.on("data", (chunk) => {
      seen += chunk.length;
      client.write(chunk);
      if (first && seen >= after) {
        client.destroy();
        upstream.destroy();
      }
    });
    upstream.on("end", () => client.end());
    upstream.on("error", () => client.destroy());
    client.on("error", () => upstream.destroy());
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve({ server, url: `http://127.0.0.1:${server.address().port}`, count: () => connections })),
  );
}

test("events resume after a dropped stream, losing and repeating nothing", async () => {
  const task = await worker.submit("chat", { ...chat("stream me"), stream: true }, { user: "ts-stream" });
  const proxy = await cuttingProxy(URL_, 700);
  try {
    const through = new LLMWorker({ url: proxy.url });
    const seen = [];
    let text = "";
    let record;
    for await (const event of through.events(task.id)) {
      if (event.id) seen.push(event.id);
      if (event.type === "tokens") text += event.data.text;
      if (event.type === "record") record = event.data;
    }
    assert.ok(proxy.count() >= 2, "the stream was dropped and followed again");
    assert.equal(new Set(seen).size, seen.length, "no event twice");
    const sorted = [...seen].sort((a, b) => (BigInt(a.split("-")[0]) < BigInt(b.split("-")[0]) ? -1 : 1));
    assert.deepEqual(seen, sorted, "events in order");
    assert.equal(record.status, "succeeded");
    assert.equal(text, record.result.content, "the streamed text is the answer, whole");
  } finally {
    proxy.server.close();
  }
});

test("events give up after a few failed reconnections, saying so", async () => {
  const closed = net.createServer();
  await new Promise((resolve) => closed.listen(0, "127.0.0.1", resolve));
  const port = closed.address().port;
  await new Promise((resolve) => closed.close(resolve));
  const nowhere = new LLMWorker({ url: `http://127.0.0.1:${port}`, reconnects: 2 });
  const started = Date.now();
  await assert.rejects(
    (async () => {
      for await (const _ of nowhere.events("01ZZZZZZZZZZZZZZZZZZZZZZZZ")) {
        // nothing arrives
      }
    })(),
    (error) => {
      assert.ok(error instanceof WorkerUnreachable);
      assert.match(error.message, /gave up after 2 reconnections/);
      assert.match(error.message, new RegExp(`127.0.0.1:${port}`));
      return true;
    },
  );
  assert.ok(Date.now() - started >= 500, "it backed off between tries");
});

test("a callback the worker sent is verified, a forged one is not", async () => {
  assert.ok(SECRET, "CALLBACK_SECRET is the worker's");
  let resolveCallback;
  const received = new Promise((resolve) => (resolveCallback = resolve));
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      res.writeHead(200).end();
      resolveCallback({ body, headers: req.headers });
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const url = `http://127.0.0.1:${server.address().port}/hook`;
    const task = await worker.submit("chat", chat("call me back"), { user: "ts-hook", callback_url: url });
    const { body, headers } = await received;
    const record = await verifyCallback(body, headers, SECRET);
    assert.equal(record.id, task.id);
    assert.equal(record.status, "succeeded");
    await assert.rejects(verifyCallback(body.replace("succeeded", "failed"), headers, SECRET));
    await assert.rejects(verifyCallback(body, headers, "whsec_" + Buffer.from("x".repeat(32)).toString("base64")));
  } finally {
    server.close();
  }
});

test("publish through QStash, then find and wait for the task by its message id", async () => {
  assert.ok(process.env.QSTASH_URL, "QStash (qstash-dev) runs beside the worker");
  const messageId = await worker.publish("chat", chat("published from ts"), { user: "ts-pub", tier: "paid" });
  assert.match(messageId, /\S+/);
  const record = await worker.waitPublished(messageId, { timeoutMs: 30_000 });
  assert.equal(record.status, "succeeded");
  assert.equal(record.idempotency_key, messageId, "the message id is the task's idempotency key");
  assert.equal(record.qstash?.message_id, messageId);
  assert.equal((await worker.find(messageId)).id, record.id);
});
