'use strict';
// An Express app for anteroom-node (tests/it/node_apps.rs): exported, not
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

module.exports = app;
