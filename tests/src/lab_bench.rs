//! What the lab benchmarks (`switchover-bench`, `site-loss-bench`) share: a blocking NBD client
//! (fixed newstyle, `NBD_OPT_GO`, simple replies) and the guard that brings a lab down, killing
//! what `mcctl lab down` left of its controllers and mediator.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

/// How long one NBD read or write may take.
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

const NBD_MAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_INFO: u32 = 3;
const REP_ACK: u32 = 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
/// Fixed newstyle, no zeroes.
const CLIENT_FLAGS: u32 = 3;

/// One NBD connection to one export.
#[derive(Debug)]
pub struct NbdClient {
    stream: TcpStream,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `address` and negotiates `export` with `NBD_OPT_GO`.
    pub fn connect(address: &str, export: &str) -> Result<NbdClient> {
        let mut stream = TcpStream::connect(address).with_context(|| format!("connect to {address}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).context("set the read timeout")?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).context("read the NBD greeting")?;
        ensure!(&greeting[..8] == NBD_MAGIC, "{address} is not an NBD server");
        let name_len = u32::try_from(export.len()).context("export name length")?;
        let mut option = Vec::new();
        option.extend_from_slice(&CLIENT_FLAGS.to_be_bytes());
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        // The name's length, the name, and zero information requests.
        option.extend_from_slice(&(4 + name_len + 2).to_be_bytes());
        option.extend_from_slice(&name_len.to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option).context("send NBD_OPT_GO")?;
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header).context("read an option reply")?;
            ensure!(be64(&header[..8]) == OPTION_REPLY_MAGIC, "bad option reply magic from {address}");
            let kind = be32(&header[12..16]);
            let mut data = vec![0u8; be32(&header[16..20]) as usize];
            stream.read_exact(&mut data).context("read an option reply's data")?;
            match kind {
                REP_INFO => {}
                REP_ACK => return Ok(NbdClient { stream, cookie: 0 }),
                other => bail!(
                    "{address} refused export {export}: reply type {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) -> Result<u64> {
        self.cookie += 1;
        let mut out = Vec::with_capacity(28 + payload.len());
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(payload);
        self.stream.write_all(&out).context("send an NBD request")?;
        Ok(self.cookie)
    }

    fn reply(&mut self, cookie: u64, data_len: usize) -> Result<Vec<u8>> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).context("read an NBD reply")?;
        ensure!(be32(&header[..4]) == SIMPLE_REPLY_MAGIC, "bad NBD reply magic");
        ensure!(be64(&header[8..16]) == cookie, "an NBD reply to another request");
        let error = be32(&header[4..8]);
        ensure!(error == 0, "NBD error {error}");
        let mut data = vec![0u8; data_len];
        self.stream.read_exact(&mut data).context("read an NBD reply's data")?;
        Ok(data)
    }

    /// Writes `data` at `offset`; `Ok` once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let length = u32::try_from(data.len()).context("write length")?;
        let cookie = self.request(CMD_WRITE, offset, length, data)?;
        self.reply(cookie, 0).map(|_| ())
    }

    /// Reads the export's first 4 KiB.
    pub fn read_first_block(&mut self) -> Result<Vec<u8>> {
        let cookie = self.request(CMD_READ, 0, 4096, &[])?;
        self.reply(cookie, 4096)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // Best effort: the server may be gone.
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}

fn be32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(word)
}

fn be64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(word)
}

// ---------------------------------------------------------------------------------------------
// The lab

/// The lab of `mcctl lab up`; `mcctl lab down` when stopped or dropped, then SIGKILL to every
/// controller and mediator it listed that is still running.
#[derive(Debug)]
pub struct Lab {
    /// The benchmark's name, for the error printed when a drop cannot bring the lab down.
    pub bench: &'static str,
    /// The `mcctl` binary.
    pub mcctl: PathBuf,
    /// The lab directory.
    pub dir: PathBuf,
    /// The controllers' and the mediator's pids, from `lab up`'s answer.
    pub pids: Vec<u32>,
    /// `lab up` was run and `down` was not yet.
    pub up: bool,
}

impl Lab {
    /// `mcctl lab down --dir DIR`, then SIGKILL to leftover processes; an error if either was
    /// needed and failed, or if a process was left over.
    pub fn down(&mut self) -> Result<()> {
        if !self.up {
            return Ok(());
        }
        self.up = false;
        let output = Command::new(&self.mcctl)
            .args(["lab", "down", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {} lab down", self.mcctl.display()));
        // lab.json lists the processes even when `lab up` failed before answering.
        let mut pids = self.pids.clone();
        pids.extend(pids_in_lab_json(&self.dir));
        pids.sort_unstable();
        pids.dedup();
        let killed = kill_lab_processes(&pids);
        match output {
            Ok(output) if output.status.success() => {
                ensure!(killed.is_empty(), "mcctl lab down left the processes {killed:?}: killed them");
                Ok(())
            }
            Ok(output) => Err(anyhow!(
                "mcctl lab down --dir {} failed ({}): {}{}; killed the processes {killed:?}",
                self.dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )),
            Err(error) => Err(error.context(format!("killed the processes {killed:?}"))),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Best effort on the error path; the normal path calls `down` and reports.
        if let Err(error) = self.down() {
            eprintln!("{}: {error:#}", self.bench);
        }
    }
}

/// The controllers' and the mediator's pids in `DIR/lab.json`; none if it cannot be read.
fn pids_in_lab_json(dir: &Path) -> Vec<u32> {
    let Ok(text) = fs::read_to_string(dir.join("lab.json")) else { return Vec::new() };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else { return Vec::new() };
    let pid = |value: &serde_json::Value| value["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok());
    let mut pids: Vec<u32> =
        json["controllers"].as_array().map(|c| c.iter().filter_map(pid).collect()).unwrap_or_default();
    pids.extend(pid(&json["mediator"]));
    pids
}

/// SIGKILL to each pid that is still an `mc-controller` or `mc-mediator` (a pid alone could have
/// been reused).
fn kill_lab_processes(pids: &[u32]) -> Vec<u32> {
    let mut killed = Vec::new();
    for &pid in pids {
        let ours = fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("mc-controller") || cmdline.contains("mc-mediator")
        });
        let Ok(raw) = i32::try_from(pid) else { continue };
        if ours {
            // SAFETY: kill(2) takes plain integers; the pid was checked above to be a controller
            // or mediator, which the lab started for this benchmark.
            if unsafe { libc::kill(raw, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
    }
    killed
}
