//! A fault-injecting TCP proxy (DESIGN §14; issue 6): every inter-site connection of a test
//! cluster goes through one, so a test can cut, delay or reset the link, each direction on its
//! own, without `tc netem` (which this machine does not have).
//!
//! Per direction (`Side::Forward`: client → target, `Side::Backward`: target → client):
//! - `Pass`: bytes are forwarded as they come;
//! - `Delay(d)`: each chunk is forwarded `d` after it arrived, in order;
//! - `Blackhole`: nothing passes and nothing is lost: the proxy stops reading, so the sender's
//!   TCP buffers fill and the peer sees silence, not an error; when the direction passes again,
//!   the held bytes arrive (what TCP's retransmissions make of a cut link that comes back);
//! - `Discard`: bytes are read and thrown away (a stream that loses data: never TCP's doing,
//!   but a way to test that a protocol notices).
//!
//! For the whole proxy: `reset()` ends every open connection with an RST; `refuse(true)`
//! closes every new connection at once (a peer that is down).
//!
//! Invariants: a chunk is never reordered or duplicated; a change of mode applies to the next
//! chunk read; dropping the proxy stops it and closes every connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What one direction does to its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    #[default]
    Pass,
    /// Forward each chunk this long after it arrived.
    Delay(Duration),
    /// Stop forwarding; hold the bytes until the mode changes.
    Blackhole,
    /// Read and throw away.
    Discard,
}

/// A direction of the proxied connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// From the connecting client to the target.
    Forward,
    /// From the target back to the client.
    Backward,
}

#[derive(Clone, Copy, Debug, Default)]
struct State {
    forward: Mode,
    backward: Mode,
    refuse: bool,
    /// Raised by `reset`: connections opened before it end with an RST.
    resets: u64,
}

/// A running proxy.
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    state: watch::Sender<State>,
    accept: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Every pump watches the state: a closed sender ends them.
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (an ephemeral port) and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        FaultProxy::start_on("127.0.0.1:0".parse().expect("a literal address"), target).await
    }

    /// Listens on `listen` and forwards to `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let state = watch::Sender::new(State::default());
        let states = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let now = *states.borrow();
                if now.refuse {
                    drop(client);
                    continue;
                }
                let states = states.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    connection(client, server, states, now.resets).await;
                });
            }
        });
        Ok(FaultProxy { address, state, accept })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sets what `side` does from its next chunk on.
    pub fn set(&self, side: Side, mode: Mode) {
        self.state.send_modify(|state| match side {
            Side::Forward => state.forward = mode,
            Side::Backward => state.backward = mode,
        });
    }

    /// Sets both directions.
    pub fn set_both(&self, mode: Mode) {
        self.set(Side::Forward, mode);
        self.set(Side::Backward, mode);
    }

    /// Ends every open connection with an RST.
    pub fn reset(&self) {
        self.state.send_modify(|state| state.resets += 1);
    }

    /// While `refuse`, new connections are closed at once.
    pub fn refuse(&self, refuse: bool) {
        self.state.send_modify(|state| state.refuse = refuse);
    }
}

/// Pumps both directions until either end closes or a reset comes; then closes both, with an
/// RST after a reset.
async fn connection(client: TcpStream, server: TcpStream, states: watch::Sender<State>, resets: u64) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let forward = pump(client_read, server_write, states.subscribe(), Side::Forward, resets);
    let backward = pump(server_read, client_write, states.subscribe(), Side::Backward, resets);
    let (forward, backward) = tokio::join!(forward, backward);
    let reset = forward.2 || backward.2;
    for (read, write) in [(forward.0, backward.1), (backward.0, forward.1)] {
        if let Ok(stream) = read.reunite(write) {
            if reset {
                // A zero linger makes the close send an RST at once; the deprecation warns of
                // blocking with a non-zero linger and unsent data, which cannot happen here.
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
            }
            drop(stream);
        }
    }
}

type Ends = (tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf, bool);

/// One direction. Returns its halves and whether it ended because of a reset.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut states: watch::Receiver<State>,
    side: Side,
    resets: u64,
) -> Ends {
    // Delayed chunks go through a queue drained by a writer that sleeps until each is due.
    let (delayed_tx, mut delayed_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut buf = vec![0u8; 64 * 1024];
    let mut reset = false;
    loop {
        let mode = |state: &State| match side {
            Side::Forward => state.forward,
            Side::Backward => state.backward,
        };
        if mode(&states.borrow()) == Mode::Blackhole && delayed_rx.is_empty() {
            // Hold: read nothing until the mode changes (or a reset ends the connection).
            if states.changed().await.is_err() {
                break;
            }
            if states.borrow().resets != resets {
                reset = true;
                break;
            }
            continue;
        }
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mode = mode(&states.borrow());
                match mode {
                    Mode::Pass if delayed_rx.is_empty() => {
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Behind delayed chunks, a passed one waits its turn (no reordering).
                    Mode::Pass => {
                        let _ = delayed_tx.send((Instant::now(), buf[..n].to_vec()));
                    }
                    Mode::Delay(d) => {
                        let _ = delayed_tx.send((Instant::now() + d, buf[..n].to_vec()));
                    }
                    // A chunk read just before a blackhole is held like the rest.
                    Mode::Blackhole => {
                        let _ = delayed_tx.send((Instant::now(), buf[..n].to_vec()));
                    }
                    Mode::Discard => {}
                }
            }
            due = delayed_rx.recv(), if mode(&states.borrow()) != Mode::Blackhole => {
                let Some((at, chunk)) = due else { break };
                tokio::time::sleep_until(at).await;
                if to.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            changed = states.changed() => {
                if changed.is_err() {
                    break;
                }
                if states.borrow().resets != resets {
                    reset = true;
                    break;
                }
            }
        }
    }
    if !reset {
        let _ = to.shutdown().await;
    }
    (from, to, reset)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, byte: u8, wait: Duration) -> Option<Duration> {
        let started = Instant::now();
        stream.write_all(&[byte]).await.unwrap();
        let mut got = [0u8; 1];
        match tokio::time::timeout(wait, stream.read_exact(&mut got)).await {
            Ok(Ok(_)) => {
                assert_eq!(got[0], byte);
                Some(started.elapsed())
            }
            _ => None,
        }
    }

    #[tokio::test]
    async fn pass_delay_blackhole_each_way_discard_reset_and_refuse() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        let quick = round_trip(&mut stream, 1, Duration::from_secs(5)).await.unwrap();
        assert!(quick < Duration::from_millis(500), "{quick:?}");
        // Delay one way.
        proxy.set(Side::Forward, Mode::Delay(Duration::from_millis(200)));
        let slow = round_trip(&mut stream, 2, Duration::from_secs(5)).await.unwrap();
        assert!(slow >= Duration::from_millis(200), "{slow:?}");
        // Blackhole forward: silence, the connection stays open; the byte is held, and arrives
        // when the link is back.
        proxy.set(Side::Forward, Mode::Blackhole);
        assert_eq!(round_trip(&mut stream, 3, Duration::from_millis(300)).await, None);
        proxy.set(Side::Forward, Mode::Pass);
        let mut got = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got[0], 3);
        // Blackhole backward only: the echo server gets the byte, the answer is held.
        proxy.set(Side::Backward, Mode::Blackhole);
        assert_eq!(round_trip(&mut stream, 5, Duration::from_millis(300)).await, None);
        proxy.set(Side::Backward, Mode::Pass);
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got[0], 5);
        // Discard: the byte is gone for good; later ones pass.
        proxy.set(Side::Forward, Mode::Discard);
        assert_eq!(round_trip(&mut stream, 4, Duration::from_millis(300)).await, None);
        proxy.set(Side::Forward, Mode::Pass);
        assert!(round_trip(&mut stream, 6, Duration::from_secs(5)).await.is_some());
        // Reset: the client sees the connection reset.
        proxy.reset();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut got)).await.unwrap();
        assert!(matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "{read:?}");
        // Refuse: a new connection is closed at once; afterwards they work again.
        proxy.refuse(true);
        let mut refused = TcpStream::connect(proxy.address()).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut got)).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        proxy.refuse(false);
        let mut again = TcpStream::connect(proxy.address()).await.unwrap();
        assert!(round_trip(&mut again, 7, Duration::from_secs(5)).await.is_some());
    }

    #[tokio::test]
    async fn delayed_and_passed_chunks_keep_their_order() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.address()).await.unwrap();
        proxy.set(Side::Forward, Mode::Delay(Duration::from_millis(100)));
        stream.write_all(b"a").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        proxy.set(Side::Forward, Mode::Pass);
        stream.write_all(b"b").await.unwrap();
        let mut got = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, b"ab");
    }
}
