//! A real `mc-mediator` for the controller tests (DESIGN §10, §14 level 4): started on
//! 127.0.0.1 with the scaled timers the test clusters use, killed (`kill -9`) and restarted on
//! the same port and state directory, read back through its `Show` call; and the seeded jitter
//! that shifts a scenario's decisive instants (STYLE 15: every randomised test prints its seed
//! and can be re-run with it).
//!
//! Invariants: every process started here is killed and reaped when its guard drops; a seed is
//! printed before anything depends on it.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, free_port};

/// The cluster id every test cluster uses, as the mediator's config and `mcctl` spell it.
pub const CLUSTER_HEX: &str = "00112233445566778899aabbccddeeff";

/// The `mc-mediator` binary, next to `mc-controller` (the workspace test command builds it;
/// built here when only this crate's tests run).
pub fn mediator_binary() -> PathBuf {
    let binary = Path::new(env!("CARGO_BIN_EXE_mc-controller")).with_file_name("mc-mediator");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "mediator", "--bin", "mc-mediator"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building mc-mediator failed");
    }
    binary
}

/// The mediator's timers (DESIGN §10.1), in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediatorTimers {
    pub keepalive_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub margin_ms: u64,
    pub mirror_timeout_ms: u64,
    pub auso_window_ms: u64,
}

impl MediatorTimers {
    /// The scaled profile of the test clusters (`common::Settings` and the controllers' config):
    /// keepalive timeout 1.5 s, heartbeat 200 ms, lease 2 s, margin 1 s, mirror_timeout and
    /// AUSO window 5 s.
    pub const SCALED: MediatorTimers = MediatorTimers {
        keepalive_timeout_ms: 1500,
        heartbeat_ms: 200,
        lease_ms: 2000,
        margin_ms: 1000,
        mirror_timeout_ms: 5000,
        auso_window_ms: 5000,
    };
}

impl Default for MediatorTimers {
    fn default() -> MediatorTimers {
        MediatorTimers::SCALED
    }
}

/// How a mediator is started.
#[derive(Clone, Debug, Default)]
pub struct MediatorOptions {
    /// Observer mode (DESIGN §10 rule 6): detect and alert, never grant an automatic switchover.
    pub observer: bool,
    /// The state directory; `None`: `<dir>/state`. An existing one is reused as it is.
    pub state_dir: Option<PathBuf>,
    /// The timers.
    pub timers: MediatorTimers,
}

/// A running mediator, killed on drop.
#[derive(Debug)]
pub struct MediatorProc {
    child: Option<Child>,
    /// Its gRPC address (`127.0.0.1:port`; the same across restarts).
    pub address: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its log lines (stderr), across restarts.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Drop for MediatorProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mediator with the scaled timers, its config and state under `dir`.
pub fn start_mediator(dir: &Path) -> MediatorProc {
    start_mediator_with(dir, &MediatorOptions::default())
}

/// A mediator started with `options`, its config under `dir`, on a free port.
pub fn start_mediator_with(dir: &Path, options: &MediatorOptions) -> MediatorProc {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let state_dir = options.state_dir.clone().unwrap_or_else(|| dir.join("state"));
    let config = dir.join("mediator.toml");
    let t = options.timers;
    std::fs::write(
        &config,
        format!(
            r#"cluster_id = "{CLUSTER_HEX}"
state_dir = "{state}"
observer = {observer}

[listen]
grpc = "127.0.0.1:{port}"
metrics = "127.0.0.1:0"

[timers]
keepalive_timeout_ms = {keepalive}
heartbeat_ms = {heartbeat}
lease_ms = {lease}
margin_ms = {margin}
mirror_timeout_ms = {mirror_timeout}
auso_window_ms = {window}

[[controllers]]
node = 1
site = "A"
[[controllers]]
node = 2
site = "B"
"#,
            state = state_dir.display(),
            observer = options.observer,
            keepalive = t.keepalive_timeout_ms,
            heartbeat = t.heartbeat_ms,
            lease = t.lease_ms,
            margin = t.margin_ms,
            mirror_timeout = t.mirror_timeout_ms,
            window = t.auso_window_ms,
        ),
    )
    .unwrap();
    let mut mediator = MediatorProc {
        child: None,
        address: format!("127.0.0.1:{port}"),
        config,
        state_dir,
        log: Arc::new(Mutex::new(Vec::new())),
    };
    mediator.spawn();
    mediator
}

impl MediatorProc {
    /// Starts the process on the config and waits for its "listening" line; retries while the
    /// port is still held by a killed predecessor.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the mediator runs already");
        let deadline = Instant::now() + common::DEADLINE;
        loop {
            let mut child = Command::new(mediator_binary())
                .arg("--config")
                .arg(&self.config)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stderr = child.stderr.take().unwrap();
            let sink = self.log.clone();
            let died = Arc::new(Mutex::new(Vec::new()));
            let this_life = died.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    this_life.lock().unwrap().push(line.clone());
                    sink.lock().unwrap().push(line);
                }
            });
            let (tx, rx) = std::sync::mpsc::channel();
            let stdout = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            if let Ok(line) = rx.recv_timeout(common::DEADLINE) {
                assert!(line.contains("listening"), "mc-mediator did not start: {line:?}");
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(50));
            let lines = died.lock().unwrap().join("\n");
            assert!(
                lines.contains("bind grpc") && Instant::now() < deadline,
                "mc-mediator did not start:\n{lines}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kill -9`: nothing is flushed on the way out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -9`, then started again on the same port and state directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The state file's bytes now (a snapshot an operator might restore).
    pub fn state_file(&self) -> Vec<u8> {
        std::fs::read(self.state_dir.join("mediator.state")).unwrap()
    }

    /// `kill -9`, the state file replaced by `bytes` (an older copy), then started again on the
    /// same port.
    pub fn restart_from(&mut self, bytes: &[u8]) {
        self.kill();
        std::fs::write(self.state_dir.join("mediator.state"), bytes).unwrap();
        self.spawn();
    }

    /// `kill -9`, the state file deleted (the directory and its lock stay), then started again
    /// on the same port: the mediator has lost its state (DESIGN §10 rule 5).
    pub fn restart_without_state(&mut self) {
        self.kill();
        let file = self.state_dir.join("mediator.state");
        std::fs::remove_file(&file).unwrap_or_else(|e| panic!("remove {}: {e}", file.display()));
        self.spawn();
    }

    /// The number of log lines so far (for `wait_log`).
    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Waits until a log line after the first `after` contains `needle` (stderr is read by its
    /// own thread, behind the "listening" line of stdout).
    pub fn wait_log(&self, after: usize, needle: &str) {
        let deadline = Instant::now() + common::DEADLINE;
        while !self.log.lock().unwrap().iter().skip(after).any(|l| l.contains(needle)) {
            assert!(Instant::now() < deadline, "the mediator never logged {needle:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The mediator's `Show` reply.
    pub async fn show(&self) -> mc_proto::v1::MediatorShowReply {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect_lazy();
        let mut client = mc_proto::v1::mediator_client::MediatorClient::new(channel);
        let request = mc_proto::v1::MediatorShowRequest { cluster_id: common::CLUSTER.to_vec() };
        match client.show(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => panic!("mediator show: {status:?}\n--- mediator log ---\n{}", self.log_text()),
        }
    }
}

/// Waits until the mediator records every aggregate in sync (the owner's and the receiver's
/// heartbeats both said so): AUSO is possible from then on.
pub async fn wait_mediator_in_sync(address: &str) {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{address}")).unwrap().connect_lazy();
    let mut client = mc_proto::v1::mediator_client::MediatorClient::new(channel);
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let request = mc_proto::v1::MediatorShowRequest { cluster_id: common::CLUSTER.to_vec() };
        if let Ok(reply) = client.show(request).await {
            let reply = reply.into_inner();
            if !reply.aggregates.is_empty() && reply.aggregates.iter().all(|a| a.in_sync) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the mediator never recorded the aggregates in sync: {reply:?}"
            );
        }
        assert!(Instant::now() < deadline, "the mediator did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A seed: `MC_TEST_SEED` if set, else from the clock. The scenario that uses it prints it
/// first (`announce`), so a failure can be re-run with it.
pub fn seed() -> u64 {
    match std::env::var("MC_TEST_SEED") {
        Ok(text) => text.trim().parse().unwrap_or_else(|e| panic!("MC_TEST_SEED={text:?}: {e}")),
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            // Nanoseconds mixed in, so runs started in the same second differ.
            SplitMix64(now.as_secs() ^ (u64::from(now.subsec_nanos()) << 20)).next_u64()
        }
    }
}

/// Prints the line a failing run is reproduced from.
pub fn announce(scenario: &str, seed: u64) {
    eprintln!("scenario {scenario} seed={seed} (MC_TEST_SEED={seed} to reproduce)");
}

/// How many seeds the soak runs per scenario: `MC_SOAK_SEEDS`, default 20.
pub fn soak_seeds() -> u64 {
    std::env::var("MC_SOAK_SEEDS")
        .map_or(20, |text| text.trim().parse().unwrap_or_else(|e| panic!("MC_SOAK_SEEDS={text:?}: {e}")))
}

/// splitmix64 (Steele, Lea, Flood 2014): a tiny PRNG that is enough for jitter and needs no
/// dependency.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The jitter of one scenario run, from its seed.
#[derive(Clone, Debug)]
pub struct Jitter(SplitMix64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(SplitMix64(seed))
    }

    /// A duration in `[0, max]`, to the millisecond.
    pub fn jitter(&mut self, max: Duration) -> Duration {
        let max_ms = u64::try_from(max.as_millis()).unwrap();
        Duration::from_millis(self.0.next_u64() % (max_ms + 1))
    }

    /// A duration in `[min, max]`.
    pub fn between(&mut self, min: Duration, max: Duration) -> Duration {
        assert!(min <= max, "{min:?} > {max:?}");
        min + self.jitter(max - min)
    }

    /// A number in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n
    }
}
