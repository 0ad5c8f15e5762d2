'use strict';
// The conformance kit's reference app as a Node request listener
// (docs/clients.md): anteroom conformance -- node bin/anteroom-node.js examples/conformance_app.js
const fs = require('node:fs');

module.exports = (req, res) => {
  const url = new URL(req.url, 'http://x');
  const path = url.pathname;
  if (path === '/echo') {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      res.setHeader('x-method', req.method);
      res.setHeader('x-target', req.url);
      // Repeated fields stay repeated, in order (rawHeaders keeps them).
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        const name = req.rawHeaders[i].toLowerCase();
        if (name.startsWith('x-test-')) res.appendHeader(name, req.rawHeaders[i + 1]);
      }
      res.writeHead(200);
      res.end(Buffer.concat(chunks));
    });
    return;
  }
  if (path.startsWith('/status/')) {
    const code = Number(path.split('/').pop());
    res.writeHead(code, { 'x-status': String(code) });
    res.end(`status ${code}\n`);
    return;
  }
  if (path.startsWith('/touch/')) {
    fs.appendFileSync(process.env.ANTEROOM_CONFORMANCE_LOG, `${path.split('/').pop()}\n`);
    setTimeout(() => { res.writeHead(200, { 'content-type': 'text/plain' }); res.end('touched\n'); },
      Number(url.searchParams.get('ms') ?? 0));
    return;
  }
  if (path === '/stream') {
    const n = Number(url.searchParams.get('n') ?? 3);
    const ms = Number(url.searchParams.get('ms') ?? 100);
    res.writeHead(200, { 'content-type': 'text/plain' });
    let i = 0;
    const next = () => {
      res.write(`chunk ${i}\n`);
      i += 1;
      if (i < n) setTimeout(next, ms); else res.end();
    };
    next();
    return;
  }
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not found\n');
};
