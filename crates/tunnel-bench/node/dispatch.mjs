// tunnel-bench's Node client (phase 1c): dispatch as the original runner and plugin see it.
//
// Node's own `http` module with keep-alive agents, as the plugin and the original runner use.
// For each idle gap (ms): N times, a runner long-poll parks (the original API's
// `GET /worker/poll`, then API v1's `POST /v1/claim`), the client waits the gap, submits
// (`POST /claude`, `POST /v1/tasks`) and the time from just before the submit is sent to the
// poll's answer read is one sample; the task is then finished (`POST /worker/result`, or ack
// and finish). After the same gap, a bare `GET /health` on the client's connection is timed
// for comparison. Prints one JSON object on stdout: {gaps: [{gap_ms, compat: [ms…],
// v1: [ms…], health: [ms…]}]}.
//
// Usage: node dispatch.mjs URL TOKEN N GAP_MS[,GAP_MS…]

import http from "node:http";

const [url, token, nArg, gapsArg] = process.argv.slice(2);
if (!url || !token || !nArg || !gapsArg) {
  console.error("usage: node dispatch.mjs URL TOKEN N GAP_MS[,GAP_MS…]");
  process.exit(2);
}
const n = Number(nArg);
const gaps = gapsArg.split(",").map(Number);
const base = new URL(url);
// One keep-alive connection each: the runner's poll and the client's calls never share one.
const pollAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const clientAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function call(agent, method, path, body) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      {
        host: base.hostname,
        port: base.port,
        method,
        path,
        agent,
        headers: {
          authorization: `Bearer ${token}`,
          ...(data === undefined
            ? {}
            : { "content-type": "application/json", "content-length": Buffer.byteLength(data) }),
        },
      },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () => {
          const at = process.hrtime.bigint();
          const text = Buffer.concat(chunks).toString();
          if (res.statusCode >= 300 && res.statusCode !== 204) {
            reject(new Error(`${method} ${path} answered ${res.statusCode}: ${text.slice(0, 300)}`));
            return;
          }
          resolve({ at, status: res.statusCode, body: text ? JSON.parse(text) : null });
        });
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end(data);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const ms = (from, to) => Number(to - from) / 1e6;

// How long until the poll has parked: it is sent before the gap starts, and a poll parks in
// well under a millisecond; with no gap, this much.
const PARK_MS = 5;

async function compatOnce(gap, i) {
  const poll = call(pollAgent, "GET", "/worker/poll?wait=30000");
  await sleep(Math.max(gap, PARK_MS));
  const t0 = process.hrtime.bigint();
  const sub = await call(clientAgent, "POST", "/claude", { prompt: `node compat ${gap} ${i}` });
  const got = await poll;
  if (!got.body || got.body.id !== sub.body.taskId) {
    throw new Error(`the poll was handed ${JSON.stringify(got.body)?.slice(0, 200)}, not ${sub.body.taskId}`);
  }
  const sample = ms(t0, got.at);
  await call(clientAgent, "POST", "/worker/result", { taskId: sub.body.taskId, stdout: "done", exitCode: 0 });
  return sample;
}

async function v1Once(gap, i) {
  const runner = `node-bench-${gap}`;
  const poll = call(pollAgent, "POST", "/v1/claim", { runner, agents: ["bench"], wait_ms: 30000 });
  await sleep(Math.max(gap, PARK_MS));
  const t0 = process.hrtime.bigint();
  const sub = await call(clientAgent, "POST", "/v1/tasks", { agent: "bench", prompt: `node v1 ${gap} ${i}` });
  const got = await poll;
  if (got.status !== 200 || got.body.task.id !== sub.body.id) {
    throw new Error(`the claim was answered ${got.status} with ${JSON.stringify(got.body)?.slice(0, 200)}, not ${sub.body.id}`);
  }
  const sample = ms(t0, got.at);
  const at = { attempt: got.body.attempt, lease_token: got.body.lease_token };
  const id = sub.body.id;
  await call(clientAgent, "POST", `/v1/tasks/${id}/ack`, at);
  const done = await call(clientAgent, "POST", `/v1/tasks/${id}/finish`, {
    ...at,
    outcome: "succeeded",
    result: { text: "done" },
  });
  if (done.body.state !== "succeeded") throw new Error(`finish answered state ${done.body.state}`);
  return sample;
}

async function healthOnce(gap) {
  await sleep(Math.max(gap, PARK_MS));
  const t0 = process.hrtime.bigint();
  const got = await call(clientAgent, "GET", "/health");
  return ms(t0, got.at);
}

const out = { node: process.version, gaps: [] };
for (const gap of gaps) {
  const row = { gap_ms: gap, compat: [], v1: [], health: [] };
  // Interleaved, so a change in the machine's load touches all three alike.
  for (let i = 0; i < n; i++) {
    row.compat.push(await compatOnce(gap, i));
    row.v1.push(await v1Once(gap, i));
    row.health.push(await healthOnce(gap));
  }
  out.gaps.push(row);
}
pollAgent.destroy();
clientAgent.destroy();
process.stdout.write(JSON.stringify(out) + "\n");
