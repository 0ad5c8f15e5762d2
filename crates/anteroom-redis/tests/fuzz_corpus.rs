//! The `redis_replies` fuzz target's checks, run on its seed corpus
//! (`fuzz/corpus/redis_replies/seed-*`) on the stable toolchain: what
//! Anteroom reads from Redis (a `TIME` reply, `INFO memory`, an `LRANGE` of
//! a processing list, a `BLPOP`-shaped reply, a list reader's take and its
//! reconnect's recovery) goes through redis-rs's RESP parser and each
//! conversion without a panic.

use anteroom_protocol::{Inbound, Reply, RequestEnvelope};
use anteroom_redis::MemoryInfo;
use bytes::Bytes;
use redis::{FromRedisValue, Value};

fn read_as_anteroom_does(value: &Value) -> usize {
    let mut read = 0;
    if let Ok((seconds, micros)) = <(u64, u64)>::from_redis_value_ref(value) {
        anteroom_redis::observe_time(seconds, micros, std::time::Instant::now());
        read += 1;
    }
    if let Ok(info) = String::from_redis_value_ref(value) {
        if let Some(memory) = MemoryInfo::parse(&info) {
            let _ = memory.evicts();
            let _ = memory.percent_used();
            read += 1;
        }
    }
    if let Ok(items) = <Vec<Vec<u8>>>::from_redis_value_ref(value) {
        for item in items {
            if let Ok(request) = RequestEnvelope::decode(Bytes::from(item)) {
                let _ = request.to_http();
                read += 1;
            }
        }
    }
    if let Ok(Some((_key, reply))) = <Option<(String, Vec<u8>)>>::from_redis_value_ref(value) {
        read += usize::from(Reply::decode(Bytes::from(reply)).is_ok());
    }
    if let Ok(Some((landed, taken))) =
        <Option<(Vec<Bytes>, Vec<Bytes>)>>::from_redis_value_ref(value)
    {
        read += list_items(landed.into_iter().chain(taken));
    }
    if let Ok((_epoch, popped, landing)) =
        <(u64, Vec<Bytes>, Vec<Bytes>)>::from_redis_value_ref(value)
    {
        read += list_items(popped.into_iter().chain(landing));
    }
    read
}

/// Items of a reply list or a credit list, as their readers decode them:
/// how many were replies.
fn list_items(items: impl Iterator<Item = Bytes>) -> usize {
    let mut read = 0;
    for item in items {
        read += usize::from(Reply::decode(item.clone()).is_ok());
        let _ = Inbound::decode(item);
    }
    read
}

#[test]
fn every_seed_parses_and_converts_without_panicking() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/redis_replies");
    let (mut seeds, mut read) = (0, 0);
    for entry in std::fs::read_dir(&dir).expect("the fuzz corpus is in the repository") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("seed-") {
            continue; // what a local fuzzing run added
        }
        seeds += 1;
        let bytes = std::fs::read(&path).unwrap();
        let value = redis::parse_redis_value(&bytes)
            .unwrap_or_else(|err| panic!("seed {name} is not RESP: {err}"));
        read += read_as_anteroom_does(&value);
    }
    assert!(seeds >= 8, "only {seeds} seeds in {}", dir.display());
    // The TIME reading, INFO memory, the LRANGE's request, the BLPOP's
    // reply, the take's and the recovery's replies each convert.
    assert!(read >= 6, "only {read} conversions from {seeds} seeds");
}
