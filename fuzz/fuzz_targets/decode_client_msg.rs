//! Arbitrary bytes → the server's text-frame decoder (depth check, then serde).
//!
//! Whatever the input, decoding must return a message or a typed error, never panic, never
//! recurse past the depth limit, and anything accepted must survive a round trip.
#![no_main]

use beamdrop::protocol::{
    decode_client_msg, json_depth_exceeds, DecodeError, DEFAULT_MAX_JSON_DEPTH,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Text frames are UTF-8 by the time they reach the decoder; keep every input useful anyway.
    let text = String::from_utf8_lossy(data);
    for max in [DEFAULT_MAX_JSON_DEPTH, 1, 0] {
        match decode_client_msg(&text, max) {
            Ok(msg) => {
                assert!(!json_depth_exceeds(text.as_bytes(), max));
                let again = serde_json::to_string(&msg).expect("a decoded message re-encodes");
                assert_eq!(decode_client_msg(&again, max), Ok(msg));
            }
            Err(DecodeError::TooDeep { max: m }) => {
                assert_eq!(m, max);
                assert!(json_depth_exceeds(text.as_bytes(), max));
            }
            Err(DecodeError::Invalid(_)) => {}
        }
    }
});
