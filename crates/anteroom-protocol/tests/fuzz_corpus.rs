//! The `envelope` fuzz target's checks, run on its seed corpus
//! (`fuzz/corpus/envelope`, including the regression inputs with extreme
//! header counts and sizes) on the stable toolchain, so CI covers what
//! the fuzzer found.

use anteroom_protocol::{
    DeadLetter, EnvelopeVersion, Inbound, Reply, RequestEnvelope, ResponseEnvelope,
};
use bytes::Bytes;

#[test]
fn every_seed_decodes_or_fails_without_panicking() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/envelope");
    let mut seeds = 0;
    let mut converted = 0;
    let mut stream_frames = 0;
    for entry in std::fs::read_dir(&dir).expect("the fuzz corpus is in the repository") {
        let path = entry.unwrap().path();
        let buf = Bytes::from(std::fs::read(&path).unwrap());
        seeds += 1;
        if let Ok(req) = RequestEnvelope::decode(buf.clone()) {
            for version in [EnvelopeVersion::V1, EnvelopeVersion::V2] {
                let again = RequestEnvelope::decode(Bytes::from(req.encode_as(version))).unwrap();
                assert_eq!(again, req, "{} as {version:?}", path.display());
            }
            converted += usize::from(req.to_http().is_ok());
        }
        if let Ok(resp) = ResponseEnvelope::decode(buf.clone()) {
            let again = ResponseEnvelope::decode(Bytes::from(resp.encode())).unwrap();
            assert_eq!(again, resp, "{}", path.display());
            converted += usize::from(resp.to_http().is_ok());
        }
        if let Ok(reply) = Reply::decode(buf.clone()) {
            assert_eq!(Reply::decode(Bytes::from(reply.encode())).unwrap(), reply);
            stream_frames += usize::from(!matches!(reply, Reply::Complete(_)));
        }
        if let Ok(inbound) = Inbound::decode(buf.clone()) {
            assert_eq!(
                Inbound::decode(Bytes::from(inbound.encode())).unwrap(),
                inbound
            );
            stream_frames += usize::from(matches!(inbound, Inbound::Credit(_)));
        }
        if let Ok(dead) = DeadLetter::decode(buf) {
            assert_eq!(
                DeadLetter::decode(Bytes::from(dead.encode())).unwrap(),
                dead
            );
        }
    }
    assert!(seeds >= 6, "{seeds} seeds in {}", dir.display());
    // The plain request (in version 1 and in version 2) and response, the
    // request whose body follows, and the 256 KiB value, convert; the
    // 40,000- and 33,000-field ones are refused.
    assert_eq!(converted, 5);
    // A stream head, chunk, end, taken and credit as reply-list frames, and
    // the credit again as a credit-list frame.
    assert_eq!(stream_frames, 6);
}
