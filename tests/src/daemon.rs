//! Real `mc-controller` processes for the benchmarks (`write-bench`, `resync-bench`), and the
//! process and file-system helpers they share.
//!
//! Invariants:
//! - a daemon never outlives its benchmark: it is stopped (SIGTERM, then SIGKILL after a grace
//!   period) when stopped explicitly or dropped, and on Linux it gets SIGKILL if the benchmark
//!   process dies (`PR_SET_PDEATHSIG`);
//! - a daemon's stdout and stderr are drained for its whole life, so it never blocks on a pipe;
//!   the last `LOG_LINES_KEPT` lines of stderr are kept for error messages, and every line that
//!   contains one of the patterns given at spawn is kept as well, however many lines follow.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

/// How long a daemon may take to print that it listens.
pub const DAEMON_DEADLINE: Duration = Duration::from_secs(60);
/// How long a daemon may take to stop on SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(20);
/// Recent log lines kept for error messages.
const LOG_LINES_KEPT: usize = 200;

/// What a daemon wrote to stderr.
#[derive(Debug, Default)]
struct Log {
    recent: VecDeque<String>,
    /// Lines that matched a pattern given at spawn, all of them.
    marked: Vec<String>,
}

/// A running daemon: SIGTERM, then SIGKILL, when stopped or dropped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: Arc<Mutex<Log>>,
}

impl Daemon {
    /// Starts `binary --config config` with `RUST_LOG=rust_log` and waits for the line it
    /// prints once it listens. Lines of stderr that contain one of `mark` are all kept (see
    /// `marked_lines`).
    pub fn spawn(
        name: String,
        binary: &Path,
        config: &Path,
        rust_log: &str,
        mark: &'static [&'static str],
    ) -> Result<Daemon> {
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", rust_log)
            // Plain lines: the marked ones are parsed.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().with_context(|| format!("start {}", binary.display()))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().context("take the daemon's stdout")?;
        thread::spawn(move || {
            // Keeps draining stdout after the first line, so the daemon never blocks on it.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().context("take the daemon's stderr")?;
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut log) = sink.lock() {
                    if mark.iter().any(|pattern| line.contains(pattern)) {
                        log.marked.push(line.clone());
                    }
                    if log.recent.len() >= LOG_LINES_KEPT {
                        log.recent.pop_front();
                    }
                    log.recent.push_back(line);
                }
            }
        });
        let mut daemon = Daemon { name, child: Some(child), log };
        let deadline = Instant::now() + DAEMON_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("mc-controller node ") && line.contains(" listening ") => {
                    return Ok(daemon);
                }
                Ok(_) => {}
                Err(_) => {
                    // Ends the daemon first, so its last words are in the log.
                    let _ = daemon.terminate();
                    bail!("{} did not start listening:\n{}", daemon.name, daemon.log_text());
                }
            }
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The recent lines of stderr.
    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .map(|log| log.recent.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Every line of stderr so far that contained one of the patterns given at spawn.
    pub fn marked_lines(&self) -> Vec<String> {
        self.log.lock().map(|log| log.marked.clone()).unwrap_or_default()
    }

    /// SIGTERM and a wait for the exit; SIGKILL after `STOP_GRACE`. Errors if the daemon did not
    /// exit cleanly on SIGTERM.
    pub fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if child.try_wait().context("poll the daemon")?.is_none() {
            let pid = i32::try_from(child.id()).context("the daemon's pid")?;
            // SAFETY: signalling our own child, which has not been reaped (try_wait saw it alive),
            // so the pid cannot name another process.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                let error = std::io::Error::last_os_error();
                let _ = child.kill();
                let _ = child.wait();
                return Err(error).with_context(|| format!("send SIGTERM to {}", self.name));
            }
        }
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().context("poll the daemon")? {
                ensure!(status.success(), "{} exited with {status} on SIGTERM", self.name);
                return Ok(());
            }
            if started.elapsed() > STOP_GRACE {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within {STOP_GRACE:?} of SIGTERM; killed", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Best effort on the error path; a clean stop goes through `terminate` and reports.
        let _ = self.terminate();
    }
}

/// Makes the child get SIGKILL when this process dies, so a killed benchmark leaves no daemon.
#[cfg(target_os = "linux")]
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;

    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl, which
    // is async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Not available off Linux.
#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_command: &mut Command) {}

/// A free TCP port on 127.0.0.1 (the daemons must know each other's ports before they start),
/// below the kernel's ephemeral range when it leaves room: a daemon restarted on its port then
/// never finds it taken by an outgoing connection (the same choice as `controller::lab`'s
/// `reserve_port`, which this crate cannot call).
pub fn free_port() -> Result<u16> {
    const FLOOR: u16 = 10_000;
    let ceiling = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let tries = if ceiling > FLOOR + 1_000 { 256 } else { 0 };
    let listener = (0..tries)
        .find_map(|_| {
            std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, rand::random_range(FLOOR..ceiling)))
                .ok()
        })
        .map_or_else(|| std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)), Ok)
        .context("bind a probe port")?;
    Ok(listener.local_addr().context("read the probe port")?.port())
}

/// User + system CPU of a process (`self` or a pid) in clock ticks, from `/proc/PID/stat`.
pub fn cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis
    // start at field 3, so utime (14) and stime (15) are the 12th and 13th of them.
    let rest = text.rfind(')').map(|i| &text[i + 1..]).with_context(|| format!("parse {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no field {}", i + 3))?
            .parse()
            .with_context(|| format!("parse field {} of {path}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second, the unit of `cpu_ticks`.
pub fn clock_ticks_per_second() -> Result<f64> {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks > 0, "sysconf(_SC_CLK_TCK) returned {ticks}");
    #[allow(clippy::cast_precision_loss)]
    Ok(ticks as f64)
}

/// Syncs the file system of `dir` and waits `quiet`, so the next case does not pay for the
/// writeback of the last.
pub fn settle(dir: &Path, quiet: Duration) -> Result<()> {
    use std::os::fd::AsRawFd as _;

    let handle = File::open(dir).with_context(|| format!("open {}", dir.display()))?;
    // SAFETY: the descriptor belongs to `handle`, which is open for the whole call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncfs {}", dir.display()));
    }
    thread::sleep(quiet);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc` parsing must survive a command name with spaces and parentheses.
    #[test]
    fn own_cpu_ticks_parse() {
        assert!(cpu_ticks("self").is_ok());
    }
}
