'use strict';
// A Node request listener that records each request it runs: the path of
// every request to /run/ID is appended to the file named by RECORD_FILE,
// and answered 200 `ran`. For the tests of lost replies with the Node
// dispatcher (tests/it/lost_replies.rs).
const fs = require('node:fs');

module.exports = (req, res) => {
  const path = new URL(req.url, 'http://x').pathname;
  if (path.startsWith('/run/')) fs.appendFileSync(process.env.RECORD_FILE, `${path.slice('/run/'.length)}\n`);
  req.resume();
  req.on('end', () => res.end('ran\n'));
};
