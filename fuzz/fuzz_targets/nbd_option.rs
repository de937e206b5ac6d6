//! Fuzzes the option haggling: the input is what a client sends after the server's greeting
//! (4 bytes of client flags, then option requests, each a 16-byte header and its data), read
//! as the server reads it (`parse_client_flags`, `parse_option_header`, `parse_option`) and
//! answered by one `Negotiation` over two fixed exports, until the input runs out, a header is
//! refused (a protocol error ends the connection), or the negotiation closes or transmits.
//!
//! Invariants checked for every input:
//! - client flags are accepted exactly when they are fixed newstyle plus, at most, no-zeroes;
//! - a parsed option header carries at most `MAX_OPTION_BYTES`; a parsed option's names are at
//!   most `MAX_STRING_BYTES`, without NUL;
//! - every option is answered with reply bytes, except `NBD_OPT_EXPORT_NAME` of an unknown
//!   export, which closes the connection with nothing sent;
//! - the reply bytes of an option other than `NBD_OPT_EXPORT_NAME` are a well-formed sequence
//!   of option replies: each has `OPTION_REPLY_MAGIC`, the option's code, a length that the
//!   data matches; it is exactly one answer (data replies then `NBD_REP_ACK`, or one error);
//!   error messages are UTF-8 of at most `MAX_STRING_BYTES`;
//! - the answer is the one the protocol table gives for that option (list entries, info
//!   replies with the export's size and flags, `ERR_UNKNOWN`, `ERR_UNSUP`, `ERR_INVALID`);
//! - `Next::Transmit` comes only after `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` of a known export,
//!   describing that export, with structured replies exactly when the client asked for them
//!   before; `Next::Close` only after `NBD_OPT_ABORT` or `NBD_OPT_EXPORT_NAME` of an unknown one.

#![no_main]

use std::sync::LazyLock;

use bytes::BytesMut;
use controller::nbd::codec::{
    ClientOption, ExportInfo, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_OPTION_BYTES,
    MAX_PAYLOAD_BYTES, MAX_STRING_BYTES, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_STARTTLS, OPT_STRUCTURED_REPLY, OPTION_HEADER_BYTES, OPTION_REPLY_MAGIC, PREFERRED_BLOCK_BYTES,
    ProtocolError, REP_ACK, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_SERVER,
    TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA, parse_client_flags, parse_option,
    parse_option_header,
};
use controller::nbd::negotiate::{Exports, Negotiation, Next, Unavailable};
use libfuzzer_sys::fuzz_target;

/// Two exports. The second has a description longer than `MAX_STRING_BYTES` made of two-byte
/// characters, so the replies that carry it must cut it on a character boundary.
struct TwoExports {
    exports: [ExportInfo; 2],
}

impl TwoExports {
    fn new() -> TwoExports {
        TwoExports {
            exports: [
                ExportInfo {
                    name: "vol_a".into(),
                    size: 1 << 30,
                    flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA,
                    description: "volume vol_a of aggregate aggr0, node 1".into(),
                },
                ExportInfo {
                    name: "vol_é".into(),
                    size: u64::MAX,
                    flags: TFLAG_HAS_FLAGS | TFLAG_READ_ONLY,
                    description: "é".repeat(MAX_STRING_BYTES),
                },
            ],
        }
    }

    fn find(&self, name: &str) -> Option<&ExportInfo> {
        self.exports.iter().find(|export| export.name == name)
    }
}

impl Exports for TwoExports {
    fn list(&self) -> Result<Vec<String>, Unavailable> {
        Ok(self.exports.iter().map(|export| export.name.clone()).collect())
    }

    fn lookup(&self, name: &str) -> Result<ExportInfo, Unavailable> {
        // The message quotes the name as the node's does, so a long or escaped name makes it
        // longer than a protocol string may be.
        self.find(name).cloned().ok_or_else(|| Unavailable {
            shutdown: false,
            message: format!("no volume {name:?}; exports here: vol_a, vol_é"),
        })
    }
}

/// One option reply, as a client reads it.
struct OptionReply<'a> {
    option: u32,
    kind: u32,
    data: &'a [u8],
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(bytes, at)) << 32) | u64::from(be_u32(bytes, at + 4))
}

/// Splits `out` into option replies; panics unless it is exactly a sequence of well-formed ones.
fn option_replies(out: &[u8]) -> Vec<OptionReply<'_>> {
    let mut replies = Vec::new();
    let mut rest = out;
    while !rest.is_empty() {
        assert!(rest.len() >= 20, "a reply header cut short: {} bytes left", rest.len());
        let magic = be_u64(rest, 0);
        assert_eq!(magic, OPTION_REPLY_MAGIC, "option reply magic {magic:#x}");
        let length = be_u32(rest, 16) as usize;
        assert!(rest.len() - 20 >= length, "a reply of {length} bytes with {} left", rest.len() - 20);
        let reply =
            OptionReply { option: be_u32(rest, 8), kind: be_u32(rest, 12), data: &rest[20..20 + length] };
        if reply.kind & (1 << 31) != 0 {
            assert!(length <= MAX_STRING_BYTES, "an error message of {length} bytes");
            assert!(std::str::from_utf8(reply.data).is_ok(), "an error message that is not UTF-8");
        }
        replies.push(reply);
        rest = &rest[20 + length..];
    }
    replies
}

/// Checks the answer to `option` (code `code`) in `out`, and returns what the negotiation must
/// do next.
fn check_answer(
    exports: &TwoExports,
    code: u32,
    option: &ClientOption,
    no_zeroes: bool,
    structured: bool,
    out: &[u8],
) -> Next {
    if let ClientOption::ExportName(name) = option {
        // Not an option reply: size, flags and maybe zeroes; nothing at all when it closes.
        let Some(export) = exports.find(name) else {
            assert!(out.is_empty(), "EXPORT_NAME of an unknown export sent {} bytes", out.len());
            return Next::Close;
        };
        assert_eq!(out.len(), if no_zeroes { 10 } else { 134 });
        assert_eq!((be_u64(out, 0), be_u16(out, 8)), (export.size, export.flags));
        assert!(out[10..].iter().all(|&b| b == 0), "the 124 bytes are not zero");
        return Next::Transmit { export: export.clone(), structured };
    }
    assert!(!out.is_empty(), "option {code} ({option:?}) got no reply");
    let replies = option_replies(out);
    for reply in &replies {
        assert_eq!(reply.option, code, "a reply to option {} for option {code}", reply.option);
    }
    let (last, data) = replies.split_last().expect("not empty");
    // Exactly one answer: data replies, then an ACK; or one error alone.
    if last.kind & (1 << 31) != 0 {
        assert!(data.is_empty(), "replies before an error: {option:?}");
    } else {
        assert_eq!(last.kind, REP_ACK, "the last reply is neither an ACK nor an error");
        assert!(last.data.is_empty(), "an ACK with data");
        for reply in data {
            assert!(matches!(reply.kind, REP_SERVER | REP_INFO), "reply type {} before the ACK", reply.kind);
        }
    }
    let kinds: Vec<u32> = replies.iter().map(|reply| reply.kind).collect();
    match option {
        ClientOption::ExportName(_) => unreachable!("answered above"),
        ClientOption::Abort => {
            assert_eq!(kinds, [REP_ACK]);
            Next::Close
        }
        ClientOption::List => {
            let names: Vec<&[u8]> = data
                .iter()
                .map(|reply| {
                    assert_eq!(reply.kind, REP_SERVER);
                    let length = be_u32(reply.data, 0) as usize;
                    assert_eq!(reply.data.len(), 4 + length, "a list entry's name length");
                    &reply.data[4..]
                })
                .collect();
            let want: Vec<&[u8]> = exports.exports.iter().map(|export| export.name.as_bytes()).collect();
            assert_eq!(names, want);
            assert_eq!(last.kind, REP_ACK);
            Next::Continue
        }
        ClientOption::StartTls => {
            assert_eq!(kinds, [REP_ERR_UNSUP]);
            Next::Continue
        }
        ClientOption::Info { go, name, requests } => {
            let Some(export) = exports.find(name) else {
                assert_eq!(kinds, [REP_ERR_UNKNOWN], "{option:?}");
                return Next::Continue;
            };
            check_info_replies(export, requests, data);
            assert_eq!(last.kind, REP_ACK);
            if *go { Next::Transmit { export: export.clone(), structured } } else { Next::Continue }
        }
        ClientOption::StructuredReply => {
            assert_eq!(kinds, [REP_ACK]);
            Next::Continue
        }
        ClientOption::Invalid { option: invalid, .. } => {
            assert_eq!(*invalid, code);
            assert_eq!(kinds, [REP_ERR_INVALID], "{option:?}");
            Next::Continue
        }
        ClientOption::Unsupported(unsupported) => {
            assert_eq!(*unsupported, code);
            assert_eq!(kinds, [REP_ERR_UNSUP]);
            Next::Continue
        }
    }
}

/// The `NBD_REP_INFO` replies to INFO or GO of `export`: always the export and block sizes, the
/// name and description when asked for; strings cut to `MAX_STRING_BYTES` of valid UTF-8.
fn check_info_replies(export: &ExportInfo, requests: &[u16], data: &[OptionReply<'_>]) {
    let mut types = Vec::new();
    for reply in data {
        assert_eq!(reply.kind, REP_INFO);
        assert!(reply.data.len() >= 2, "an info reply without a type");
        let info = be_u16(reply.data, 0);
        let body = &reply.data[2..];
        match info {
            INFO_EXPORT => {
                assert_eq!(body.len(), 10);
                assert_eq!((be_u64(body, 0), be_u16(body, 8)), (export.size, export.flags));
            }
            INFO_NAME | INFO_DESCRIPTION => {
                assert!(body.len() <= MAX_STRING_BYTES, "an info string of {} bytes", body.len());
                let text = std::str::from_utf8(body).expect("an info string that is not UTF-8");
                let full = if info == INFO_NAME { &export.name } else { &export.description };
                assert!(full.starts_with(text), "info {info} is not a prefix of {full:?}");
            }
            INFO_BLOCK_SIZE => {
                assert_eq!(body.len(), 12);
                let (minimum, preferred, maximum) = (be_u32(body, 0), be_u32(body, 4), be_u32(body, 8));
                assert_eq!((minimum, preferred, maximum), (1, PREFERRED_BLOCK_BYTES, MAX_PAYLOAD_BYTES));
            }
            other => panic!("info type {other} was never asked for"),
        }
        assert!(!types.contains(&info), "info {info} sent twice");
        types.push(info);
    }
    assert!(types.contains(&INFO_EXPORT) && types.contains(&INFO_BLOCK_SIZE), "{types:?}");
    assert_eq!(types.contains(&INFO_NAME), requests.contains(&INFO_NAME));
    assert_eq!(types.contains(&INFO_DESCRIPTION), requests.contains(&INFO_DESCRIPTION));
}

/// What the parser must make of an option: names within the protocol's limits, and the known
/// options recognised as such.
fn check_parsed(code: u32, payload: &[u8], option: &ClientOption) {
    let check_name = |name: &str| {
        assert!(name.len() <= MAX_STRING_BYTES, "a name of {} bytes", name.len());
        assert!(!name.contains('\0'), "a name with NUL");
    };
    match option {
        ClientOption::ExportName(name) => {
            assert_eq!(code, OPT_EXPORT_NAME);
            check_name(name);
            assert_eq!(name.as_bytes(), payload);
        }
        ClientOption::Abort => assert_eq!(code, OPT_ABORT),
        ClientOption::List => assert_eq!((code, payload.len()), (OPT_LIST, 0)),
        ClientOption::StartTls => assert_eq!((code, payload.len()), (OPT_STARTTLS, 0)),
        ClientOption::StructuredReply => assert_eq!((code, payload.len()), (OPT_STRUCTURED_REPLY, 0)),
        ClientOption::Info { go, name, requests } => {
            assert_eq!(code, if *go { OPT_GO } else { OPT_INFO });
            check_name(name);
            assert_eq!(payload.len(), 4 + name.len() + 2 + 2 * requests.len(), "{option:?}");
        }
        ClientOption::Invalid { option, .. } => {
            assert_eq!(*option, code);
            assert!(
                matches!(
                    code,
                    OPT_EXPORT_NAME | OPT_LIST | OPT_STARTTLS | OPT_STRUCTURED_REPLY | OPT_INFO | OPT_GO
                ),
                "option {code} cannot be invalid"
            );
        }
        ClientOption::Unsupported(option) => {
            assert_eq!(*option, code);
            assert!(
                !matches!(
                    code,
                    OPT_EXPORT_NAME
                        | OPT_ABORT
                        | OPT_LIST
                        | OPT_STARTTLS
                        | OPT_STRUCTURED_REPLY
                        | OPT_INFO
                        | OPT_GO
                ),
                "option {code} is implemented"
            );
        }
    }
}

/// Built once: the long description would otherwise cost an allocation per input.
static EXPORTS: LazyLock<TwoExports> = LazyLock::new(TwoExports::new);

fuzz_target!(|data: &[u8]| {
    let exports = &*EXPORTS;
    let flags = parse_client_flags(data);
    if let Some(raw) = data.get(..4) {
        let raw = be_u32(raw, 0);
        assert_eq!(flags.is_ok(), raw == 1 || raw == 3, "client flags {raw:#x}: {flags:?}");
    }
    let Ok(client) = flags else { return };
    let mut negotiation = Negotiation::new(client);
    let mut structured = false;
    let mut rest = &data[4..];
    while !rest.is_empty() {
        let header = match parse_option_header(rest) {
            Ok(header) => header,
            Err(ProtocolError::Short { .. }) => return,
            Err(ProtocolError::BadMagic { .. } | ProtocolError::OptionTooLong { .. }) => return,
            Err(other) => panic!("parse_option_header returned {other:?}"),
        };
        assert!(header.length <= MAX_OPTION_BYTES, "{header:?}");
        let Some(payload) = rest.get(OPTION_HEADER_BYTES..OPTION_HEADER_BYTES + header.length as usize)
        else {
            // The client stopped in the middle of the option's data.
            return;
        };
        rest = &rest[OPTION_HEADER_BYTES + payload.len()..];

        let option = parse_option(header.option, payload);
        check_parsed(header.option, payload, &option);
        let mut out = BytesMut::new();
        let next = negotiation.handle(header.option, option.clone(), exports, &mut out);
        let want = check_answer(exports, header.option, &option, client.no_zeroes, structured, &out);
        assert_eq!(next, want, "after {option:?}");
        match next {
            Next::Continue => {
                if option == ClientOption::StructuredReply {
                    structured = true;
                }
            }
            Next::Close | Next::Transmit { .. } => return,
        }
    }
});
