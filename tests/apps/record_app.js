'use strict';
// A Node request listener that records each request it runs: the path of
// every request to /run/ID is appended to the file named by RECORD_FILE,
// and answered 200 `ran`; with the query `hang=1` only after 60 s. For the
// tests of lost replies and partitions with the Node dispatcher
// (tests/it/lost_replies.rs, tests/it/faults.rs).
const fs = require('node:fs');

module.exports = (req, res) => {
  const url = new URL(req.url, 'http://x');
  const path = url.pathname;
  const wait = url.searchParams.get('hang') === '1' ? 60_000 : 0;
  if (path.startsWith('/run/')) fs.appendFileSync(process.env.RECORD_FILE, `${path.slice('/run/'.length)}\n`);
  req.resume();
  req.on('end', () => setTimeout(() => res.end('ran\n'), wait));
};
