'use strict';
// An Express app for anteroom-node (tests/it/node_apps.rs; the benchmark's
// adapters scenario also runs it under node's http server): exported, not
// listened on; anteroom-node serves it from the queue.
const express = require('express');

const app = express();
app.use(express.text({ type: '*/*' }));

app.get('/hello', (req, res) => {
  res.type('text/plain').send(`hello from express, ${req.query.name ?? 'world'}\n`);
});

app.post('/echo', (req, res) => {
  res.json({
    framework: 'express',
    method: req.method,
    path: req.path,
    body: req.body,
    header: req.get('x-test'),
  });
});

app.get('/stream', (req, res) => {
  res.type('text/plain');
  res.write('piece 0\n');
  setTimeout(() => res.end('piece 1\n'), 600);
});

// An error after the head is sent: Express destroys the connection.
app.get('/fail-after-head', (req, res, next) => {
  res.type('text/plain');
  res.write('half\n');
  setTimeout(() => next(new Error('failed after the head')), 50);
});

module.exports = app;
