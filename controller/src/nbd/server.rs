//! The NBD transport (DESIGN §9): a tokio server that runs the sans-IO codec and negotiation
//! over TCP and executes requests on the node's write path.
//!
//! Invariants:
//! - a volume is exported only while this node serves it (`Node::volume` at its current
//!   epoch, not fenced, not offline, not NVFAILed); each request is checked again by the write
//!   path, so a volume NVFAILed while a connection is open fails its I/O with `EIO` from then on
//!   (DESIGN §9), and a new connection is refused with `NBD_REP_ERR_POLICY` and the reason;
//! - a write is submitted only once its whole payload has arrived: a connection cut mid-payload
//!   applies nothing; a write is answered only when the write path acknowledged it (S1), so
//!   FLUSH and FUA need no I/O;
//! - many requests run at once per connection and are answered as they finish (out of order),
//!   bounded by `MAX_INFLIGHT_BYTES` of payload so a client cannot make the server buffer
//!   without limit; reads and writes of every connection go through the one write cache, so
//!   `CAN_MULTI_CONN` is advertised;
//! - a protocol violation that leaves the stream out of step (bad magic, a write above the
//!   maximum payload, an option too long to skip) ends the connection after the requests in
//!   flight are answered; it never panics and never touches a volume;
//! - on shutdown the server stops accepting, stops reading requests, answers those in flight
//!   and closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nvlog::OpKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::codec::{self, Command, Errno, ExportInfo, OPTION_HEADER_BYTES, REQUEST_BYTES};
use super::negotiate::{Exports, Negotiation, Next, Unavailable};
use crate::node::{DataError, Node, Phase};

/// How long a client may take for each step of the handshake before it is disconnected.
pub const HANDSHAKE_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The most options one handshake may send (a client looping on options is cut off).
pub const MAX_OPTIONS: usize = 256;
/// Payload bytes of one connection's requests in flight (reads and writes), at most.
pub const MAX_INFLIGHT_BYTES: u64 = 96 << 20;
/// The unit of the in-flight budget.
const BUDGET_UNIT_BYTES: u64 = 4096;
/// The in-flight budget in units.
const BUDGET_UNITS: usize = (MAX_INFLIGHT_BYTES / BUDGET_UNIT_BYTES) as usize;

/// The transmission flags of every export: flush and FUA (no-ops: an acknowledged write is
/// already durable in the mirrored NVLog), trim, write-zeroes, multi-conn (one cache for all
/// connections).
pub const EXPORT_FLAGS: u16 = codec::TFLAG_HAS_FLAGS
    | codec::TFLAG_SEND_FLUSH
    | codec::TFLAG_SEND_FUA
    | codec::TFLAG_SEND_TRIM
    | codec::TFLAG_SEND_WRITE_ZEROES
    | codec::TFLAG_CAN_MULTI_CONN;

/// Labels of the per-command counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
}

/// The NBD counters (`/metrics`).
#[derive(Clone, Debug, Default)]
pub struct NbdMetrics {
    connections: Gauge,
    requests: Family<CommandLabels, Counter>,
    errors: Family<CommandLabels, Counter>,
    protocol_errors: Counter,
}

impl NbdMetrics {
    /// Registers the counters.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("controller_nbd_connections", "NBD connections open", self.connections.clone());
        registry.register(
            "controller_nbd_requests",
            "NBD requests received, by command",
            self.requests.clone(),
        );
        registry.register(
            "controller_nbd_errors",
            "NBD requests answered with an error",
            self.errors.clone(),
        );
        registry.register(
            "controller_nbd_protocol_errors",
            "NBD connections ended by a protocol violation",
            self.protocol_errors.clone(),
        );
    }
}

/// The commands, as the counters name them.
const COMMANDS: [&str; 6] = ["read", "write", "flush", "trim", "write_zeroes", "disconnect"];

fn command_index(command: &Command) -> usize {
    match command {
        Command::Read { .. } => 0,
        Command::Write { .. } => 1,
        Command::Flush => 2,
        Command::Trim { .. } => 3,
        Command::WriteZeroes { .. } => 4,
        Command::Disconnect => 5,
    }
}

/// One connection's handles on its counters, looked up once: a family lookup takes a lock and
/// hashes the labels, which the request path should not pay.
struct Counters {
    requests: [Counter; 6],
    errors: [Counter; 6],
    refused: Counter,
}

impl NbdMetrics {
    fn counters(&self) -> Counters {
        let of = |family: &Family<CommandLabels, Counter>, command| {
            family.get_or_create(&CommandLabels { command }).clone()
        };
        Counters {
            requests: COMMANDS.map(|command| of(&self.requests, command)),
            errors: COMMANDS.map(|command| of(&self.errors, command)),
            refused: of(&self.errors, "refused"),
        }
    }
}

/// The node's volumes as exports.
struct NodeExports<'a>(&'a Node);

fn unavailable(node: &Node, e: &DataError) -> Unavailable {
    let shutdown = matches!(e, DataError::NotServing { phase, .. } if *phase == Phase::Stopping.name());
    Unavailable { shutdown, message: format!("node {}: {e}", node.node_id()) }
}

impl Exports for NodeExports<'_> {
    fn list(&self) -> Result<Vec<String>, Unavailable> {
        self.0.check_serving().map_err(|e| unavailable(self.0, &e))?;
        let mut names: Vec<String> = self
            .0
            .aggregates()
            .iter()
            .flat_map(|aggr| aggr.table().volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>())
            .collect();
        names.sort();
        Ok(names)
    }

    fn refused(&self, name: &str) -> Option<String> {
        match self.0.volume(name) {
            Err(e @ DataError::NvFailed { .. }) => Some(format!("node {}: {e}", self.0.node_id())),
            _ => None,
        }
    }

    fn lookup(&self, name: &str) -> Result<ExportInfo, Unavailable> {
        self.0.check_serving().map_err(|e| unavailable(self.0, &e))?;
        let volume = self.0.volume(name).map_err(|e| {
            let mut why = unavailable(self.0, &e);
            if let Ok(names) = self.list() {
                why.message = format!("{}; exports here: {}", why.message, names.join(", "));
            }
            why
        })?;
        let aggregate = volume.aggr.table().name.clone();
        Ok(ExportInfo {
            name: name.to_string(),
            size: volume.entry.size,
            flags: EXPORT_FLAGS,
            description: format!("volume {name} of aggregate {aggregate}, node {}", self.0.node_id()),
        })
    }
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Serves NBD on `listener` until `stop` turns true; then waits for the open connections to
/// answer what is in flight and close.
pub async fn serve(listener: TcpListener, node: Arc<Node>, metrics: NbdMetrics, stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let mut stopped = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!("nbd", node = node.node_id(), %peer);
                    let (node, metrics, stop) = (node.clone(), metrics.clone(), stop.clone());
                    connections.spawn(
                        async move {
                            metrics.connections.inc();
                            if let Err(e) = connection(stream, peer, &node, &metrics, stop).await {
                                tracing::info!("connection ends: {e}");
                            }
                            metrics.connections.dec();
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    // Out of descriptors and the like: the listener stays; try again shortly.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopping(&mut stopped) => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Why a connection ended other than by the client's `NBD_CMD_DISC` or close.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] codec::ProtocolError),
    #[error("the client took more than {HANDSHAKE_STEP_TIMEOUT:?} for a handshake step")]
    HandshakeTimeout,
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

async fn step<T>(future: impl Future<Output = std::io::Result<T>>) -> Result<T, ConnectionError> {
    match tokio::time::timeout(HANDSHAKE_STEP_TIMEOUT, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ConnectionError::HandshakeTimeout),
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    node: &Arc<Node>,
    metrics: &NbdMetrics,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let mut read = BufReader::with_capacity(256 << 10, read);
    let mut write = BufWriter::with_capacity(256 << 10, write);
    let Some((export, structured)) = handshake(&mut read, &mut write, node).await.inspect_err(|e| {
        if matches!(e, ConnectionError::Protocol(_)) {
            metrics.protocol_errors.inc();
        }
    })?
    else {
        return Ok(());
    };
    tracing::info!(volume = export.name, structured, "transmission begins");
    let result = transmission(read, write, node, metrics, &export, structured, stop).await;
    if matches!(result, Err(ConnectionError::Protocol(_))) {
        metrics.protocol_errors.inc();
    }
    tracing::debug!(%peer, volume = export.name, "transmission ends");
    result
}

/// Runs the option haggling; `None` when the client aborted or the export was refused.
async fn handshake(
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut BufWriter<OwnedWriteHalf>,
    node: &Node,
) -> Result<Option<(ExportInfo, bool)>, ConnectionError> {
    let mut out = BytesMut::new();
    codec::encode_greeting(&mut out);
    step(write.write_all(&out)).await?;
    step(write.flush()).await?;
    let mut flags = [0u8; 4];
    step(read.read_exact(&mut flags)).await?;
    let client = codec::parse_client_flags(&flags)?;
    let mut negotiation = Negotiation::new(client);
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; OPTION_HEADER_BYTES];
        step(read.read_exact(&mut header)).await?;
        let header = codec::parse_option_header(&header)?;
        let mut data = vec![0u8; header.length as usize];
        step(read.read_exact(&mut data)).await?;
        let option = codec::parse_option(header.option, &data);
        tracing::debug!(?option, "option");
        let mut out = BytesMut::new();
        let next = negotiation.handle(header.option, option, &NodeExports(node), &mut out);
        step(write.write_all(&out)).await?;
        step(write.flush()).await?;
        match next {
            Next::Continue => {}
            Next::Close => return Ok(None),
            Next::Transmit { export, structured } => return Ok(Some((export, structured))),
        }
    }
    Err(ConnectionError::TooManyOptions)
}

/// One reply to send: its header and, for a read, the data.
struct Outgoing {
    header: BytesMut,
    data: Option<Vec<u8>>,
}

fn errno(e: &DataError) -> Errno {
    match e {
        DataError::NotServing { phase, .. } if *phase == Phase::Stopping.name() => Errno::Shutdown,
        DataError::Range(_) | DataError::Invalid(_) => Errno::Inval,
        DataError::NotServing { .. }
        | DataError::NotFound(_)
        | DataError::Offline { .. }
        | DataError::NvFailed { .. }
        | DataError::Mirror(_)
        | DataError::Nvlog(_)
        | DataError::Plex(_) => Errno::Io,
    }
}

fn error_reply(cookie: u64, structured: bool, errno: Errno, message: &str) -> Outgoing {
    let mut header = BytesMut::new();
    if structured {
        codec::encode_error_chunk(&mut header, cookie, errno, message);
    } else {
        codec::encode_simple_reply(&mut header, cookie, Some(errno));
    }
    Outgoing { header, data: None }
}

/// Runs one command on the node; the reply to send.
async fn execute(
    node: &Node,
    volume: &str,
    cookie: u64,
    command: Command,
    payload: Bytes,
    structured: bool,
) -> Result<Outgoing, (Errno, String)> {
    let fail = |e: DataError| (errno(&e), e.to_string());
    let mut header = BytesMut::with_capacity(32);
    match command {
        Command::Read { offset, length } => {
            let data = node.read(volume, offset, u64::from(length)).await.map_err(fail)?;
            if data.len() != length as usize {
                return Err((Errno::Io, format!("read {} bytes of {length}", data.len())));
            }
            if structured {
                if length == 0 {
                    codec::encode_done_chunk(&mut header, cookie);
                    return Ok(Outgoing { header, data: None });
                }
                codec::encode_data_chunk_header(&mut header, cookie, offset, length);
            } else {
                codec::encode_simple_reply(&mut header, cookie, None);
            }
            return Ok(Outgoing { header, data: Some(data) });
        }
        Command::Write { offset, .. } => {
            node.write(volume, offset, payload).await.map_err(fail)?;
        }
        Command::Flush => node.flush(volume).map_err(fail)?,
        Command::Trim { offset, length } => {
            node.zero(volume, OpKind::Trim, offset, u64::from(length)).await.map_err(fail)?;
        }
        Command::WriteZeroes { offset, length } => {
            node.zero(volume, OpKind::WriteZeroes, offset, u64::from(length)).await.map_err(fail)?;
        }
        Command::Disconnect => {}
    }
    codec::encode_simple_reply(&mut header, cookie, None);
    Ok(Outgoing { header, data: None })
}

/// Writes replies as they come; flushes when none is waiting.
async fn send_replies(mut write: BufWriter<OwnedWriteHalf>, mut replies: mpsc::Receiver<Outgoing>) {
    while let Some(reply) = replies.recv().await {
        let mut next = Some(reply);
        while let Some(reply) = next.take() {
            if write.write_all(&reply.header).await.is_err() {
                return;
            }
            if let Some(data) = &reply.data
                && write.write_all(data).await.is_err()
            {
                return;
            }
            next = replies.try_recv().ok();
        }
        if write.flush().await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}

async fn transmission(
    mut read: BufReader<OwnedReadHalf>,
    write: BufWriter<OwnedWriteHalf>,
    node: &Arc<Node>,
    metrics: &NbdMetrics,
    export: &ExportInfo,
    structured: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let (replies, outgoing) = mpsc::channel::<Outgoing>(1024);
    let writer = tokio::spawn(send_replies(write, outgoing));
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS));
    let volume: Arc<str> = Arc::from(export.name.as_str());
    let counters = metrics.counters();
    let mut inflight = JoinSet::new();
    let result = loop {
        while inflight.try_join_next().is_some() {}
        let mut raw = [0u8; REQUEST_BYTES];
        // `read_exact` is not cancel safe; the only other branch ends the connection, so bytes
        // it may have taken are never needed.
        tokio::select! {
            biased;
            () = stopping(&mut stop) => break Ok(()),
            read = read.read_exact(&mut raw) => match read {
                Ok(_) => {}
                // The client closed (or the connection broke) between requests.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            },
        }
        let header = match codec::parse_request(&raw) {
            Ok(header) => header,
            Err(e) => break Err(e.into()),
        };
        let checked = codec::check_request(&header, export.size);
        if header.kind == codec::CMD_WRITE && header.length > codec::MAX_PAYLOAD_BYTES {
            // The payload cannot be skipped safely: answer, then hard disconnect (the protocol
            // allows it for a request above the advertised maximum).
            let message =
                format!("{} bytes in one write; at most {}", header.length, codec::MAX_PAYLOAD_BYTES);
            let _ = replies.send(error_reply(header.cookie, structured, Errno::Overflow, &message)).await;
            break Err(codec::ProtocolError::WriteTooLong { length: header.length }.into());
        }
        let payload_bytes = if header.kind == codec::CMD_WRITE { u64::from(header.length) } else { 0 };
        let reply_bytes = match checked {
            Ok(Command::Read { length, .. }) => u64::from(length),
            _ => 0,
        };
        let units = (payload_bytes + reply_bytes).div_ceil(BUDGET_UNIT_BYTES).max(1);
        let permit = match budget.clone().acquire_many_owned(u32::try_from(units).unwrap_or(u32::MAX)).await {
            Ok(permit) => permit,
            Err(_) => break Ok(()),
        };
        // A write's payload follows its header even when the request is refused: read it in
        // full before anything else, so the stream stays in step and a cut applies nothing.
        let payload = if payload_bytes > 0 {
            let mut data = vec![0u8; header.length as usize];
            match read.read_exact(&mut data).await {
                Ok(_) => Bytes::from(data),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::info!(
                        cookie = header.cookie,
                        "the client closed in the middle of a write's payload; nothing applied"
                    );
                    break Ok(());
                }
                Err(e) => break Err(e.into()),
            }
        } else {
            Bytes::new()
        };
        let command = match checked {
            Ok(command) => command,
            Err(refusal) => {
                counters.refused.inc();
                tracing::debug!(cookie = header.cookie, "refused: {}", refusal.message);
                if replies
                    .send(error_reply(header.cookie, structured, refusal.errno, &refusal.message))
                    .await
                    .is_err()
                {
                    break Ok(());
                }
                continue;
            }
        };
        let index = command_index(&command);
        counters.requests[index].inc();
        if command == Command::Disconnect {
            break Ok(());
        }
        let (node, errors, replies, volume) =
            (node.clone(), counters.errors[index].clone(), replies.clone(), volume.clone());
        inflight.spawn(async move {
            let reply = match execute(&node, &volume, header.cookie, command, payload, structured).await {
                Ok(reply) => reply,
                Err((errno, message)) => {
                    errors.inc();
                    tracing::debug!(cookie = header.cookie, ?errno, "{} fails: {message}", COMMANDS[index]);
                    error_reply(header.cookie, structured, errno, &message)
                }
            };
            let _ = replies.send(reply).await;
            drop(permit);
        });
    };
    // Every request read is answered before the connection closes.
    while inflight.join_next().await.is_some() {}
    drop(replies);
    let _ = writer.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN §9: I/O on an NVFAILed volume fails with `EIO` (a host's file system then stops
    /// using it), not `EINVAL` or a shutdown that makes the client reconnect and retry.
    #[test]
    fn an_nvfailed_volume_fails_io_with_eio() {
        let e = DataError::NvFailed { volume: "v".into(), reason: "why".into() };
        assert_eq!(errno(&e), Errno::Io);
        let message = e.to_string();
        assert!(message.contains("mcctl volume modify v --in-nvfailed-state false --confirm"), "{message}");
    }
}
