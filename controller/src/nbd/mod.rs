//! The NBD export (DESIGN §9): hosts read and write volumes over the Network Block Device
//! protocol, newstyle fixed handshake, with structured replies, many requests in flight per
//! connection and several connections per export.
//!
//! - `codec`: the wire format, sans IO (parsing and encoding; fuzzed);
//! - `negotiate`: the option haggling as a state machine over an `Exports` trait;
//! - `server`: the tokio transport over the node's write path.

pub mod codec;
pub mod negotiate;
pub mod server;
