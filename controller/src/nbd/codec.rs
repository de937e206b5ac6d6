//! The NBD wire format (the `doc/proto.md` of the NBD project), sans IO: parsing of what a
//! client sends (client flags, option requests, transmission requests) and encoding of what the
//! server sends (greeting, option replies, simple and structured replies). Nothing here reads
//! or writes a socket, so every function is fuzzed and property-tested directly.
//!
//! Invariants:
//! - parsing never panics and never allocates more than the input it was given: a length field
//!   is checked against the bytes actually present (and against `MAX_OPTION_BYTES`,
//!   `MAX_STRING_BYTES`) before anything is sized from it;
//! - every integer on the wire is big-endian ("network byte order");
//! - an encoder's output parses back to what it encoded (proptest round trips in the tests).

use bytes::{BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, the first 8 bytes a newstyle server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: after the server's magic, and before every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server): fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags (server): the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flags: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Lists the exports.
pub const OPT_LIST: u32 = 3;
/// Upgrades to TLS (not offered yet, DESIGN §13).
pub const OPT_STARTTLS: u32 = 5;
/// Describes an export.
pub const OPT_INFO: u32 = 6;
/// Describes an export and enters transmission.
pub const OPT_GO: u32 = 7;
/// Turns on structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One piece of information of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// The option is unknown here.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// The option is known but refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// The option is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// The export does not exist here (or is not available now).
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// The request or reply is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// A description for people.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block-size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is understood.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is understood.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is understood.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is understood.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections to the export see each other's completed writes.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command types.
pub const CMD_READ: u16 = 0;
/// Write the payload.
pub const CMD_WRITE: u16 = 1;
/// Soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard a range.
pub const CMD_TRIM: u16 = 4;
/// Zero a range.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flags (`WRITE_ZEROES`): allocate, do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flags (`READ`): do not fragment the structured reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: no payload (success).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: an error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The largest payload of one request (read or write), advertised as the maximum block size.
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;
/// The preferred block size advertised: the write cache's block.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// The largest option data accepted; a longer option closes the connection (its data cannot be
/// skipped cheaply and no option of ours needs more than a name and a few info requests).
pub const MAX_OPTION_BYTES: u32 = 8 << 10;
/// The longest string (export name, message) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;
/// Bytes of a transmission request header.
pub const REQUEST_BYTES: usize = 28;
/// Bytes of an option request header.
pub const OPTION_HEADER_BYTES: usize = 16;

/// NBD error numbers (the protocol's own values, not the platform's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted.
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory.
    NoMem = 12,
    /// Invalid argument.
    Inval = 22,
    /// No space left on the device (a write past its end).
    NoSpc = 28,
    /// Value too large (a request above the maximum payload).
    Overflow = 75,
    /// Operation not supported.
    NotSup = 95,
    /// The server is shutting down: the client must disconnect.
    Shutdown = 108,
}

/// A violation that ends the connection: the stream can no longer be trusted to be in step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number is not the expected one.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which header.
        what: &'static str,
        /// What came instead.
        found: u64,
    },
    /// The client flags carry a bit we did not offer, or lack fixed newstyle.
    #[error("client flags {0:#x}: {1}")]
    ClientFlags(u32, &'static str),
    /// An option's data is longer than any option of ours needs.
    #[error("option {option} carries {length} bytes; at most {MAX_OPTION_BYTES}")]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// Its length field.
        length: u32,
    },
    /// A write above the maximum payload: its data cannot be skipped safely.
    #[error("a write of {length} bytes; at most {MAX_PAYLOAD_BYTES}")]
    WriteTooLong {
        /// Its length field.
        length: u32,
    },
    /// The input is shorter than its fixed-size header.
    #[error("{what}: {have} bytes, {need} needed")]
    Short {
        /// Which header.
        what: &'static str,
        /// Bytes given.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(bytes)
}

fn need(what: &'static str, input: &[u8], need: usize) -> Result<(), ProtocolError> {
    if input.len() < need {
        return Err(ProtocolError::Short { what, have: input.len(), need });
    }
    Ok(())
}

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(out: &mut BytesMut) {
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/// What the client asked for in its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Parses the client's 4 flag bytes. The connection ends on an unknown flag (the protocol says
/// the server MUST drop it) and on a client without fixed newstyle (we offer nothing else).
pub fn parse_client_flags(input: &[u8]) -> Result<ClientFlags, ProtocolError> {
    need("client flags", input, 4)?;
    let flags = be_u32(input, 0);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::ClientFlags(flags, "unknown flag"));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::ClientFlags(flags, "the client does not speak fixed newstyle"));
    }
    Ok(ClientFlags { no_zeroes: flags & FLAG_C_NO_ZEROES != 0 })
}

/// An option request's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code.
    pub option: u32,
    /// Bytes of data that follow (at most `MAX_OPTION_BYTES`).
    pub length: u32,
}

/// Parses the 16 bytes before an option's data.
pub fn parse_option_header(input: &[u8]) -> Result<OptionHeader, ProtocolError> {
    need("option header", input, OPTION_HEADER_BYTES)?;
    let magic = be_u64(input, 0);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic { what: "option", found: magic });
    }
    let option = be_u32(input, 8);
    let length = be_u32(input, 12);
    if length > MAX_OPTION_BYTES {
        return Err(ProtocolError::OptionTooLong { option, length });
    }
    Ok(OptionHeader { option, length })
}

/// An option request, parsed. Malformed data of a known option is `Invalid` (answered with
/// `NBD_REP_ERR_INVALID`, the negotiation goes on), never an error of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: the name, then transmission.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO` (`go: false`) or `NBD_OPT_GO` (`go: true`).
    Info {
        /// Whether transmission follows a successful reply.
        go: bool,
        /// The export.
        name: String,
        /// The information types asked for.
        requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// A known option with data that does not parse.
    Invalid {
        /// The option code.
        option: u32,
        /// What is wrong, for the client's error message.
        reason: String,
    },
    /// An option this server does not implement (extended headers, meta contexts, …).
    Unsupported(u32),
}

fn parse_name(option: u32, bytes: &[u8]) -> Result<String, ClientOption> {
    if bytes.len() > MAX_STRING_BYTES {
        return Err(ClientOption::Invalid {
            option,
            reason: format!("an export name of {} bytes; at most {MAX_STRING_BYTES}", bytes.len()),
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(name) if !name.contains('\0') => Ok(name.to_string()),
        Ok(_) => Err(ClientOption::Invalid { option, reason: "the export name contains NUL".into() }),
        Err(_) => Err(ClientOption::Invalid { option, reason: "the export name is not UTF-8".into() }),
    }
}

/// Parses an option's data (`data.len()` is the header's length).
pub fn parse_option(option: u32, data: &[u8]) -> ClientOption {
    let invalid = |reason: &str| ClientOption::Invalid { option, reason: reason.to_string() };
    match option {
        OPT_EXPORT_NAME => parse_name(option, data).map_or_else(|e| e, ClientOption::ExportName),
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST if data.is_empty() => ClientOption::List,
        OPT_LIST => invalid("NBD_OPT_LIST carries no data"),
        OPT_STARTTLS if data.is_empty() => ClientOption::StartTls,
        OPT_STARTTLS => invalid("NBD_OPT_STARTTLS carries no data"),
        OPT_STRUCTURED_REPLY if data.is_empty() => ClientOption::StructuredReply,
        OPT_STRUCTURED_REPLY => invalid("NBD_OPT_STRUCTURED_REPLY carries no data"),
        OPT_INFO | OPT_GO => {
            if data.len() < 6 {
                return invalid("shorter than a name length and a request count");
            }
            let name_len = be_u32(data, 0) as usize;
            let Some(count_at) = name_len.checked_add(4).filter(|&at| at + 2 <= data.len()) else {
                return invalid("the name length runs past the option's data");
            };
            let name = match parse_name(option, &data[4..count_at]) {
                Ok(name) => name,
                Err(invalid) => return invalid,
            };
            let count = usize::from(be_u16(data, count_at));
            let requests_at = count_at + 2;
            if data.len() - requests_at != 2 * count {
                return invalid("the information request count does not match the option's length");
            }
            let requests = (0..count).map(|i| be_u16(data, requests_at + 2 * i)).collect();
            ClientOption::Info { go: option == OPT_GO, name, requests }
        }
        other => ClientOption::Unsupported(other),
    }
}

/// Appends an option reply.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(u32::try_from(data.len()).expect("option replies are small"));
    out.put_slice(data);
}

/// Appends an error reply with a message for people (cut to `MAX_STRING_BYTES` on a character
/// boundary).
pub fn encode_option_error(out: &mut BytesMut, option: u32, error: u32, message: &str) {
    encode_option_reply(out, option, error, truncate(message).as_bytes());
}

fn truncate(message: &str) -> &str {
    if message.len() <= MAX_STRING_BYTES {
        return message;
    }
    let mut end = MAX_STRING_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// One export as the negotiation describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its transmission flags.
    pub flags: u16,
    /// A description for people.
    pub description: String,
}

/// Appends one `NBD_REP_SERVER` reply of `NBD_OPT_LIST`.
pub fn encode_list_entry(out: &mut BytesMut, name: &str) {
    let name = truncate(name);
    let mut data = Vec::with_capacity(4 + name.len());
    data.put_u32(u32::try_from(name.len()).expect("names are at most 4096 bytes"));
    data.put_slice(name.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// Appends the `NBD_REP_INFO` replies of `NBD_OPT_INFO` / `NBD_OPT_GO`: always the export and
/// the block sizes (as qemu-nbd does: a client that did not ask ignores them, and ours accept
/// any alignment), the name and description when asked; then `NBD_REP_ACK`.
pub fn encode_info_replies(out: &mut BytesMut, option: u32, export: &ExportInfo, requests: &[u16]) {
    let mut data = Vec::with_capacity(12);
    data.put_u16(INFO_EXPORT);
    data.put_u64(export.size);
    data.put_u16(export.flags);
    encode_option_reply(out, option, REP_INFO, &data);
    if requests.contains(&INFO_NAME) {
        let mut data = Vec::new();
        data.put_u16(INFO_NAME);
        data.put_slice(truncate(&export.name).as_bytes());
        encode_option_reply(out, option, REP_INFO, &data);
    }
    if requests.contains(&INFO_DESCRIPTION) {
        let mut data = Vec::new();
        data.put_u16(INFO_DESCRIPTION);
        data.put_slice(truncate(&export.description).as_bytes());
        encode_option_reply(out, option, REP_INFO, &data);
    }
    let mut data = Vec::with_capacity(14);
    data.put_u16(INFO_BLOCK_SIZE);
    data.put_u32(1);
    data.put_u32(PREFERRED_BLOCK_BYTES);
    data.put_u32(MAX_PAYLOAD_BYTES);
    encode_option_reply(out, option, REP_INFO, &data);
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the client said
/// `NO_ZEROES`.
pub fn encode_export_name_reply(out: &mut BytesMut, export: &ExportInfo, no_zeroes: bool) {
    out.put_u64(export.size);
    out.put_u16(export.flags);
    if !no_zeroes {
        out.put_bytes(0, 124);
    }
}

/// A transmission request's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's handle for the reply ("cookie").
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Bytes (of payload for `WRITE`).
    pub length: u32,
}

/// Parses the 28-byte request header. A bad magic ends the connection: the stream is out of
/// step and nothing after it can be trusted.
pub fn parse_request(input: &[u8]) -> Result<RequestHeader, ProtocolError> {
    need("request header", input, REQUEST_BYTES)?;
    let magic = be_u32(input, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic { what: "request", found: u64::from(magic) });
    }
    Ok(RequestHeader {
        flags: be_u16(input, 4),
        kind: be_u16(input, 6),
        cookie: be_u64(input, 8),
        offset: be_u64(input, 16),
        length: be_u32(input, 24),
    })
}

/// Encodes a request header (the client's side: tests, fuzzing, the round trips).
pub fn encode_request(out: &mut BytesMut, header: &RequestHeader) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(header.flags);
    out.put_u16(header.kind);
    out.put_u64(header.cookie);
    out.put_u64(header.offset);
    out.put_u32(header.length);
}

/// A request, checked against the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        length: u32,
    },
    /// Write the payload at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        length: u32,
    },
    /// Completed writes durable (they already are, DESIGN §4).
    Flush,
    /// Discard a range (it reads as zeroes after).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        length: u32,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        length: u32,
    },
    /// Soft disconnect.
    Disconnect,
}

/// Why a request is refused (answered with an error; the connection goes on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error number.
    pub errno: Errno,
    /// For the client's log.
    pub message: String,
}

fn refuse(errno: Errno, message: String) -> Refusal {
    Refusal { errno, message }
}

/// Checks a request against an export of `size` bytes: known command, flags that command
/// takes, length within `MAX_PAYLOAD_BYTES` (for `READ` and `WRITE`), range inside the export.
pub fn check_request(header: &RequestHeader, size: u64) -> Result<Command, Refusal> {
    let allowed = match header.kind {
        CMD_READ => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_FLUSH | CMD_DISC => 0,
        other => return Err(refuse(Errno::Inval, format!("unknown command {other}"))),
    };
    if header.flags & !allowed != 0 {
        return Err(refuse(
            Errno::Inval,
            format!("flags {:#x} are not valid for command {}", header.flags, header.kind),
        ));
    }
    let (offset, length) = (header.offset, header.length);
    let in_range = |past_end: Errno| -> Result<(), Refusal> {
        match offset.checked_add(u64::from(length)) {
            Some(end) if end <= size => Ok(()),
            _ => Err(refuse(
                past_end,
                format!("{length} bytes at {offset} run past the export's {size} bytes"),
            )),
        }
    };
    let payload_limit = |errno: Errno| -> Result<(), Refusal> {
        if length > MAX_PAYLOAD_BYTES {
            return Err(refuse(errno, format!("{length} bytes in one request; at most {MAX_PAYLOAD_BYTES}")));
        }
        Ok(())
    };
    match header.kind {
        CMD_READ => {
            payload_limit(Errno::Overflow)?;
            in_range(Errno::Inval)?;
            Ok(Command::Read { offset, length })
        }
        CMD_WRITE => {
            payload_limit(Errno::Overflow)?;
            in_range(Errno::NoSpc)?;
            Ok(Command::Write { offset, length })
        }
        CMD_TRIM => {
            in_range(Errno::NoSpc)?;
            Ok(Command::Trim { offset, length })
        }
        CMD_WRITE_ZEROES => {
            in_range(Errno::NoSpc)?;
            Ok(Command::WriteZeroes { offset, length })
        }
        CMD_FLUSH if offset == 0 && length == 0 => Ok(Command::Flush),
        CMD_FLUSH => Err(refuse(Errno::Inval, "NBD_CMD_FLUSH takes no offset or length".into())),
        _ => Ok(Command::Disconnect),
    }
}

/// Appends a simple reply header (the data of a successful simple `READ` follows it).
pub fn encode_simple_reply(out: &mut BytesMut, cookie: u64, error: Option<Errno>) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error.map_or(0, |e| e as u32));
    out.put_u64(cookie);
}

/// Appends the header of a final `OFFSET_DATA` chunk of `length` bytes at `offset`; the data
/// follows it.
pub fn encode_data_chunk_header(out: &mut BytesMut, cookie: u64, offset: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(REPLY_TYPE_OFFSET_DATA);
    out.put_u64(cookie);
    out.put_u32(length + 8);
    out.put_u64(offset);
}

/// Appends a final structured chunk with no payload (success).
pub fn encode_done_chunk(out: &mut BytesMut, cookie: u64) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(REPLY_TYPE_NONE);
    out.put_u64(cookie);
    out.put_u32(0);
}

/// Appends a final structured error chunk with a message.
pub fn encode_error_chunk(out: &mut BytesMut, cookie: u64, errno: Errno, message: &str) {
    let message = truncate(message);
    let length = u16::try_from(message.len()).expect("truncated to 4096 bytes");
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(REPLY_FLAG_DONE);
    out.put_u16(REPLY_TYPE_ERROR);
    out.put_u64(cookie);
    out.put_u32(6 + u32::from(length));
    out.put_u32(errno as u32);
    out.put_u16(length);
    out.put_slice(message.as_bytes());
}

/// A reply as the client sees it (parsed back in tests and by the fuzz target's checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply: error (0 for success) and cookie.
    Simple {
        /// The error number, 0 for success.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured chunk.
    Chunk {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// The chunk's payload.
        payload: Bytes,
    },
}

/// Parses one reply header (and a chunk's payload) from `input`; returns it and the bytes it
/// took, or `None` when more input is needed. A simple reply's read data is not included (its
/// length is only known from the request).
pub fn parse_reply(input: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    if input.len() < 4 {
        return Ok(None);
    }
    match be_u32(input, 0) {
        SIMPLE_REPLY_MAGIC => {
            if input.len() < 16 {
                return Ok(None);
            }
            Ok(Some((Reply::Simple { error: be_u32(input, 4), cookie: be_u64(input, 8) }, 16)))
        }
        STRUCTURED_REPLY_MAGIC => {
            if input.len() < 20 {
                return Ok(None);
            }
            let length = be_u32(input, 16) as usize;
            if input.len() - 20 < length {
                return Ok(None);
            }
            let reply = Reply::Chunk {
                flags: be_u16(input, 4),
                kind: be_u16(input, 6),
                cookie: be_u64(input, 8),
                payload: Bytes::copy_from_slice(&input[20..20 + length]),
            };
            Ok(Some((reply, 20 + length)))
        }
        other => Err(ProtocolError::BadMagic { what: "reply", found: u64::from(other) }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use proptest::prelude::*;

    use super::*;

    fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u64(IHAVEOPT);
        out.put_u32(option);
        out.put_u32(data.len() as u32);
        out.put_slice(data);
        out
    }

    fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut data = Vec::new();
        data.put_u32(name.len() as u32);
        data.put_slice(name);
        data.put_u16(requests.len() as u16);
        for r in requests {
            data.put_u16(*r);
        }
        data
    }

    #[test]
    fn the_greeting_is_the_newstyle_one() {
        let mut out = BytesMut::new();
        encode_greeting(&mut out);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_are_checked() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]).unwrap(), ClientFlags { no_zeroes: true });
        assert_eq!(parse_client_flags(&[0, 0, 0, 1]).unwrap(), ClientFlags { no_zeroes: false });
        assert!(parse_client_flags(&[0, 0, 0, 0]).is_err(), "not fixed newstyle");
        assert!(parse_client_flags(&[0, 0, 0, 5]).is_err(), "an unknown flag");
        assert!(parse_client_flags(&[0, 0, 1]).is_err(), "short");
    }

    /// One row per option case: what a client sends and what the parser makes of it.
    #[test]
    fn options_parse_as_the_table_says() {
        let long_name = vec![b'x'; MAX_STRING_BYTES + 1];
        let rows: Vec<(u32, Vec<u8>, ClientOption)> = vec![
            (OPT_EXPORT_NAME, b"vol_a".to_vec(), ClientOption::ExportName("vol_a".into())),
            (OPT_EXPORT_NAME, Vec::new(), ClientOption::ExportName(String::new())),
            (OPT_ABORT, Vec::new(), ClientOption::Abort),
            (OPT_LIST, Vec::new(), ClientOption::List),
            (OPT_STARTTLS, Vec::new(), ClientOption::StartTls),
            (OPT_STRUCTURED_REPLY, Vec::new(), ClientOption::StructuredReply),
            (
                OPT_GO,
                info_data(b"vol_a", &[INFO_BLOCK_SIZE, INFO_NAME]),
                ClientOption::Info { go: true, name: "vol_a".into(), requests: vec![3, 1] },
            ),
            (
                OPT_INFO,
                info_data(b"", &[]),
                ClientOption::Info { go: false, name: String::new(), requests: vec![] },
            ),
            (11, Vec::new(), ClientOption::Unsupported(11)),
            (10, b"anything".to_vec(), ClientOption::Unsupported(10)),
        ];
        for (option, data, want) in rows {
            assert_eq!(parse_option(option, &data), want, "option {option} with {data:?}");
        }
        let invalid =
            |option: u32, data: &[u8]| matches!(parse_option(option, data), ClientOption::Invalid { .. });
        assert!(invalid(OPT_LIST, b"x"));
        assert!(invalid(OPT_STRUCTURED_REPLY, b"x"));
        assert!(invalid(OPT_EXPORT_NAME, &long_name));
        assert!(invalid(OPT_EXPORT_NAME, b"a\0b"));
        assert!(invalid(OPT_EXPORT_NAME, &[0xff, 0xfe]));
        assert!(invalid(OPT_GO, &info_data(&long_name, &[])));
        assert!(invalid(OPT_GO, &[0, 0, 0]));
        let mut lying = info_data(b"vol_a", &[INFO_NAME]);
        lying[3] = 200;
        assert!(invalid(OPT_GO, &lying), "a name length past the data");
        let mut extra = info_data(b"vol_a", &[INFO_NAME]);
        extra.push(0);
        assert!(invalid(OPT_GO, &extra), "trailing bytes");
        let mut huge = info_data(b"vol_a", &[]);
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(invalid(OPT_INFO, &huge), "a name length that overflows");
    }

    #[test]
    fn option_headers_are_checked() {
        let header = parse_option_header(&option_bytes(OPT_GO, &[0; 6])).unwrap();
        assert_eq!(header, OptionHeader { option: OPT_GO, length: 6 });
        let mut bad = option_bytes(OPT_GO, &[]);
        bad[0] ^= 1;
        assert!(matches!(parse_option_header(&bad), Err(ProtocolError::BadMagic { .. })));
        let mut long = option_bytes(OPT_EXPORT_NAME, &[]);
        long[12..16].copy_from_slice(&(MAX_OPTION_BYTES + 1).to_be_bytes());
        assert!(matches!(parse_option_header(&long), Err(ProtocolError::OptionTooLong { .. })));
    }

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 7, offset, length }
    }

    /// One row per request case of the hostile-input list, checked against a 1 MiB
    /// export.
    #[test]
    fn requests_are_checked_as_the_table_says() {
        const SIZE: u64 = 1 << 20;
        let rows: Vec<(RequestHeader, Result<Command, Errno>)> = vec![
            (header(CMD_READ, 0, 0, 4096), Ok(Command::Read { offset: 0, length: 4096 })),
            (header(CMD_READ, CMD_FLAG_DF, SIZE - 1, 1), Ok(Command::Read { offset: SIZE - 1, length: 1 })),
            (header(CMD_READ, 0, SIZE - 1, 2), Err(Errno::Inval)),
            (header(CMD_READ, 0, u64::MAX, 1), Err(Errno::Inval)),
            (header(CMD_READ, 0, 0, MAX_PAYLOAD_BYTES + 1), Err(Errno::Overflow)),
            (header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512), Ok(Command::Write { offset: 4096, length: 512 })),
            (header(CMD_WRITE, 0, SIZE, 1), Err(Errno::NoSpc)),
            (header(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), Err(Errno::Inval)),
            (header(CMD_WRITE, 0, 0, u32::MAX), Err(Errno::Overflow)),
            (header(CMD_FLUSH, 0, 0, 0), Ok(Command::Flush)),
            (header(CMD_FLUSH, 0, 1, 0), Err(Errno::Inval)),
            (header(CMD_TRIM, 0, 0, SIZE as u32), Ok(Command::Trim { offset: 0, length: SIZE as u32 })),
            (header(CMD_TRIM, 0, 1, SIZE as u32), Err(Errno::NoSpc)),
            (
                header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 8192),
                Ok(Command::WriteZeroes { offset: 0, length: 8192 }),
            ),
            (header(CMD_WRITE_ZEROES, 1 << 4, 0, 8192), Err(Errno::Inval)),
            (header(CMD_DISC, 0, 0, 0), Ok(Command::Disconnect)),
            (header(5, 0, 0, 0), Err(Errno::Inval)),
            (header(7, 0, 0, 4096), Err(Errno::Inval)),
            (header(0xffff, 0, 0, 0), Err(Errno::Inval)),
        ];
        for (request, want) in rows {
            let got = check_request(&request, SIZE).map_err(|r| r.errno);
            assert_eq!(got, want, "{request:?}");
        }
    }

    #[test]
    fn a_bad_request_magic_ends_the_connection() {
        let mut out = BytesMut::new();
        encode_request(&mut out, &header(CMD_READ, 0, 0, 1));
        out[0] = 0;
        assert!(matches!(parse_request(&out), Err(ProtocolError::BadMagic { .. })));
        assert!(matches!(parse_request(&out[..27]), Err(ProtocolError::Short { .. })));
    }

    #[test]
    fn replies_parse_back() {
        let mut out = BytesMut::new();
        encode_simple_reply(&mut out, 9, Some(Errno::Io));
        encode_data_chunk_header(&mut out, 10, 4096, 3);
        out.put_slice(b"abc");
        encode_error_chunk(&mut out, 11, Errno::NoSpc, "full");
        encode_done_chunk(&mut out, 12);
        let mut input = &out[..];
        let mut replies = Vec::new();
        while let Some((reply, used)) = parse_reply(input).unwrap() {
            replies.push(reply);
            input = &input[used..];
        }
        assert!(input.is_empty());
        assert_eq!(replies[0], Reply::Simple { error: 5, cookie: 9 });
        let Reply::Chunk { flags, kind, cookie, payload } = &replies[1] else { panic!() };
        assert_eq!((*flags, *kind, *cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 10));
        assert_eq!(&payload[..], &[0, 0, 0, 0, 0, 0, 16, 0, b'a', b'b', b'c']);
        let Reply::Chunk { kind, payload, .. } = &replies[2] else { panic!() };
        assert_eq!(*kind, REPLY_TYPE_ERROR);
        assert_eq!(&payload[..], &[0, 0, 0, 28, 0, 4, b'f', b'u', b'l', b'l']);
        assert_eq!(replies[3], Reply::Chunk { flags: 1, kind: 0, cookie: 12, payload: Bytes::new() });
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(MAX_STRING_BYTES);
        let mut out = BytesMut::new();
        encode_option_error(&mut out, OPT_GO, REP_ERR_UNKNOWN, &message);
        let length = be_u32(&out, 16) as usize;
        assert!(length <= MAX_STRING_BYTES);
        assert!(std::str::from_utf8(&out[20..]).is_ok());
    }

    proptest! {
        /// A request header survives encoding and parsing unchanged.
        #[test]
        fn request_headers_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let request = RequestHeader { flags, kind, cookie, offset, length };
            let mut out = BytesMut::new();
            encode_request(&mut out, &request);
            prop_assert_eq!(out.len(), REQUEST_BYTES);
            prop_assert_eq!(parse_request(&out).unwrap(), request);
        }

        /// INFO and GO requests survive encoding and parsing unchanged.
        #[test]
        fn info_requests_round_trip(
            go: bool,
            name in "[a-z0-9_.é-]{0,300}",
            requests in proptest::collection::vec(any::<u16>(), 0..20),
        ) {
            let option = if go { OPT_GO } else { OPT_INFO };
            let bytes = option_bytes(option, &info_data(name.as_bytes(), &requests));
            let header = parse_option_header(&bytes).unwrap();
            prop_assert_eq!(header.length as usize, bytes.len() - OPTION_HEADER_BYTES);
            let parsed = parse_option(header.option, &bytes[OPTION_HEADER_BYTES..]);
            prop_assert_eq!(parsed, ClientOption::Info { go, name, requests });
        }

        /// Export names survive `NBD_OPT_EXPORT_NAME` and `NBD_REP_SERVER`.
        #[test]
        fn names_round_trip(name in "[^\u{0}]{0,200}") {
            prop_assert_eq!(parse_option(OPT_EXPORT_NAME, name.as_bytes()), ClientOption::ExportName(name.clone()));
            let mut out = BytesMut::new();
            encode_list_entry(&mut out, &name);
            prop_assert_eq!(be_u32(&out, 20) as usize, name.len());
            prop_assert_eq!(&out[24..], name.as_bytes());
        }

        /// Structured chunks survive encoding and parsing, whatever their cookie and message.
        #[test]
        fn chunks_round_trip(cookie: u64, offset: u64, data in proptest::collection::vec(any::<u8>(), 0..512), message in ".{0,100}") {
            let mut out = BytesMut::new();
            encode_data_chunk_header(&mut out, cookie, offset, data.len() as u32);
            out.put_slice(&data);
            encode_error_chunk(&mut out, cookie, Errno::Io, &message);
            let (first, used) = parse_reply(&out).unwrap().unwrap();
            let Reply::Chunk { cookie: c, payload, .. } = first else { panic!() };
            prop_assert_eq!(c, cookie);
            prop_assert_eq!(be_u64(&payload, 0), offset);
            prop_assert_eq!(&payload[8..], &data[..]);
            let (second, rest) = parse_reply(&out[used..]).unwrap().unwrap();
            prop_assert_eq!(used + rest, out.len());
            let Reply::Chunk { payload, .. } = second else { panic!() };
            prop_assert_eq!(&payload[6..], message.as_bytes());
        }

        /// No input makes the parsers panic (the fuzz target runs the same on more inputs).
        #[test]
        fn parsers_never_panic(option: u32, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_option(option, &data);
            let _ = parse_request(&data);
            let _ = parse_option_header(&data);
            let _ = parse_client_flags(&data);
            if let Ok(request) = parse_request(&data) {
                let _ = check_request(&request, u64::from(option));
            }
        }
    }
}
