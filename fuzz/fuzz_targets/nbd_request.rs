//! Fuzzes the transmission request header: `parse_request` on the first 28 bytes of the input,
//! then `check_request` against an export whose size is the next 8 bytes (big-endian, padded
//! with zeroes when the input is shorter).
//!
//! Invariants checked for every input:
//! - `parse_request` fails exactly when the header is short or its magic is not `REQUEST_MAGIC`,
//!   and reads nothing past the 28 header bytes;
//! - a parsed header encodes back to the very bytes it came from, and those reparse equal;
//! - a `Read` or `Write` that `check_request` accepts lies inside the export and carries at
//!   most `MAX_PAYLOAD_BYTES`; a `Trim` or `WriteZeroes` lies inside the export; a `Flush` has
//!   no range; an accepted command is the header's command with the header's range and flags
//!   that command takes;
//! - a refusal is one of the error numbers the protocol table allows for requests.

#![no_main]

use bytes::BytesMut;
use controller::nbd::codec::{
    CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, Command, Errno, MAX_PAYLOAD_BYTES, ProtocolError, REQUEST_BYTES, REQUEST_MAGIC,
    RequestHeader, check_request, encode_request, parse_request,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let header_bytes = &data[..data.len().min(REQUEST_BYTES)];
    let parsed = parse_request(header_bytes);
    // The parser must look at the header only: the whole input parses the same way.
    assert_eq!(parse_request(data), parsed, "bytes past the header changed the parse");

    let header = match parsed {
        Ok(header) => header,
        Err(ProtocolError::Short { have, need, .. }) => {
            assert_eq!((have, need), (header_bytes.len(), REQUEST_BYTES));
            assert!(header_bytes.len() < REQUEST_BYTES, "a full header was called short");
            return;
        }
        Err(ProtocolError::BadMagic { found, .. }) => {
            let magic = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            assert_eq!(found, u64::from(magic));
            assert_ne!(magic, REQUEST_MAGIC, "the request magic was refused");
            return;
        }
        Err(other) => panic!("parse_request returned {other:?}"),
    };
    assert_eq!(header_bytes.len(), REQUEST_BYTES);

    let mut encoded = BytesMut::new();
    encode_request(&mut encoded, &header);
    assert_eq!(&encoded[..], header_bytes, "{header:?} does not encode to the bytes it came from");
    assert_eq!(parse_request(&encoded), Ok(header), "{header:?} does not reparse equal");

    let mut size_bytes = [0u8; 8];
    let size_input = &data[REQUEST_BYTES..data.len().min(REQUEST_BYTES + 8)];
    size_bytes[..size_input.len()].copy_from_slice(size_input);
    let size = u64::from_be_bytes(size_bytes);

    match check_request(&header, size) {
        Ok(command) => check_accepted(&header, size, command),
        Err(refusal) => assert!(
            matches!(refusal.errno, Errno::Inval | Errno::Overflow | Errno::NoSpc),
            "{header:?} on {size} bytes refused with {refusal:?}"
        ),
    }
});

/// The range of an accepted command lies inside the export (`offset + length <= size`, without
/// overflow).
fn inside(offset: u64, length: u32, size: u64) -> bool {
    offset.checked_add(u64::from(length)).is_some_and(|end| end <= size)
}

fn check_accepted(header: &RequestHeader, size: u64, command: Command) {
    let context = format!("{header:?} on an export of {size} bytes accepted as {command:?}");
    let (kind, allowed_flags) = match command {
        Command::Read { offset, length } => {
            assert!(length <= MAX_PAYLOAD_BYTES, "{context}: above the maximum payload");
            assert!(inside(offset, length, size), "{context}: outside the export");
            assert_eq!((offset, length), (header.offset, header.length), "{context}");
            (CMD_READ, CMD_FLAG_FUA | CMD_FLAG_DF)
        }
        Command::Write { offset, length } => {
            assert!(length <= MAX_PAYLOAD_BYTES, "{context}: above the maximum payload");
            assert!(inside(offset, length, size), "{context}: outside the export");
            assert_eq!((offset, length), (header.offset, header.length), "{context}");
            (CMD_WRITE, CMD_FLAG_FUA)
        }
        Command::Trim { offset, length } => {
            assert!(inside(offset, length, size), "{context}: outside the export");
            assert_eq!((offset, length), (header.offset, header.length), "{context}");
            (CMD_TRIM, CMD_FLAG_FUA)
        }
        Command::WriteZeroes { offset, length } => {
            assert!(inside(offset, length, size), "{context}: outside the export");
            assert_eq!((offset, length), (header.offset, header.length), "{context}");
            (CMD_WRITE_ZEROES, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)
        }
        Command::Flush => {
            assert_eq!((header.offset, header.length), (0, 0), "{context}: a flush with a range");
            (CMD_FLUSH, 0)
        }
        Command::Disconnect => (CMD_DISC, 0),
    };
    assert_eq!(header.kind, kind, "{context}: another command");
    assert_eq!(header.flags & !allowed_flags, 0, "{context}: flags the command does not take");
}
