//! Every decoder on arbitrary bytes (requests, whole replies, stream
//! frames, credits, dead letters): no panic, and whatever decodes
//! re-encodes to something that decodes to the same value; the dispatcher's
//! conversion to an HTTP request never panics either.
#![no_main]

use anteroom_protocol::{
    DeadLetter, EnvelopeVersion, Inbound, Reply, RequestEnvelope, ResponseEnvelope,
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    if let Ok(req) = RequestEnvelope::decode(buf.clone()) {
        // Either version it came in, it re-encodes to the same request in both.
        for version in [EnvelopeVersion::V1, EnvelopeVersion::V2] {
            let again = RequestEnvelope::decode(Bytes::from(req.encode_as(version)))
                .expect("re-encoded request decodes");
            assert_eq!(again, req);
        }
        let _ = req.to_http();
        let _ = req.is_safe_to_repeat();
    }
    if let Ok(resp) = ResponseEnvelope::decode(buf.clone()) {
        let again = ResponseEnvelope::decode(Bytes::from(resp.encode()))
            .expect("re-encoded response decodes");
        assert_eq!(again, resp);
        let _ = resp.to_http();
    }
    if let Ok(reply) = Reply::decode(buf.clone()) {
        assert_eq!(Reply::decode(Bytes::from(reply.encode())).unwrap(), reply);
    }
    if let Ok(inbound) = Inbound::decode(buf.clone()) {
        assert_eq!(Inbound::decode(Bytes::from(inbound.encode())).unwrap(), inbound);
    }
    if let Ok(dead) = DeadLetter::decode(buf) {
        assert_eq!(
            DeadLetter::decode(Bytes::from(dead.encode())).unwrap(),
            dead
        );
    }
});
