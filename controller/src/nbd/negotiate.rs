//! The option haggling of the fixed newstyle handshake, sans IO: a parsed option in, the reply
//! bytes and what happens next out. The exports come from a trait, so the rules are tested from
//! a table without a node or a socket.
//!
//! Invariants:
//! - every option gets exactly one answer (one or more replies ending in `NBD_REP_ACK` or one
//!   error), except `NBD_OPT_EXPORT_NAME`, which cannot carry an error: an unknown name closes
//!   the connection, as the protocol requires;
//! - an option we do not implement (extended headers, meta contexts, TLS) is answered
//!   `NBD_REP_ERR_UNSUP`, so a client that asks for it first (qemu 10) goes on without it;
//! - an export that exists but must not be served (an NVFAILed volume, DESIGN §9) is refused
//!   before it is looked up: `NBD_REP_ERR_POLICY` with the reason for `NBD_OPT_GO`/`INFO`, a
//!   close for `NBD_OPT_EXPORT_NAME`; it never enters transmission;
//! - transmission starts only after a successful `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`, with
//!   structured replies exactly when the client asked for them before.

use bytes::BytesMut;

use super::codec::{
    self, ClientFlags, ClientOption, ExportInfo, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY,
    REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
};

/// Why an export (or the list) is not available.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// The server is shutting down (`NBD_REP_ERR_SHUTDOWN`), rather than the export being
    /// unknown or not served here now (`NBD_REP_ERR_UNKNOWN`).
    pub shutdown: bool,
    /// For the client's error message.
    pub message: String,
}

/// The exports a connection may choose from.
pub trait Exports {
    /// The names of every export served now.
    fn list(&self) -> Result<Vec<String>, Unavailable>;
    /// One export.
    fn lookup(&self, name: &str) -> Result<ExportInfo, Unavailable>;
    /// Why export `name` exists but is refused by policy (an NVFAILed volume, DESIGN §9), if
    /// it is: answered `NBD_REP_ERR_POLICY` rather than "unknown", so the client's message
    /// says what to do. Asked before `lookup`.
    fn refused(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
}

/// What the connection does after an option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Read the next option.
    Continue,
    /// Close the connection (after sending the reply bytes).
    Close,
    /// Enter transmission on this export.
    Transmit {
        /// The export.
        export: ExportInfo,
        /// Whether replies are structured.
        structured: bool,
    },
}

/// The negotiation of one connection.
#[derive(Clone, Debug)]
pub struct Negotiation {
    client: ClientFlags,
    structured: bool,
}

impl Negotiation {
    /// A negotiation with a client that sent `client` flags.
    pub fn new(client: ClientFlags) -> Negotiation {
        Negotiation { client, structured: false }
    }

    /// Answers `option` (the parsed form of option code `code`) into `out`.
    pub fn handle(
        &mut self,
        code: u32,
        option: ClientOption,
        exports: &dyn Exports,
        out: &mut BytesMut,
    ) -> Next {
        match option {
            // This option cannot carry an error; the protocol says to close.
            ClientOption::ExportName(name) if exports.refused(&name).is_some() => Next::Close,
            ClientOption::ExportName(name) => match exports.lookup(&name) {
                Ok(export) => {
                    codec::encode_export_name_reply(out, &export, self.client.no_zeroes);
                    Next::Transmit { export, structured: self.structured }
                }
                // This option cannot carry an error; the protocol says to close.
                Err(_) => Next::Close,
            },
            ClientOption::Abort => {
                codec::encode_option_reply(out, OPT_ABORT, REP_ACK, &[]);
                Next::Close
            }
            ClientOption::List => {
                match exports.list() {
                    Ok(names) => {
                        for name in names {
                            codec::encode_list_entry(out, &name);
                        }
                        codec::encode_option_reply(out, OPT_LIST, REP_ACK, &[]);
                    }
                    Err(why) => codec::encode_option_error(out, OPT_LIST, error_code(&why), &why.message),
                }
                Next::Continue
            }
            ClientOption::StartTls => {
                codec::encode_option_error(
                    out,
                    OPT_STARTTLS,
                    REP_ERR_UNSUP,
                    "TLS is not offered (DESIGN §13)",
                );
                Next::Continue
            }
            ClientOption::Info { go, name, requests } => {
                if let Some(why) = exports.refused(&name) {
                    codec::encode_option_error(out, code, REP_ERR_POLICY, &why);
                    return Next::Continue;
                }
                match exports.lookup(&name) {
                    Ok(export) => {
                        codec::encode_info_replies(out, code, &export, &requests);
                        if go {
                            Next::Transmit { export, structured: self.structured }
                        } else {
                            Next::Continue
                        }
                    }
                    Err(why) => {
                        codec::encode_option_error(out, code, error_code(&why), &why.message);
                        Next::Continue
                    }
                }
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                codec::encode_option_reply(out, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
                Next::Continue
            }
            ClientOption::Invalid { option, reason } => {
                codec::encode_option_error(out, option, REP_ERR_INVALID, &reason);
                Next::Continue
            }
            ClientOption::Unsupported(option) => {
                codec::encode_option_error(
                    out,
                    option,
                    REP_ERR_UNSUP,
                    &format!("option {option} is not supported"),
                );
                Next::Continue
            }
        }
    }
}

fn error_code(why: &Unavailable) -> u32 {
    if why.shutdown { REP_ERR_SHUTDOWN } else { REP_ERR_UNKNOWN }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;
    use crate::nbd::codec::{OPT_EXPORT_NAME, OPT_GO, OPT_INFO, REP_INFO, REP_SERVER};

    struct Fixed {
        serving: bool,
    }

    /// `vol_a` exists and is served; `vol_f` exists and is NVFAILed.
    struct WithNvfailed;

    impl Exports for WithNvfailed {
        fn list(&self) -> Result<Vec<String>, Unavailable> {
            Ok(vec!["vol_a".into(), "vol_f".into()])
        }
        fn lookup(&self, name: &str) -> Result<ExportInfo, Unavailable> {
            // As the node's: the NVFAILed volume exists, so a lookup alone would not refuse it.
            Ok(ExportInfo { name: name.into(), size: 1 << 20, flags: 1, description: "test".into() })
        }
        fn refused(&self, name: &str) -> Option<String> {
            (name == "vol_f").then(|| "volume vol_f is NVFAILed: mcctl volume modify ...".to_string())
        }
    }

    impl Exports for Fixed {
        fn list(&self) -> Result<Vec<String>, Unavailable> {
            if !self.serving {
                return Err(Unavailable { shutdown: true, message: "stopping".into() });
            }
            Ok(vec!["vol_a".into(), "vol_b".into()])
        }
        fn lookup(&self, name: &str) -> Result<ExportInfo, Unavailable> {
            if !self.serving {
                return Err(Unavailable { shutdown: true, message: "stopping".into() });
            }
            if name != "vol_a" {
                return Err(Unavailable { shutdown: false, message: format!("no export {name:?}") });
            }
            Ok(ExportInfo { name: name.into(), size: 1 << 20, flags: 1, description: "test".into() })
        }
    }

    /// The reply types in `out`, in order.
    fn reply_types(out: &[u8]) -> Vec<u32> {
        let mut types = Vec::new();
        let mut at = 0;
        while at < out.len() {
            // Magic (8), option (4), reply type (4), length (4), data.
            let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
            let length = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
            types.push(kind);
            at += 20 + length;
        }
        types
    }

    fn info(go: bool, name: &str) -> ClientOption {
        ClientOption::Info { go, name: name.into(), requests: vec![] }
    }

    /// One row per option: what the server answers and what happens next.
    #[test]
    fn options_are_answered_as_the_table_says() {
        let serving = Fixed { serving: true };
        let stopping = Fixed { serving: false };
        let transmit = |structured| Next::Transmit { export: serving.lookup("vol_a").unwrap(), structured };
        let rows: Vec<(&Fixed, u32, ClientOption, Vec<u32>, Next)> = vec![
            (&serving, OPT_LIST, ClientOption::List, vec![REP_SERVER, REP_SERVER, REP_ACK], Next::Continue),
            (&stopping, OPT_LIST, ClientOption::List, vec![REP_ERR_SHUTDOWN], Next::Continue),
            (&serving, OPT_INFO, info(false, "vol_a"), vec![REP_INFO, REP_INFO, REP_ACK], Next::Continue),
            (&serving, OPT_GO, info(true, "vol_a"), vec![REP_INFO, REP_INFO, REP_ACK], transmit(false)),
            (&serving, OPT_GO, info(true, "nope"), vec![REP_ERR_UNKNOWN], Next::Continue),
            (&serving, OPT_GO, info(true, ""), vec![REP_ERR_UNKNOWN], Next::Continue),
            (&stopping, OPT_GO, info(true, "vol_a"), vec![REP_ERR_SHUTDOWN], Next::Continue),
            (&serving, OPT_ABORT, ClientOption::Abort, vec![REP_ACK], Next::Close),
            (&serving, OPT_STARTTLS, ClientOption::StartTls, vec![REP_ERR_UNSUP], Next::Continue),
            (&serving, 11, ClientOption::Unsupported(11), vec![REP_ERR_UNSUP], Next::Continue),
            (
                &serving,
                OPT_LIST,
                ClientOption::Invalid { option: OPT_LIST, reason: "x".into() },
                vec![REP_ERR_INVALID],
                Next::Continue,
            ),
            (&serving, OPT_EXPORT_NAME, ClientOption::ExportName("nope".into()), vec![], Next::Close),
        ];
        for (exports, code, option, replies, next) in rows {
            let mut negotiation = Negotiation::new(ClientFlags { no_zeroes: true });
            let mut out = BytesMut::new();
            let got = negotiation.handle(code, option.clone(), exports, &mut out);
            assert_eq!(got, next, "{option:?}");
            assert_eq!(reply_types(&out), replies, "{option:?}");
        }
    }

    /// An NVFAILed volume must never enter transmission (DESIGN §9): `GO` and `INFO` get
    /// `NBD_REP_ERR_POLICY` with the reason (the negotiation goes on, so the client can pick
    /// another export), `EXPORT_NAME` closes; other exports are unaffected.
    #[test]
    fn an_nvfailed_export_is_refused_by_policy() {
        let exports = WithNvfailed;
        for (code, option) in [(OPT_GO, info(true, "vol_f")), (OPT_INFO, info(false, "vol_f"))] {
            let mut negotiation = Negotiation::new(ClientFlags { no_zeroes: true });
            let mut out = BytesMut::new();
            assert_eq!(negotiation.handle(code, option.clone(), &exports, &mut out), Next::Continue);
            assert_eq!(reply_types(&out), vec![REP_ERR_POLICY], "{option:?}");
            let message = String::from_utf8_lossy(&out[20..]);
            assert!(message.contains("NVFAILed") && message.contains("mcctl volume modify"), "{message}");
            // The same connection may still go on to a served export.
            let mut out = BytesMut::new();
            let next = negotiation.handle(OPT_GO, info(true, "vol_a"), &exports, &mut out);
            assert!(matches!(next, Next::Transmit { .. }), "{next:?}");
        }
        let mut negotiation = Negotiation::new(ClientFlags { no_zeroes: true });
        let mut out = BytesMut::new();
        let next =
            negotiation.handle(OPT_EXPORT_NAME, ClientOption::ExportName("vol_f".into()), &exports, &mut out);
        assert_eq!(next, Next::Close);
        assert!(out.is_empty(), "EXPORT_NAME cannot carry an error");
        // Listing still names it: it exists, and the refusal says why it is not served.
        let mut out = BytesMut::new();
        negotiation.handle(OPT_LIST, ClientOption::List, &exports, &mut out);
        assert_eq!(reply_types(&out), vec![REP_SERVER, REP_SERVER, REP_ACK]);
    }

    #[test]
    fn structured_replies_apply_to_the_transmission_that_follows() {
        let exports = Fixed { serving: true };
        let mut negotiation = Negotiation::new(ClientFlags { no_zeroes: false });
        let mut out = BytesMut::new();
        assert_eq!(
            negotiation.handle(OPT_STRUCTURED_REPLY, ClientOption::StructuredReply, &exports, &mut out),
            Next::Continue
        );
        assert_eq!(reply_types(&out), vec![REP_ACK]);
        let mut out = BytesMut::new();
        let next =
            negotiation.handle(OPT_EXPORT_NAME, ClientOption::ExportName("vol_a".into()), &exports, &mut out);
        assert!(matches!(next, Next::Transmit { structured: true, .. }));
        assert_eq!(out.len(), 8 + 2 + 124, "size, flags and the zeroes the client did not decline");
    }
}
