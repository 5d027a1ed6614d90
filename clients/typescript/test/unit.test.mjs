// The client's stream reading, without a worker: a fetch that answers what the test says.
import assert from "node:assert/strict";
import { test } from "node:test";

import { LLMWorker } from "../dist/index.js";

/** A body of these chunks; it ends after them unless `onCancel` is given (then it stays
 * open, as a live stream does, until cancelled). */
function streamOf(chunks, onCancel) {
  return new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
      if (!onCancel) controller.close();
    },
    cancel: onCancel,
  });
}

const record = { id: "t1", status: "succeeded", result: { content: "ab" } };

test("events split anywhere, even inside a CRLF, keep their ids", async () => {
  const chunks = [
    "id: 1-0\r",
    "\nevent: tokens\r\ndata: {\"text\":\"a\"}\r\n\r",
    "\n: keep-alive\r\nid: 2-0\r\nevent: tokens\r\ndata: {\"text\":",
    "\"b\"}\n\nevent: record\ndata: " + JSON.stringify(record) + "\n\n",
  ];
  const fetch = async () => new Response(streamOf(chunks), { headers: { "content-type": "text/event-stream" } });
  const worker = new LLMWorker({ url: "http://worker.test", fetch });
  const seen = [];
  for await (const event of worker.events("t1")) seen.push([event.type, event.id]);
  assert.deepEqual(seen, [["tokens", "1-0"], ["tokens", "2-0"], ["record", null]]);
});

test("a caller that stops early closes the stream", async () => {
  let cancelled = 0;
  const chunks = ["id: 1-0\nevent: tokens\ndata: {\"text\":\"a\"}\n\n"];
  const fetch = async () => new Response(streamOf(chunks, () => (cancelled += 1)));
  const worker = new LLMWorker({ url: "http://worker.test", fetch });
  for await (const event of worker.events("t1")) {
    assert.equal(event.type, "tokens");
    break;
  }
  assert.equal(cancelled, 1, "the response body was cancelled");
});

test("a stream that keeps ending with nothing new is given up, saying so", async () => {
  let calls = 0;
  const fetch = async (url) => {
    calls += 1;
    if (String(url).includes("/events")) return new Response(streamOf([]));
    return Response.json({ id: "t1", status: "running" });
  };
  const worker = new LLMWorker({ url: "http://worker.test", fetch, reconnects: 1 });
  await assert.rejects(
    (async () => {
      for await (const _ of worker.events("t1")) {
        // nothing
      }
    })(),
    /keeps ending/,
  );
  assert.ok(calls >= 4);
});
