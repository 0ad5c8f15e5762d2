//! What Anteroom reads from Redis, from arbitrary bytes on the wire: the
//! RESP parser (redis-rs's `parse_redis_value`), then each conversion the
//! proxy and the dispatchers apply to a reply (`TIME` into the queue's
//! clock, `INFO memory` into `MemoryInfo`, `LRANGE` of a processing list
//! into request envelopes as a reconciliation settles them, a `BLPOP` of a
//! reply list into a `Reply`, and the list reader's replies: the `TAKE`
//! script's `{landed, taken}` (or nil when fenced off) and the reconnect's
//! `INCR`, `LRANGE`, `LRANGE`, each item through both lists' decoders, a
//! proxy's reply list (`Reply`) and a dispatcher's credit list
//! (`Inbound`)). A server, a proxy in between or a network fault can hand
//! over anything: no panic, ever.
#![no_main]

use anteroom_protocol::{Inbound, Reply, RequestEnvelope};
use anteroom_redis::MemoryInfo;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use redis::{FromRedisValue, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = redis::parse_redis_value(data) else {
        return;
    };
    read_as_anteroom_does(&value);
    // A value nested in an array (pipelines, MULTI/EXEC replies).
    if let Value::Array(items) = &value {
        for item in items {
            read_as_anteroom_does(item);
        }
    }
});

fn read_as_anteroom_does(value: &Value) {
    if let Ok((seconds, micros)) = <(u64, u64)>::from_redis_value_ref(value) {
        anteroom_redis::observe_time(seconds, micros, std::time::Instant::now());
        let _ = anteroom_protocol::clock::now_ms();
        let _ = anteroom_protocol::clock::skew_ms();
    }
    if let Ok(info) = String::from_redis_value_ref(value) {
        if let Some(memory) = MemoryInfo::parse(&info) {
            let _ = memory.evicts();
            let _ = memory.percent_used();
        }
    }
    if let Ok(items) = <Vec<Vec<u8>>>::from_redis_value_ref(value) {
        for item in items {
            if let Ok(request) = RequestEnvelope::decode(Bytes::from(item)) {
                let _ = request.is_safe_to_repeat();
                let _ = request.to_http();
            }
        }
    }
    if let Ok(Some((_key, reply))) = <Option<(String, Vec<u8>)>>::from_redis_value_ref(value) {
        let _ = Reply::decode(Bytes::from(reply));
    }
    // A reader's take (anteroom_control::queue::follow_list).
    if let Ok(Some((landed, taken))) =
        <Option<(Vec<Bytes>, Vec<Bytes>)>>::from_redis_value_ref(value)
    {
        list_items(landed.into_iter().chain(taken));
    }
    // A reader's reconnect: a new epoch, then its popped and landing lists.
    if let Ok((_epoch, popped, landing)) =
        <(u64, Vec<Bytes>, Vec<Bytes>)>::from_redis_value_ref(value)
    {
        list_items(popped.into_iter().chain(landing));
    }
}

/// Items of a reply list or a credit list, decoded as their readers do.
fn list_items(items: impl Iterator<Item = Bytes>) {
    for item in items {
        let _ = Reply::decode(item.clone());
        let _ = Inbound::decode(item);
    }
}
