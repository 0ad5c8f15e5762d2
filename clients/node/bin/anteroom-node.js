#!/usr/bin/env node
'use strict';
// anteroom-node [--redis URL] [--queue Q] [--concurrency N] [--heartbeat-ttl D] [--grace D] ./app.js
// Serves a Node request listener `(req, res)` or an Express app, exported by
// app.js (module.exports, or its `default` or `app`), from an Anteroom queue.

const path = require('node:path');
const { parseArgs } = require('node:util');
const { Dispatcher } = require('../lib/dispatcher');

const UNITS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** "3s", "500ms", "1m" or plain seconds, in milliseconds. */
function duration(text, flag) {
  const match = /^\s*([0-9.]+)\s*(ms|s|m|h)?\s*$/.exec(text);
  if (!match) {
    console.error(`anteroom-node: ${flag}: not a duration: ${JSON.stringify(text)} (e.g. 3s, 500ms, 1m)`);
    process.exit(2);
  }
  return Number(match[1]) * UNITS[match[2] ?? 's'];
}

const usage = 'usage: anteroom-node [--redis URL] [--queue Q] [--concurrency N] [--threads N] '
  + '[--heartbeat-ttl D] [--grace D] ./app.js';
let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      redis: { type: 'string', default: process.env.ANTEROOM_REDIS ?? 'redis://127.0.0.1:6379' },
      queue: { type: 'string', default: process.env.ANTEROOM_QUEUE ?? 'default' },
      concurrency: { type: 'string', default: process.env.ANTEROOM_CONCURRENCY ?? '16' },
      threads: { type: 'string' },
      'heartbeat-ttl': { type: 'string', default: process.env.ANTEROOM_HEARTBEAT_TTL ?? '10s' },
      grace: { type: 'string', default: process.env.ANTEROOM_GRACE ?? '30s' },
      help: { type: 'boolean', short: 'h' },
    },
  });
} catch (err) {
  console.error(`anteroom-node: ${err.message}\n${usage}`);
  process.exit(2);
}
const { values, positionals } = parsed;
if (values.help) {
  console.log(`${usage}

Serves the (req, res) listener or Express app that app.js exports from an
Anteroom queue in Redis: requests wait there until this dispatcher takes
them, and run in this process with no web server.

  --redis URL          Redis (env ANTEROOM_REDIS; default redis://127.0.0.1:6379)
  --queue Q            queue name (env ANTEROOM_QUEUE; default 'default')
  --concurrency N      requests in hand at once (env ANTEROOM_CONCURRENCY; default 16;
                       --threads is the same, for the other Anteroom servers' spelling)
  --heartbeat-ttl D    silent this long, this dispatcher counts as dead (default 10s)
  --grace D            on SIGTERM or SIGINT, how long requests in hand may finish (default 30s)`);
  process.exit(0);
}
if (positionals.length !== 1) {
  console.error(`anteroom-node: one app file is needed\n${usage}`);
  process.exit(2);
}
const exported = require(path.resolve(positionals[0]));
const app = typeof exported === 'function' ? exported : (exported.default ?? exported.app);
if (typeof app !== 'function') {
  console.error(`anteroom-node: ${positionals[0]} exports no (req, res) function or Express app`);
  process.exit(2);
}
const dispatcher = new Dispatcher(app, {
  redis: values.redis,
  queue: values.queue,
  concurrency: Number(values.threads ?? values.concurrency),
  heartbeatTtlMs: duration(values['heartbeat-ttl'], '--heartbeat-ttl'),
  graceMs: duration(values.grace, '--grace'),
});
dispatcher.run().then(() => process.exit(0), (err) => {
  console.error(`anteroom-node: ${err.stack}`);
  process.exit(1);
});
