// node client.mjs URL COUNT: follows URL with EventSource (reconnecting as
// a browser does, with Last-Event-ID) and prints one line per event,
// `event ID DATA UNIX_MS`, and per (re)connection, `open UNIX_MS`; exits 0
// after COUNT events, 2 if they take over 60 s.
import { EventSource } from 'eventsource';

const [url, count] = [process.argv[2], Number(process.argv[3])];
const es = new EventSource(url);
let seen = 0;
es.onopen = () => console.log(`open ${Date.now()}`);
es.onerror = () => console.log(`error ${Date.now()}`);
es.onmessage = (e) => {
  console.log(`event ${e.lastEventId} ${e.data} ${Date.now()}`);
  seen += 1;
  if (seen >= count) {
    es.close();
    process.exit(0);
  }
};
setTimeout(() => {
  console.log('timeout');
  process.exit(2);
}, 60000);
