//! A host for the disaster tests: a small blocking NBD client (fixed newstyle, `NBD_OPT_GO`,
//! simple replies) and a write workload that records which writes were acknowledged, so a
//! test can check that every acknowledged write survived (S1, S9).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
/// EIO.
pub const EIO: u32 = 5;
pub const BLOCK: u64 = 4096;

/// Why a connection or a request failed.
#[derive(Debug)]
pub enum HostError {
    /// The connection failed (the server died or closed it).
    Io(std::io::Error),
    /// The server refused the export with this option reply type and message.
    Refused(u32, String),
    /// The server answered the request with this NBD error.
    Nbd(u32),
}

impl From<std::io::Error> for HostError {
    fn from(e: std::io::Error) -> HostError {
        HostError::Io(e)
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// One NBD connection to one export.
pub struct Host {
    stream: TcpStream,
    cookie: u64,
}

impl Host {
    /// Connects to `address` and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(address: &str, export: &str) -> Result<Host, HostError> {
        let mut stream = TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        if &greeting[..8] != NBDMAGIC {
            return Err(HostError::Io(std::io::Error::other("not an NBD server")));
        }
        // Fixed newstyle, no zeroes.
        stream.write_all(&3u32.to_be_bytes())?;
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        option.extend_from_slice(&(export.len() as u32).to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option)?;
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header)?;
            if u64::from_be_bytes(header[..8].try_into().unwrap()) != OPTION_REPLY_MAGIC {
                return Err(HostError::Io(std::io::Error::other("bad option reply magic")));
            }
            let kind = be32(&header[12..16]);
            let mut data = vec![0u8; be32(&header[16..20]) as usize];
            stream.read_exact(&mut data)?;
            match kind {
                REP_INFO => {}
                REP_ACK => return Ok(Host { stream, cookie: 0 }),
                other => {
                    let message = String::from_utf8_lossy(&data).into_owned();
                    return Err(HostError::Refused(other, message));
                }
            }
        }
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) -> Result<u64, HostError> {
        self.cookie += 1;
        let mut out = Vec::with_capacity(28 + payload.len());
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(payload);
        self.stream.write_all(&out)?;
        Ok(self.cookie)
    }

    fn reply(&mut self, cookie: u64, data: usize) -> Result<Vec<u8>, HostError> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header)?;
        if be32(&header[..4]) != SIMPLE_REPLY_MAGIC
            || u64::from_be_bytes(header[8..16].try_into().unwrap()) != cookie
        {
            return Err(HostError::Io(std::io::Error::other("an unexpected reply")));
        }
        let error = be32(&header[4..8]);
        if error != 0 {
            return Err(HostError::Nbd(error));
        }
        let mut buf = vec![0u8; data];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`; `Ok` only once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), HostError> {
        let cookie = self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.reply(cookie, 0).map(|_| ())
    }

    /// Reads `length` bytes at `offset`.
    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, HostError> {
        let cookie = self.request(CMD_READ, offset, length, &[])?;
        self.reply(cookie, length as usize)
    }

    /// Disconnects.
    pub fn close(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}

/// The contents of block `block` written in round `round`: both numbers, repeated.
pub fn pattern(block: u64, round: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK as usize);
    while out.len() < BLOCK as usize {
        out.extend_from_slice(&block.to_le_bytes());
        out.extend_from_slice(&round.to_le_bytes());
    }
    out
}

/// What the workload knows: per block, the last acknowledged round and the round in flight.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// block -> last acknowledged round.
    pub acked: HashMap<u64, u64>,
    /// The write sent and not answered (QD1: at most one).
    pub inflight: Option<(u64, u64)>,
    /// Writes acknowledged.
    pub count: u64,
    /// Why the workload stopped, if it did on its own.
    pub ended: Option<String>,
}

/// Writes blocks `0..blocks` in rounds at queue depth 1 until stopped or a write fails.
pub struct Workload {
    pub ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workload {
    pub fn start(address: &str, export: &str, blocks: u64) -> Workload {
        let mut host =
            Host::connect(address, export).unwrap_or_else(|e| panic!("connect {address}/{export}: {e:?}"));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (ledger.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut round = 1u64;
            loop {
                for block in 0..blocks {
                    if s.load(Ordering::Acquire) {
                        return;
                    }
                    l.lock().unwrap().inflight = Some((block, round));
                    match host.write(block * BLOCK, &pattern(block, round)) {
                        Ok(()) => {
                            let mut ledger = l.lock().unwrap();
                            ledger.acked.insert(block, round);
                            ledger.inflight = None;
                            ledger.count += 1;
                        }
                        Err(e) => {
                            l.lock().unwrap().ended = Some(format!("{e:?}"));
                            return;
                        }
                    }
                }
                round += 1;
            }
        });
        Workload { ledger, stop, thread: Some(thread) }
    }

    /// Writes acknowledged so far.
    pub fn count(&self) -> u64 {
        self.ledger.lock().unwrap().count
    }

    /// Waits until at least `n` writes were acknowledged.
    pub fn wait_count(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.count() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "the workload did not reach {n} writes: {:?}",
                self.ledger.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the workload ended on its own (its connection failed), up to `limit`; after a
    /// `kill -9` the kernel closes the connection, but the write thread notices only at its next
    /// reply, so a test that expects the failure waits for it rather than racing it.
    pub fn wait_ended(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.ledger.lock().unwrap().ended.is_none() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Stops the workload (a write in flight may stay unanswered: the thread is left to end
    /// when its connection does) and returns the ledger.
    pub fn stop(mut self) -> Ledger {
        self.stop.store(true, Ordering::Release);
        let ledger = self.ledger.lock().unwrap().clone();
        if let Some(thread) = self.thread.take()
            && ledger.ended.is_some()
        {
            let _ = thread.join();
        }
        self.ledger.lock().unwrap().clone()
    }
}

/// Checks every acknowledged write of `ledger` through `host`: a block reads as its last
/// acknowledged round, or as the round in flight when the ledger was taken. Returns the blocks
/// that do not, with what they hold.
pub fn missing(host: &mut Host, ledger: &Ledger) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut blocks: Vec<_> = ledger.acked.iter().collect();
    blocks.sort();
    for (&block, &round) in blocks {
        let data = match host.read(block * BLOCK, BLOCK as u32) {
            Ok(data) => data,
            Err(e) => {
                wrong.push(format!("block {block}: read failed: {e:?}"));
                continue;
            }
        };
        let in_flight = ledger.inflight.filter(|(b, _)| *b == block).map(|(_, r)| r);
        let ok = data == pattern(block, round) || in_flight.is_some_and(|r| data == pattern(block, r));
        if !ok {
            let held = (
                u64::from_le_bytes(data[..8].try_into().unwrap()),
                u64::from_le_bytes(data[8..16].try_into().unwrap()),
            );
            wrong.push(format!("block {block}: acknowledged round {round}, holds (block, round) {held:?}"));
        }
    }
    wrong
}

/// Reads every acknowledged write of `ledger` from vol_a at the NBD server `address`; fails the
/// test on any that is missing (S1, S9).
pub fn check_acknowledged(address: &str, ledger: &Ledger) {
    let mut host = Host::connect(address, "vol_a").unwrap();
    let wrong = missing(&mut host, ledger);
    assert!(
        wrong.is_empty(),
        "{} acknowledged writes lost of {}: {:?}",
        wrong.len(),
        ledger.count,
        &wrong[..wrong.len().min(8)]
    );
    host.close();
}
