'use strict';
// The dispatcher loop (docs/protocol.md, "What a dispatcher does") for a Node
// request listener `(req, res)` or an Express app: each queued request is
// injected into the app in this process (light-my-request), with no socket
// and no HTTP hop. One loop pulls, at most `concurrency` held: every free
// place's worth at once (LMOVEs in one pipeline, one round trip), blocking with
// BLMOVE on a connection of its own only when the queue is empty
// (docs/protocol.md, step 1), one reads credits (a third connection), a timer
// beats; pauses are seen before each pull and acknowledged in the
// heartbeat; SIGTERM or SIGINT stops pulling, lets the requests in hand
// finish within the grace period, then removes the heartbeat. A response
// the app has not ended when its head is written is streamed to a proxy
// that reads streams ("Streamed replies": a head, chunks paced by the
// proxy's credits, an end); one already ended goes whole.

const os = require('node:os');
const crypto = require('node:crypto');
const { createClient, RESP_TYPES } = require('redis');
const inject = require('light-my-request');
const protocol = require('./protocol');

const { nowMs } = protocol;

/** How long a reply list lives without a new reply (as the Rust dispatcher). */
const REPLY_TTL_MS = 60_000;
/** How long one blocked pull waits: a pause is seen at most this late. */
const PULL_BLOCK_S = 0.1;
/** Most bytes of a streamed body sent and not yet credited (1 MiB, the Rust dispatcher's default window). */
const WINDOW = 1024 * 1024;
/** A stream whose client reads nothing with the window full this long is aborted (ms). */
const STREAM_IDLE_MS = 60_000;
/** How often this dispatcher reaps dead ones (ms; as the Rust dispatcher). */
const REAP_EVERY_MS = 5_000;
/** How often the pause key is re-read while serving (ms). */
const PAUSE_POLL_MS = 50;
/** The pause between two tries of a failed write (ms). */
const RETRY_DELAY_MS = 200;
/** How long removing a request with no reply is retried (ms; the Rust dispatcher's minute). */
const DISCARD_MS = 60_000;
/** How long the reaper's answers are retried at most (ms), so a stop waits for a pass that long. */
const REAP_WRITE_MS = 10_000;
/** After a failed pull, the processing list is looked at again once a pull
 * the failed connection had sent would surely have landed (docs/protocol.md,
 * "Lost replies"). */
const RECHECK_AFTER_MS = PULL_BLOCK_S * 1000 + 3_000;
/** A settling of orphans that failed (or met a reaping pass) is tried again after this long. */
const RECONCILE_RETRY_MS = 1_000;
const FAILED = [502, [['content-type', 'text/plain; charset=utf-8']],
  Buffer.from('the backend failed to handle the request\n')];

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

class Dispatcher {
  /**
   * @param app a `(req, res)` listener or an Express app
   * @param options `{redis, queue, concurrency, heartbeatTtlMs, graceMs, label}`
   */
  constructor(app, options) {
    this.app = app;
    this.keys = new protocol.Keys(options.queue);
    this.url = options.redis;
    this.concurrency = Math.max(1, options.concurrency ?? 16);
    this.heartbeatTtlMs = Math.max(300, options.heartbeatTtlMs ?? 10_000);
    this.graceMs = options.graceMs ?? 30_000;
    this.label = options.label ?? 'node';
    this.id = `node-${crypto.randomBytes(8).toString('hex')}`;
    this.processing = this.keys.processing(this.id);
    this.stopping = false;
    /** Set once the grace period is over: credits are read until then. */
    this.done = false;
    this.inFlight = 0;
    this.acknowledged = null;
    this.startedAtMs = nowMs();
    this.freed = null;
    /** Streams by request id: `{consumed, cancel, wake}` from the proxy's credits. */
    this.streams = new Map();
    /** Reaped requests whose settling failed: [raw, dead dispatcher] by raw bytes. */
    this.unsettled = new Map();
    /** How many copies of each request (by raw bytes, latin1) are in hand: what
     * the processing list holds beyond these is an orphan of a lost reply. */
    this.held = new Map();
    /** Set after a pull or a reaping pass failed. */
    this.orphansPossible = false;
    /** Completions under way that take the next request too, and the
     * settling of orphans that waits for them to land (a resolver). */
    this.taking = 0;
    this.reconciling = false;
    this.landed = null;
    this.recheckAt = null;
    this.reconcileAfter = 0;
    /**
     * The `<n>` of each claim's owner (hex), from a random start: a
     * dispatcher restarted with a fixed id never takes an earlier run's
     * claim for its own.
     */
    this.deliveries = crypto.randomInt(0, 2 ** 47);
    /** When the last heartbeat that Redis took was sent (performance.now() ms). */
    this.beatSentAt = -Infinity;
  }

  async run() {
    const client = createClient({ url: this.url });
    client.on('error', (err) => console.error(`anteroom: redis: ${err.message}`));
    await client.connect();
    this.redis = client.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer });
    const puller = client.duplicate();
    puller.on('error', (err) => console.error(`anteroom: redis (pull): ${err.message}`));
    await puller.connect();
    this.puller = puller.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer });
    const creditReader = client.duplicate();
    creditReader.on('error', (err) => console.error(`anteroom: redis (credits): ${err.message}`));
    await creditReader.connect();
    const reading = this.readCredits(creditReader.withTypeMapping({ [RESP_TYPES.BLOB_STRING]: Buffer }));
    await patchSocket();
    const stop = () => { this.stopping = true; };
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
    await protocol.CLOCK.read(client);
    this.startedAtMs = nowMs();
    await client.sAdd('anteroom:queues', this.keys.queue);
    await this.beat();
    const beating = setInterval(() => { this.beat().catch((err) => console.error(`anteroom: heartbeat: ${err.message}`)); },
      this.heartbeatTtlMs / 3);
    const reaping = setInterval(() => {
      if (!this.stopping) {
        this.reapPass = this.reap().catch((err) => {
          // A claim whose reply was lost has moved a dead dispatcher's
          // requests into this one's list unseen.
          this.orphansPossible = true;
          console.error(`anteroom: reaping failed: ${err.message}`);
        });
      }
    }, REAP_EVERY_MS);
    console.error(`anteroom: dispatcher ${this.id} serving queue ${this.keys.queue}, ${this.concurrency} at once`);
    try {
      await this.pull();
    } finally {
      const until = nowMs() + this.graceMs;
      while (this.inFlight > 0 && nowMs() < until) await sleep(20);
      const left = this.inFlight;
      this.done = true;
      clearInterval(beating);
      clearInterval(reaping);
      // A reap pass under way finishes first: what it claimed is in this
      // dispatcher's list, which must not lose its registry entry.
      // Bounded: its writes give up after REAP_WRITE_MS each.
      await Promise.race([this.reapPass, timer(REAP_WRITE_MS + 5_000)]);
      await reading;
      await creditReader.quit();
      await client.del(this.keys.dispatcher(this.id));
      // What is left in the processing list goes to the reaper, which finds
      // it through the registry entry: it stays while the list holds anything.
      if (await client.lLen(this.processing) === 0) {
        await client.zRem(this.keys.dispatchers, this.id);
      } else {
        console.error(`anteroom: grace period over with ${left} requests running; the reaper takes them from the processing list`);
      }
      await puller.quit();
      await client.quit();
      console.error(`anteroom: dispatcher ${this.id} stopped`);
    }
  }

  async pausedId() {
    const record = await this.redis.get(this.keys.paused);
    if (record === null) return null;
    try {
      const { id } = JSON.parse(record.toString('utf8'));
      if (typeof id === 'string') return id;
    } catch {
      // anything else still means paused
    }
    return record.toString('latin1'); // its raw value is the id
  }

  async pull() {
    let checked = 0;
    let pauseId = null;
    while (!this.stopping) {
      if (this.orphansDue()) await this.reconcileOrRetry();
      let taken;
      try {
        // The pause key is re-read every PAUSE_POLL_MS, not before every
        // pull: a pull between a pause and its acknowledgement is allowed
        // (the pause waits for the acknowledgement).
        if (nowMs() - checked >= PAUSE_POLL_MS) {
          pauseId = await this.pausedId();
          checked = nowMs();
        }
        if (pauseId !== this.acknowledged) {
          this.acknowledged = pauseId; // no pull is outstanding here
          await this.beat();
        }
        if (pauseId !== null) {
          await sleep(50);
          continue;
        }
        if (this.inFlight >= this.concurrency) {
          await new Promise((resolve) => { this.freed = resolve; setTimeout(resolve, 50); });
          continue;
        }
        // Pulled only while this dispatcher's heartbeat is known to live
        // (its last beat sent under half the TTL ago): cut off longer than
        // the TTL, it was reaped (its registry entry removed), and a
        // request pulled before its next beat would have no reaper should
        // it die.
        if (this.beatStale()) await this.beat();
        taken = await this.take(this.concurrency - this.inFlight);
      } catch (err) {
        console.error(`anteroom: pulling failed: ${err.message}; retrying`);
        this.pullFailed();
        await sleep(500);
        continue;
      }
      for (const raw of taken) {
        this.inFlight += 1;
        this.hold(raw, 1);
        this.serve(raw);
      }
    }
  }

  /** Counts `delta` more (or fewer) copies of `raw` in hand. */
  hold(raw, delta) {
    const key = raw.toString('latin1');
    const n = (this.held.get(key) ?? 0) + delta;
    if (n > 0) this.held.set(key, n); else this.held.delete(key);
  }

  /**
   * Handles `raw`, then each next request its completion took
   * (completeAndTake), in the same place; frees the place when none came.
   */
  async serve(raw) {
    let next = raw;
    while (next) {
      const current = next;
      next = null;
      try {
        next = await this.handle(current);
      } catch (err) {
        console.error(`anteroom: handling a request failed (the reaper answers it once this dispatcher is gone): ${err.stack}`);
      }
      this.hold(current, -1);
    }
    this.inFlight -= 1;
    if (this.freed) this.freed();
  }

  /**
   * A pull (or a completion's take) failed: its reply may have been lost
   * after Redis moved requests into the processing list. Looked at now, and
   * again once a pull the failed connection sent would have landed.
   */
  pullFailed() {
    this.orphansPossible = true;
    this.recheckAt = nowMs() + RECHECK_AFTER_MS;
  }

  /** Whether the processing list is to be looked at now (the pull loop asks, with no pull outstanding). */
  orphansDue() {
    const now = nowMs();
    if (this.recheckAt !== null && now >= this.recheckAt) {
      this.recheckAt = null;
      this.orphansPossible = true;
    }
    return this.orphansPossible && now >= this.reconcileAfter;
  }

  async reconcileOrRetry() {
    this.orphansPossible = false;
    try {
      if (!await this.reconcile()) {
        this.orphansPossible = true; // a reaping pass is under way
        this.reconcileAfter = nowMs() + RECONCILE_RETRY_MS;
      }
    } catch (err) {
      console.error(`anteroom: settling orphans failed (${err.message}); trying again shortly`);
      this.orphansPossible = true;
      this.reconcileAfter = nowMs() + RECONCILE_RETRY_MS;
    }
  }

  /**
   * Settles what the processing list holds beyond the requests in hand, as
   * the Rust dispatcher does (docs/protocol.md, "Lost replies"): a copy of a
   * request in hand (a producer's repeated push) is only removed; any other
   * item, a request whose pull reply was lost (never run) or that a lost
   * claim reply moved here, is settled as a reaper settles a dead
   * dispatcher's, its 502 pushed only if it is still in the list. Excludes
   * a reaping pass (false when one is under way: nothing done).
   */
  async reconcile() {
    if (this.reapingNow) return false;
    this.reapingNow = true;
    this.reconciling = true;
    try {
      if (!await this.takesLanded()) return false;
      const inHand = new Map(this.held);
      const listed = await this.redis.lRange(this.processing, 0, -1);
      const copies = [];
      const orphans = [];
      for (const raw of listed) {
        const key = raw.toString('latin1');
        const n = inHand.get(key);
        if (n > 0) inHand.set(key, n - 1);
        else if (n === 0) copies.push(raw);
        else if (!this.unsettled.has(key)) orphans.push(raw); // else the reaper's, retried by it
      }
      for (const raw of copies) await this.redis.lRem(this.processing, 1, raw);
      for (const raw of orphans) await this.settle(raw, this.id, true);
      if (copies.length > 0 || orphans.length > 0) {
        console.error(`anteroom: settled ${orphans.length} requests in the processing list that no task held (a lost reply); removed ${copies.length} copies of requests in hand`);
      }
      return true;
    } finally {
      this.reapingNow = false;
      this.reconciling = false;
    }
  }

  /**
   * Waits (at most 1 s) for the completions under way that take a request
   * (completeAndTake, which does not start one while `reconciling`) to land
   * and count what they took as held: false when they did not.
   */
  async takesLanded() {
    if (this.taking > 0) {
      let timeout;
      await new Promise((resolve) => { this.landed = resolve; timeout = setTimeout(resolve, 1_000); });
      clearTimeout(timeout);
      this.landed = null;
    }
    return this.taking === 0;
  }

  /**
   * Moves up to `free` requests into the processing list: their LMOVEs in
   * one script (PULL_WHEN_FULL, which also runs while Redis is over its
   * maxmemory), then a BLMOVE for one when that found none.
   */
  async take(free) {
    const taken = await this.redis.eval(protocol.PULL_WHEN_FULL,
      { keys: [this.keys.requests, this.processing], arguments: [String(free)] });
    if (taken.length > 0) return taken;
    const raw = await this.puller.blMove(this.keys.requests, this.processing, 'RIGHT', 'LEFT', PULL_BLOCK_S);
    return raw === null ? [] : [raw];
  }

  /**
   * `{kind, request}` of `raw` when it is a request a producer of this queue
   * could have written (docs/protocol.md, step 2); otherwise it is set aside,
   * the reason prefixed with `found`, and null.
   */
  async accepted(raw, found = '') {
    let kind;
    let request;
    try {
      const decoded = protocol.decode(raw);
      kind = decoded.kind;
      if (!['Q', 'U', 'W'].includes(kind)) throw new protocol.DecodeError(`kind '${kind}' is not a request`);
      request = protocol.request(decoded.meta, decoded.body);
    } catch (err) {
      if (!(err instanceof protocol.DecodeError)) throw err;
      await this.setAside(raw, `${found}does not decode: ${err.message}`);
      return null;
    }
    if (!this.keys.isReplies(request.reply_to)) {
      await this.setAside(raw, `${found}reply_to ${JSON.stringify(request.reply_to)} is not a reply list of queue ${this.keys.queue}`);
      return null;
    }
    return { kind, request };
  }

  async handle(raw) {
    const accepted = await this.accepted(raw);
    if (accepted === null) return undefined;
    const { kind, request } = accepted;
    const refused = protocol.REFUSED[kind];
    const now = nowMs();
    if (request.deadline_ms - now > protocol.MAX_HOLD_MS) return this.setAside(raw, 'deadline more than 24 h ahead');
    if (now >= request.deadline_ms) return this.discard(raw, request); // the client has its 504
    if (refused) {
      // Known, not served: the client hears why at once, instead of waiting
      // out its hold budget while the request lies dead.
      console.error(`anteroom: refusing ${request.method} ${request.uri}: ${refused[2].toString().trim()}`);
      return this.complete(raw, request, protocol.response(request.id, ...refused));
    }
    if (request.dedupe) {
      const ttl = Math.max(1, request.deadline_ms - now + REPLY_TTL_MS);
      if (!await this.claim(request, ttl)) return this.discard(raw, request); // another delivery has it
    }
    let status;
    let headers;
    let out;
    try {
      const calling = this.call(request);
      const deadline = timer(request.deadline_ms - nowMs());
      const answered = await Promise.race([calling, deadline]).finally(deadline.cancel);
      if (answered === undefined) {
        calling.then(([, , late]) => { if (!Buffer.isBuffer(late)) destroyApp(late.response); }, () => {});
        // Past the deadline with no head: the client has its 504.
        console.error(`anteroom: ${request.method} ${request.uri} wrote no head before its deadline; dropped`);
        return this.discard(raw, request);
      }
      [status, headers, out] = answered;
      if (!Buffer.isBuffer(out) && !request.stream) out = await collect(out.body);
    } catch (err) {
      console.error(`anteroom: the app failed on ${request.method} ${request.uri}: ${err.stack}`);
      [status, headers, out] = FAILED;
    }
    if (!Buffer.isBuffer(out)) return this.stream(raw, request, status, headers, out);
    return this.completeAndTake(raw, request, protocol.response(request.id, status, headers, out));
  }

  /**
   * complete, taking the next request in the same round trip when this
   * dispatcher would pull now (COMPLETE_AND_TAKE: not while stopping,
   * paused, settling orphans or with a heartbeat that may be near its end):
   * the request taken, counted as held, or null. After a failure the take
   * may have landed with its reply lost: the completion is retried alone,
   * and the processing list looked at as after a failed pull.
   */
  async completeAndTake(raw, request, frame) {
    if (this.stopping || this.acknowledged !== null || this.reconciling || this.beatStale()) {
      await this.complete(raw, request, frame);
      return null;
    }
    this.taking += 1;
    let taken = null;
    let failed = null;
    try {
      taken = await this.redis.eval(protocol.COMPLETE_AND_TAKE, {
        keys: [this.processing, request.reply_to, this.keys.requests, this.keys.paused],
        arguments: [String(REPLY_TTL_MS), raw, frame],
      });
    } catch (err) {
      console.error(`anteroom: completing ${request.id} and taking the next failed (${err.message}); completing it alone`);
      failed = err;
    }
    this.taking -= 1;
    if (taken) this.hold(taken, 1);
    if (failed && !refusedForGood(failed)) this.pullFailed();
    if (this.taking === 0 && this.landed) this.landed();
    if (failed) await this.complete(raw, request, frame);
    return taken;
  }

  /**
   * Pushes the last frame of `request` and removes it from the processing
   * list, in one script (docs/protocol.md, step 5; COMPLETE_WHEN_FULL, which
   * also runs while Redis is over its maxmemory). A reply Redis refuses
   * for good (WRONGTYPE, NOPERM) is given up and the request removed alone;
   * any other failure (a lost connection, a failover, OOM, READONLY) is
   * retried every RETRY_DELAY_MS until the request's deadline, as the Rust
   * dispatcher does: a reply after it reaches no one.
   */
  async complete(raw, request, frame, untilMs = request.deadline_ms) {
    try {
      await this.retrying(request, 'completing', () => this.redis.eval(protocol.COMPLETE_WHEN_FULL, {
        keys: [this.processing, request.reply_to],
        arguments: [String(REPLY_TTL_MS), raw, frame],
      }), untilMs);
    } catch (err) {
      if (!refusedForGood(err)) throw err;
      console.error(`anteroom: Redis refused the reply to ${request.id} (${errorText(err)}); giving it up`);
      await this.redis.lRem(this.processing, 1, raw);
    }
  }

  /**
   * Removes `raw` from the processing list with no reply (expired, another
   * delivery's, its client gone): housekeeping, retried for DISCARD_MS as
   * the Rust dispatcher does; what is left stays for the reaper should this
   * dispatcher die.
   */
  async discard(raw, request) {
    try {
      await this.retrying(request, 'discarding', () => this.redis.lRem(this.processing, 1, raw), nowMs() + DISCARD_MS);
    } catch (err) {
      console.error(`anteroom: cannot remove ${request.id} from the processing list (${err.message})`);
    }
    return undefined;
  }

  /** A token unique to one run of one request, `<dispatcher id>/<n>`: a claim's owner, and a stream head's run. */
  delivery() {
    return `${this.id}/${(this.deliveries++).toString(16)}`;
  }

  /**
   * Claims a `dedupe` request (SET NX, docs/protocol.md step 3): false when
   * another delivery has it. The claim names this delivery,
   * `<dispatcher id>/<n>`. After a failure (its answer may be what was lost;
   * or Redis, over its maxmemory, refused the SET) it is asked again with the
   * CLAIM_WHEN_FULL script, which also knows this delivery's own claim, until
   * the deadline; past it the request is not run (as the Rust dispatcher).
   */
  async claim(request, ttl) {
    const key = this.keys.claimed(request.id);
    const owner = this.delivery();
    try {
      const claimed = await this.redis.sendCommand(['SET', key, owner, 'NX', 'PX', String(ttl)]);
      return claimed !== null;
    } catch (err) {
      if (!full(err)) console.error(`anteroom: claiming ${request.id} failed (${err.message}); asking again`);
    }
    try {
      const claimed = await this.retrying(request, 'claiming',
        () => this.redis.eval(protocol.CLAIM_WHEN_FULL, { keys: [key], arguments: [owner, String(ttl)] }));
      return claimed === 1;
    } catch (err) {
      console.error(`anteroom: cannot claim ${request.id} (${err.message}) by its deadline; not running it`);
      return false;
    }
  }

  /**
   * Runs `write` until it succeeds; after a failure, again every
   * RETRY_DELAY_MS until `untilMs`: by default `request`'s deadline (a reply
   * after it reaches no one); a stream, which outlives its deadline, passes
   * its own (streamUntil). Throws a refusal for good (WRONGTYPE, NOPERM) at
   * once, and the last failure then.
   */
  async retrying(request, what, write, untilMs = request.deadline_ms) {
    for (;;) {
      try {
        return await write();
      } catch (err) {
        if (refusedForGood(err) || nowMs() + RETRY_DELAY_MS >= untilMs) throw err;
        console.error(`anteroom: ${what} ${request.id} failed (${err.message}); retrying`);
        await sleep(RETRY_DELAY_MS);
      }
    }
  }


  /**
   * Streams `out.body` (a Readable): the head now, a chunk for each piece as
   * the window allows, then the end with the request's removal from the
   * processing list. A client that is gone (a cancel) gets nothing more and
   * the app's response is destroyed; an app that fails mid-body, or a
   * client that reads nothing for STREAM_IDLE_MS, gets an aborted end.
   */
  async stream(raw, request, status, headers, out) {
    const state = { consumed: 0, cancel: false, wake: null };
    this.streams.set(request.id, state);
    const push = (frame) => this.retrying(request, 'streaming', () => this.redis.multi()
      .rPush(request.reply_to, frame).pExpire(request.reply_to, REPLY_TTL_MS).exec(), streamUntil(request));
    let seq = 0;
    let sent = 0;
    let aborted = null;
    let ended = false;
    try {
      await push(protocol.streamHead(request.id, status, headers, this.keys.credits(this.id), WINDOW, this.delivery()));
      try {
        for await (const chunk of out.body) {
          for (let at = 0; at < chunk.length; at += protocol.MAX_CHUNK) {
            const piece = chunk.subarray(at, at + protocol.MAX_CHUNK);
            const room = await this.room(state, sent, piece.length);
            if (room === 'gone') {
              ended = true;
              destroyApp(out.response);
              await this.discard(raw, request); // the client is gone
              return undefined;
            }
            if (room === 'idle') throw new Error(`the client read nothing for ${STREAM_IDLE_MS / 1000}s`);
            await push(protocol.streamChunk(request.id, seq, piece));
            seq += 1;
            sent += piece.length;
          }
        }
      } catch (err) { // the stream is cut short, never ended cleanly
        console.error(`anteroom: stream aborted: ${err.message}`);
        aborted = err.message || err.name;
        destroyApp(out.response);
      }
      ended = true;
      await this.complete(raw, request, protocol.streamEnd(request.id, seq, aborted), streamUntil(request));
    } finally {
      this.streams.delete(request.id);
      if (!ended) destroyApp(out.response); // a push failed: nobody reads the app's body
    }
    return undefined;
  }

  /** Waits until `length` more bytes fit in the window: 'ok', 'gone' (a cancel) or 'idle'. */
  async room(state, sent, length) {
    const until = nowMs() + STREAM_IDLE_MS;
    for (;;) {
      if (state.cancel) return 'gone';
      if (sent + length <= Math.min(state.consumed, sent) + WINDOW || sent === state.consumed) return 'ok';
      const left = until - nowMs();
      if (left <= 0) return 'idle';
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        state.wake = () => { clearTimeout(timer); resolve(); };
      });
      state.wake = null;
    }
  }

  /** Pops this dispatcher's credit list ('A' frames from proxies) until it stops. */
  async readCredits(reader) {
    const key = this.keys.credits(this.id);
    while (!this.done) {
      let popped;
      try {
        popped = await reader.sendCommand(['BLMPOP', '1', '1', key, 'LEFT', 'COUNT', '256']);
      } catch (err) {
        console.error(`anteroom: reading credits failed: ${err.message}`);
        await sleep(500);
        continue;
      }
      for (const frame of popped ? popped[1] : []) {
        try {
          const { kind, meta } = protocol.decode(frame);
          const state = kind === 'A' ? this.streams.get(meta.id) : undefined;
          if (state) {
            const consumed = Number(meta.consumed ?? 0);
            if (Number.isFinite(consumed)) state.consumed = Math.max(state.consumed, consumed);
            state.cancel = state.cancel || meta.cancel === true;
            if (state.wake) state.wake();
          }
        } catch {
          console.error('anteroom: discarding a credit-list frame that does not decode');
        }
      }
    }
  }

  /**
   * Injects `request` into the app: `[status, [[name, latin1 value]], body]`,
   * where body is a Buffer when the app had ended its response by the time
   * it wrote the head, and otherwise `{body: Readable, response}` (the app's
   * response, to destroy when the client is gone).
   */
  async call(request) {
    const headers = {};
    for (const [name, value] of request.headers) {
      if (name in headers) {
        headers[name] = [].concat(headers[name], value);
      } else {
        headers[name] = value;
      }
    }
    const [host] = (request.client_addr ?? '127.0.0.1:0').split(/:(?=\d+$)/);
    const res = await inject(this.app, {
      method: request.method,
      url: request.uri,
      headers,
      payload: request.body,
      remoteAddress: host.replace(/^\[|\]$/g, ''),
      payloadAsStream: true,
    });
    const out = [];
    for (const [name, value] of Object.entries(res.headers)) {
      for (const one of [].concat(value)) out.push([name.toLowerCase(), String(one)]);
    }
    const response = res.raw.res;
    if (response.req?.socket) response.req.socket.anteroomResponse = response;
    const body = res.stream();
    return [res.statusCode, out, response.writableEnded ? await collect(body) : { body, response }];
  }

  /**
   * One reaping pass (docs/protocol.md, step 8): claims the processing list
   * of each registered dispatcher whose heartbeat is gone (the CLAIM script,
   * so one reaper wins each list) into this one's, then settles each
   * request. Passes do not overlap.
   */
  async reap() {
    if (this.reapingNow) return;
    this.reapingNow = true;
    try {
      for (const [raw, dead] of [...this.unsettled.values()]) await this.settleOrKeep(raw, dead);
      const ids = await this.redis.zRange(this.keys.dispatchers, 0, -1);
      for (const id of ids.map((b) => b.toString('latin1'))) {
        if (id === this.id) continue;
        if (this.stopping) return;
        const items = await this.redis.eval(protocol.CLAIM, {
          keys: [this.keys.dispatcher(id), this.keys.processing(id), this.processing, this.keys.dispatchers],
          arguments: [id],
        });
        if (!items || items.length === 0) continue;
        console.error(`anteroom: reaping ${items.length} requests of dispatcher ${id}, whose heartbeat expired`);
        for (const raw of items) await this.settleOrKeep(raw, id);
      }
    } finally {
      this.reapingNow = false;
    }
  }

  /** Settles `raw`; when that fails it stays in this dispatcher's list and is tried again at the next pass. */
  async settleOrKeep(raw, dead) {
    const key = raw.toString('latin1');
    try {
      await this.settle(raw, dead);
      this.unsettled.delete(key);
    } catch (err) {
      console.error(`anteroom: settling a reaped request failed (${err.message}); trying again at the next pass`);
      this.unsettled.set(key, [raw, dead]);
    }
  }

  /**
   * A dead dispatcher's request, now in this one's processing list: set
   * aside when no producer of this queue wrote it; dropped when past its
   * deadline; put back at the end pulled next when safe to repeat, at most
   * MAX_REPEATS times; otherwise answered 502, since it may or may not have
   * run. `dead` is the dispatcher it was claimed from.
   */
  async settle(raw, dead, guarded = false) {
    const found = guarded ? 'found in the processing list with no task holding it; ' : "found in a dead dispatcher's list; ";
    const accepted = await this.accepted(raw, found);
    if (accepted === null) return undefined;
    const { kind, request } = accepted;
    const now = nowMs();
    if (now >= request.deadline_ms) return this.discard(raw, request);
    if (kind === 'Q' && protocol.isSafeToRepeat(request)) {
      const done = await this.redis.eval(protocol.REQUEUE, {
        keys: [this.processing, this.keys.requests, this.keys.claimed(request.id), this.keys.repeats(request.id)],
        arguments: [raw, dead, String(protocol.MAX_REPEATS), String(Math.max(1, request.deadline_ms - now)),
          this.keys.dispatcher('')],
      });
      if (done !== 2) return undefined; // back in the queue, or no longer this reaper's
    }
    // Bounded by REAP_WRITE_MS too: a stop waits for the reaper's pass.
    const until = Math.min(request.deadline_ms, nowMs() + REAP_WRITE_MS);
    const frame = protocol.response(request.id, ...protocol.INTERRUPTED);
    if (guarded) {
      // An orphan: answered only if still in the list (another actor may
      // have settled it meanwhile).
      await this.retrying(request, 'answering an orphan', () => this.redis.eval(protocol.COMPLETE_IF_HELD, {
        keys: [this.processing, request.reply_to],
        arguments: [String(REPLY_TTL_MS), raw, frame],
      }), until);
      return undefined;
    }
    await this.complete(raw, request, frame, until);
    return undefined;
  }

  async setAside(raw, reason) {
    console.error(`anteroom: moving an envelope to the dead-letter list: ${reason}`);
    const letter = protocol.deadLetter(raw, reason, this.id);
    await this.redis.multi().lPush(this.keys.dead, letter).lRem(this.processing, 1, raw).exec();
  }

  /**
   * Whether the heartbeat may be near its end: the last one Redis took was
   * sent half its TTL ago or more (it lives at least the TTL from its
   * sending), so it is written again before the next pull.
   */
  beatStale() {
    return performance.now() - this.beatSentAt >= this.heartbeatTtlMs / 2;
  }

  async beat() {
    const pauseId = this.acknowledged;
    const beat = {
      id: this.id,
      host: os.hostname(),
      pid: process.pid,
      label: this.label,
      concurrency: this.concurrency,
      in_flight: this.inFlight,
      paused: pauseId !== null,
      pause_id: pauseId,
      started_at_ms: this.startedAtMs,
    };
    const sent = performance.now();
    let time;
    try {
      // TIME first: each beat also reads the queue's clock.
      [time] = await this.redis.multi()
        .addCommand(['TIME'])
        .addCommand(['SET', this.keys.dispatcher(this.id), JSON.stringify(beat), 'PX', String(this.heartbeatTtlMs)])
        .zAdd(this.keys.dispatchers, { score: nowMs(), value: this.id })
        .exec();
    } catch (err) {
      // Redis over its maxmemory refuses the SET, not PEXPIRE: the heartbeat
      // lives on with its last contents, so this dispatcher does not look
      // dead to the reapers.
      if (full(err) && await this.redis.pExpire(this.keys.dispatcher(this.id), this.heartbeatTtlMs)) {
        this.beatSentAt = sent;
        return;
      }
      throw err;
    }
    this.beatSentAt = sent;
    protocol.CLOCK.observe(time, sent, performance.now());
  }
}

/** An error's text with that of the replies of a MULTI it failed in. */
function errorText(err) {
  return `${err.message} ${(err.replies ?? []).map((r) => r?.message ?? '').join(' ')}`.trim();
}

/**
 * Whether Redis refused for want of memory (OOM: maxmemory reached under
 * noeviction). A MULTI so refused fails as EXECABORT, which counts too: the
 * allow-oom scripts tried then do the same, and fail as the MULTI would for
 * any other cause.
 */
function full(err) {
  return /maxmemory|^OOM|EXECABORT/.test(errorText(err));
}

/**
 * Whether Redis refused a write for good: a reply list that holds something
 * else (WRONGTYPE) or an ACL that forbids it (NOPERM; inside a script, "The
 * user executing the script can't run this command"); retrying cannot help.
 */
function refusedForGood(err) {
  return /WRONGTYPE|NOPERM|executing the script can't run/.test(errorText(err));
}

/**
 * Until when a write of a stream is retried: a stream may run past its
 * request's deadline, so at least STREAM_IDLE_MS from now (as the Rust
 * dispatcher's stream writes).
 */
function streamUntil(request) {
  return Math.max(request.deadline_ms, nowMs() + STREAM_IDLE_MS);
}

/** Resolves with undefined after `ms` (at once when not positive). */
function timer(ms) {
  let handle;
  const done = new Promise((resolve) => { handle = setTimeout(resolve, Math.max(0, ms)).unref(); });
  done.cancel = () => clearTimeout(handle);
  return done;
}

/**
 * Ends the app's side of a response nobody reads any more: the response is
 * destroyed and the request emits `close`, as a real server does when its
 * client leaves (so `req.on('close', ...)` clean-ups run).
 */
function destroyApp(response) {
  response.destroy();
  const { req } = response;
  if (req && !req.destroyed) {
    req.destroyed = true;
    req.emit('close');
  }
}

/**
 * light-my-request's request socket has no `destroy`, which Express's
 * finalhandler calls on an error after the head was sent: without it the
 * process would crash. Given here once, it destroys that request's response
 * (set as `anteroomResponse` once the head is written), which aborts the
 * stream.
 */
let socketPatched = false;
async function patchSocket() {
  if (socketPatched) return;
  socketPatched = true;
  let proto;
  await inject((req, res) => { proto = Object.getPrototypeOf(req.socket); res.end(); }, { url: '/' });
  if (typeof proto.destroy !== 'function') {
    proto.destroy = function destroy(err) {
      this.destroyed = true;
      if (this.anteroomResponse) this.anteroomResponse.destroy(err ?? new Error('the app destroyed the connection'));
      return this;
    };
  }
}

/** The whole of a Readable, as one Buffer. */
async function collect(readable) {
  const chunks = [];
  for await (const chunk of readable) chunks.push(chunk);
  return Buffer.concat(chunks);
}

module.exports = { Dispatcher };
