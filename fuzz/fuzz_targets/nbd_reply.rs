//! Fuzzes the client's side of transmission replies: `parse_reply` over arbitrary bytes, read as
//! a stream (one reply after another until it needs more input or refuses a magic).
//!
//! Invariants checked for every input:
//! - `parse_reply` never panics, and a reply never takes more bytes than it was given, nor
//!   fewer than its header (so the stream always moves on);
//! - a simple reply takes 16 bytes; a chunk takes its 20-byte header plus exactly the payload
//!   its length field announces; the fields are the header's bytes;
//! - `None` (more input needed) only when the header or the chunk's payload is cut short, and
//!   a refused magic is neither reply magic.

#![no_main]

use controller::nbd::codec::{ProtocolError, Reply, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, parse_reply};
use libfuzzer_sys::fuzz_target;

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(bytes, at)) << 32) | u64::from(be_u32(bytes, at + 4))
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match parse_reply(rest) {
            Ok(Some((reply, consumed))) => {
                assert!(consumed <= rest.len(), "{consumed} bytes consumed of {}", rest.len());
                match reply {
                    Reply::Simple { error, cookie } => {
                        assert_eq!(be_u32(rest, 0), SIMPLE_REPLY_MAGIC);
                        assert_eq!(consumed, 16);
                        assert_eq!((error, cookie), (be_u32(rest, 4), be_u64(rest, 8)));
                    }
                    Reply::Chunk { flags, kind, cookie, payload } => {
                        assert_eq!(be_u32(rest, 0), STRUCTURED_REPLY_MAGIC);
                        assert_eq!(consumed, 20 + payload.len());
                        assert_eq!(be_u32(rest, 16) as usize, payload.len());
                        assert_eq!(
                            (flags, kind, cookie),
                            (be_u16(rest, 4), be_u16(rest, 6), be_u64(rest, 8))
                        );
                        assert_eq!(&payload[..], &rest[20..consumed]);
                    }
                }
                rest = &rest[consumed..];
            }
            Ok(None) => {
                // More input needed: the header, or the payload a chunk announces, is cut short.
                let complete = match rest.get(..4).map(|magic| be_u32(magic, 0)) {
                    None => false,
                    Some(SIMPLE_REPLY_MAGIC) => rest.len() >= 16,
                    Some(STRUCTURED_REPLY_MAGIC) => {
                        rest.len() >= 20 && rest.len() - 20 >= be_u32(rest, 16) as usize
                    }
                    Some(other) => panic!("magic {other:#x} was neither refused nor parsed"),
                };
                assert!(!complete, "a complete reply of {} bytes needs more input", rest.len());
                return;
            }
            Err(ProtocolError::BadMagic { found, .. }) => {
                let magic = be_u32(rest, 0);
                assert_eq!(found, u64::from(magic));
                assert!(magic != SIMPLE_REPLY_MAGIC && magic != STRUCTURED_REPLY_MAGIC, "{magic:#x} refused");
                return;
            }
            Err(other) => panic!("parse_reply returned {other:?}"),
        }
    }
});
