//! The two-site lab on one machine (DESIGN §12): `mcctl lab up|status|down|kill|start`.
//!
//! `up` writes the configurations of a 2-node cluster on 127.0.0.1 (node 1 at site A, node 2
//! at site B, DR partners of each other) and of its mediator (DESIGN §10, the third site) into a
//! directory, starts the real `mc-mediator` and then the `mc-controller` processes, each in its
//! own session so they outlive `mcctl`, waits until the mediator answers and both controllers
//! serve, creates an aggregate and a volume per site, and records everything in `DIR/lab.json`.
//! The other commands read `lab.json` to find the processes again, from any shell. A lab made
//! with `--no-mediator` has no mediator: its controllers' configurations have no `[mediator]`
//! section and `lab.json` no `mediator` key, exactly as before the lab had a mediator (no
//! automatic switchover; a forced switchover is the operator's, S2's fallbacks apply).
//!
//! Layout of a lab directory:
//!
//! | path | what |
//! |---|---|
//! | `lab.json` | the lab: cluster id, controllers (addresses, pid, log), mediator (address, pid, log), volumes (NBD URIs) |
//! | `lab.lock` | `flock`ed by every command that changes the lab, so two never interleave |
//! | `A/controller.toml`, `B/…` | each controller's configuration, as `config.rs` reads it |
//! | `A/shelf/`, `B/shelf/` | each site's shelf of disks (sparse files) |
//! | `A/nvlog`, `B/nvlog` | each controller's NVLog |
//! | `A/controller.log`, `B/…` | each controller's stdout and stderr, appended across restarts |
//! | `mediator/mediator.toml` | the mediator's configuration (absent with `--no-mediator`) |
//! | `mediator/state/` | the mediator's state directory (`mediator.state`, its lock) |
//! | `mediator/mediator.log` | the mediator's stdout and stderr, appended across restarts |
//!
//! Invariants:
//! - every process the lab starts (controller or mediator) has its pid in `lab.json` before
//!   anything waits on it (there is no `await` between the spawn and the save), so an
//!   interrupted or failed command never leaves a process that `lab down` cannot find;
//! - a pid counts as one of ours only while `/proc/PID/cmdline` shows `--config` with this
//!   lab's configuration file of that process and the process is not a zombie, so a reused pid
//!   is never signalled or reported as a process of the lab;
//! - the mediator starts before the controllers (their lease starts with a round trip, S6) and
//!   stops after them (`down`), so no controller of the lab ever runs while its mediator is
//!   down unless `lab kill --mediator` asked for it;
//! - the mediator's timers are the controllers' (DESIGN §10.1): its `[timers]` are written from
//!   the values the controller configuration yields once parsed, never typed twice;
//! - `lab.json` is replaced atomically (`*.tmp`, fsync, rename, fsync of the directory): a
//!   reader sees the old or the new lab, never a mix; a `lab.json` without `mediator` (written
//!   with `--no-mediator`, or before the lab had a mediator) is a lab without one;
//! - aggregates and volumes are created once, when the lab is new; a restart (`up` on an
//!   existing lab, `start`) reuses the configurations and the data as they are, and a lab
//!   whose creation did not complete is never completed later (it is refused);
//! - paths in `lab.json` and the configurations are absolute (the directory is resolved
//!   first), so any shell can use the lab; a lab directory that is moved must be made again;
//! - configurations written are first validated, the controllers' with `Config::parse` and the
//!   mediator's with `mc-mediator --check-config`, so no daemon refuses a file the lab wrote;
//!   timer keys the caller did not set are not written into the controllers' files (the
//!   product's defaults apply).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mc_proto::v1::admin_client::AdminClient;
use mc_proto::v1::mediator_client::MediatorClient;
use mc_proto::v1::{
    CreateAggregateRequest, CreateVolumeRequest, MediatorShowReply, MediatorShowRequest, StatusReply,
    StatusRequest,
};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use crate::config::{Config, Durability, Overrides};

/// The lab's state file in the lab directory.
pub const LAB_FILE: &str = "lab.json";
/// The lock file in the lab directory.
pub const LOCK_FILE: &str = "lab.lock";
/// The version of `lab.json` this code writes and reads.
pub const LAB_FORMAT: u32 = 1;
/// Default volume size.
pub const DEFAULT_VOLUME_SIZE_MIB: u64 = 1024;
/// Default NVLog size of a lab controller.
pub const DEFAULT_NVLOG_SIZE_MIB: u64 = 256;
/// The largest volume a lab creates (its disks are sparse files; this only bounds arithmetic).
pub const MAX_VOLUME_SIZE_MIB: u64 = 1 << 30;
/// How long a starting controller has to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How often readiness is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a controller has to stop after SIGTERM before it gets SIGKILL.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How long a command waits for another one holding the lab's lock.
pub const LOCK_DEADLINE: Duration = Duration::from_secs(120);
/// Room on each disk beyond the volume: the volume table before the first volume (1 MiB
/// aligned), the two label copies, the dirty bitmap, and the checksum area (one CRC-32 per
/// 4 KiB block, about 0.1 % of the disk, covered separately by `disk_size_bytes`).
pub const DISK_ROOM_BYTES: u64 = 64 << 20;
/// The environment variable naming the controller binary.
pub const CONTROLLER_BIN_ENV: &str = "MC_CONTROLLER_BIN";
/// The environment variable naming the mediator binary.
pub const MEDIATOR_BIN_ENV: &str = "MC_MEDIATOR_BIN";
/// The mediator's directory in the lab directory.
pub const MEDIATOR_DIR: &str = "mediator";
/// How many lines of a controller's log an error shows.
const LOG_TAIL_LINES: usize = 40;
/// The deadline of a `Status` call while polling.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// The deadline of a create call (formatting sparse disks at both sites).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a lab command failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The directory cannot hold a lab (a file, not empty, not UTF-8).
    #[error("{dir}: {message}")]
    BadDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The directory holds no lab.
    #[error("no lab in {dir} (no {LAB_FILE}): start one with `mcctl lab up --dir {dir}`", dir = dir.display())]
    NoLab {
        /// The directory.
        dir: PathBuf,
    },
    /// `lab.json` cannot be understood.
    #[error("{path}: not a lab state file this mcctl understands: {message}", path = path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The options given cannot make a lab.
    #[error("invalid lab settings: {0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The controller or the mediator binary cannot be found.
    #[error("{0}")]
    ControllerBin(String),
    /// The command is refused in the lab's current state (running controllers, incomplete lab,
    /// no mediator).
    #[error("{0}")]
    Refused(String),
    /// A controller or the mediator did not start or did not become ready; the message holds
    /// its log's tail.
    #[error("{who}: {message}")]
    Start {
        /// Which process: `site A's controller (node 1)`, `the mediator`.
        who: String,
        /// What happened, with the tail of its log.
        message: String,
    },
    /// A controller or the mediator did not stop.
    #[error("{who} (pid {pid}) did not stop: {message}")]
    Stop {
        /// Which process: `site A's controller`, `the mediator`.
        who: String,
        /// Its pid.
        pid: u32,
        /// What happened.
        message: String,
    },
    /// An admin call failed.
    #[error("site {site}: {what}: {message}")]
    Rpc {
        /// The site called.
        site: LabSite,
        /// The call.
        what: String,
        /// The error.
        message: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// A site of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LabSite {
    /// Site A: node 1.
    A,
    /// Site B: node 2.
    B,
}

impl LabSite {
    /// Both sites, in order.
    pub const ALL: [LabSite; 2] = [LabSite::A, LabSite::B];

    /// The site's node id.
    pub fn node_id(self) -> u32 {
        match self {
            LabSite::A => 1,
            LabSite::B => 2,
        }
    }

    /// The other site.
    pub fn partner(self) -> LabSite {
        match self {
            LabSite::A => LabSite::B,
            LabSite::B => LabSite::A,
        }
    }

    /// The name of the site's directory and of its config key: `A` or `B`.
    pub fn name(self) -> &'static str {
        match self {
            LabSite::A => "A",
            LabSite::B => "B",
        }
    }

    /// Lower case, for aggregate and volume names.
    fn lower(self) -> &'static str {
        match self {
            LabSite::A => "a",
            LabSite::B => "b",
        }
    }
}

impl std::fmt::Display for LabSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LabSite {
    type Err = String;

    fn from_str(text: &str) -> Result<LabSite, String> {
        match text {
            "A" | "a" => Ok(LabSite::A),
            "B" | "b" => Ok(LabSite::B),
            other => Err(format!("unknown site {other:?}: the lab has sites A and B")),
        }
    }
}

/// A process of the lab: a site's controller, or the mediator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LabMember {
    /// The controller of a site.
    Controller(LabSite),
    /// The mediator (the third site).
    Mediator,
}

impl LabMember {
    /// How errors name it: `site A's controller (node 1)`, `the mediator`.
    fn who(self) -> String {
        match self {
            LabMember::Controller(site) => format!("site {site}'s controller (node {})", site.node_id()),
            LabMember::Mediator => "the mediator".to_string(),
        }
    }
}

impl std::fmt::Display for LabMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabMember::Controller(site) => write!(f, "site {site}'s controller"),
            LabMember::Mediator => f.write_str("the mediator"),
        }
    }
}

/// `lab.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabState {
    /// `LAB_FORMAT`.
    pub format: u32,
    /// The cluster id, 32 hex digits.
    pub cluster_id: String,
    /// Whether the lab's aggregates and volumes were all created.
    pub complete: bool,
    /// Sites A and B, in order.
    pub controllers: Vec<LabController>,
    /// The volumes, once created.
    pub volumes: Vec<LabVolume>,
    /// The mediator; `None` for a lab made with `--no-mediator` (or before the lab had a
    /// mediator: the key is then absent, and it is not written for such a lab either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mediator: Option<LabMediator>,
}

/// The mediator of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabMediator {
    /// Its configuration file.
    pub config: PathBuf,
    /// Its gRPC address (the `Mediator` service the controllers and `mcctl mediator show` use).
    pub grpc: String,
    /// Its `/metrics` address.
    pub metrics: String,
    /// The pid of the process the lab last started, until it is stopped.
    pub pid: Option<u32>,
    /// Its log file.
    pub log: PathBuf,
}

/// One controller of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabController {
    /// Its node id.
    pub node: u32,
    /// Its site.
    pub site: LabSite,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its gRPC address (`Admin`, `Data`, …).
    pub admin: String,
    /// Its `/metrics` address.
    pub metrics: String,
    /// Its NBD address.
    pub nbd: String,
    /// The pid of the process the lab last started, until it is stopped.
    pub pid: Option<u32>,
    /// Its log file.
    pub log: PathBuf,
}

/// One volume of the lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabVolume {
    /// Its name.
    pub name: String,
    /// The site of the controller that exports it.
    pub site: LabSite,
    /// Its aggregate.
    pub aggregate: String,
    /// Its size.
    pub size_bytes: u64,
    /// Where hosts reach it.
    pub uri: String,
}

impl LabState {
    /// Reads and checks `DIR/lab.json`.
    pub fn load(dir: &Path) -> Result<LabState, LabError> {
        check_dir(dir)?;
        let path = dir.join(LAB_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabError::NoLab { dir: dir.to_path_buf() });
            }
            Err(e) => return Err(io_error(format!("read {}", path.display()))(e)),
        };
        let state: LabState = serde_json::from_str(&text)
            .map_err(|e| LabError::Corrupt { path: path.clone(), message: e.to_string() })?;
        state.check().map_err(|message| LabError::Corrupt { path, message })?;
        Ok(state)
    }

    /// The checks `load` makes beyond the JSON schema.
    fn check(&self) -> Result<(), String> {
        if self.format != LAB_FORMAT {
            return Err(format!("format {} (this mcctl reads format {LAB_FORMAT})", self.format));
        }
        parse_cluster_id(&self.cluster_id)?;
        let sites: Vec<LabSite> = self.controllers.iter().map(|c| c.site).collect();
        if sites != LabSite::ALL {
            return Err(format!("controllers are of sites {sites:?}, not [A, B]"));
        }
        for controller in &self.controllers {
            if controller.node != controller.site.node_id() {
                return Err(format!(
                    "site {}'s controller is node {}, not {}",
                    controller.site,
                    controller.node,
                    controller.site.node_id()
                ));
            }
            if controller.pid == Some(0) {
                return Err(format!("site {}'s pid is 0", controller.site));
            }
        }
        if let Some(mediator) = &self.mediator
            && mediator.pid == Some(0)
        {
            return Err("the mediator's pid is 0".into());
        }
        Ok(())
    }

    /// Replaces `DIR/lab.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), LabError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LabError::Invalid(format!("encode {LAB_FILE}: {e}")))?;
        write_atomically(dir, LAB_FILE, format!("{text}\n").as_bytes())
    }

    /// The cluster id as bytes.
    pub fn cluster_bytes(&self) -> Result<[u8; 16], LabError> {
        parse_cluster_id(&self.cluster_id).map_err(LabError::Invalid)
    }

    /// The controller of `site`.
    pub fn controller(&self, site: LabSite) -> &LabController {
        // `check` made sure controllers are [A, B].
        &self.controllers[usize::from(site == LabSite::B)]
    }

    fn controller_mut(&mut self, site: LabSite) -> &mut LabController {
        &mut self.controllers[usize::from(site == LabSite::B)]
    }

    /// The configuration, log and recorded pid of `member`; an error for the mediator of a lab
    /// without one.
    fn process(&self, member: LabMember) -> Result<LabProcess, LabError> {
        match member {
            LabMember::Controller(site) => {
                let c = self.controller(site);
                Ok(LabProcess { config: c.config.clone(), log: c.log.clone(), pid: c.pid })
            }
            LabMember::Mediator => {
                let m = self.mediator.as_ref().ok_or_else(no_mediator)?;
                Ok(LabProcess { config: m.config.clone(), log: m.log.clone(), pid: m.pid })
            }
        }
    }

    /// Records `pid` as `member`'s (nothing for the mediator of a lab without one).
    fn set_pid(&mut self, member: LabMember, pid: Option<u32>) {
        match member {
            LabMember::Controller(site) => self.controller_mut(site).pid = pid,
            LabMember::Mediator => {
                if let Some(mediator) = &mut self.mediator {
                    mediator.pid = pid;
                }
            }
        }
    }
}

/// What starting, finding and stopping a process of the lab needs.
#[derive(Clone, Debug)]
struct LabProcess {
    config: PathBuf,
    log: PathBuf,
    pid: Option<u32>,
}

impl LabProcess {
    /// The recorded pid if it is still this process (`is_our_process`).
    fn running_pid(&self) -> Option<u32> {
        self.pid.filter(|&pid| is_our_process(pid, &self.config))
    }
}

fn no_mediator() -> LabError {
    LabError::Refused(
        "this lab has no mediator (it was made with `mcctl lab up --no-mediator`, or by an mcctl without \
         one); make a new lab without --no-mediator to have one"
            .into(),
    )
}

fn parse_cluster_id(text: &str) -> Result<[u8; 16], String> {
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("cluster_id {text:?} is not 32 hex digits"));
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("cluster_id {text:?} is not 32 hex digits"))?;
    }
    Ok(id)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `name` in `dir` as STYLE.md rule 10 says: `*.tmp`, fsync, rename, fsync the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LabError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(io_error(format!("create {}", tmp.display())))?;
    file.write_all(bytes).map_err(io_error(format!("write {}", tmp.display())))?;
    file.sync_all().map_err(io_error(format!("fsync {}", tmp.display())))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io_error(format!(
        "rename {} to {}",
        tmp.display(),
        path.display()
    )))?;
    let dir_file = std::fs::File::open(dir).map_err(io_error(format!("open {}", dir.display())))?;
    dir_file.sync_all().map_err(io_error(format!("fsync {}", dir.display())))
}

/// Refuses a path that exists and is not a directory.
fn check_dir(dir: &Path) -> Result<(), LabError> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            Err(LabError::BadDir { dir: dir.to_path_buf(), message: "not a directory".into() })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LabError::NoLab { dir: dir.to_path_buf() }),
        Err(e) => Err(io_error(format!("inspect {}", dir.display()))(e)),
    }
}

/// The exclusive lock of a lab directory, held while a command changes the lab.
#[derive(Debug)]
pub struct LabLock {
    _file: std::fs::File,
}

impl LabLock {
    /// Takes the lock of `dir`, waiting up to `LOCK_DEADLINE` for another command to finish.
    pub async fn take(dir: &Path) -> Result<LabLock, LabError> {
        use std::os::fd::AsRawFd;
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(format!("open {}", path.display())))?;
        let started = Instant::now();
        loop {
            // SAFETY: `flock` on a descriptor this function owns for the call's duration; it
            // touches no memory.
            let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if result == 0 {
                return Ok(LabLock { _file: file });
            }
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_error(format!("lock {}", path.display()))(error));
            }
            if started.elapsed() > LOCK_DEADLINE {
                return Err(LabError::Refused(format!(
                    "another mcctl has been changing the lab in {} for {} s ({} is locked)",
                    dir.display(),
                    LOCK_DEADLINE.as_secs(),
                    path.display()
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// What `up` is asked for; `None` is the default (the product's, for timers).
#[derive(Clone, Debug, Default)]
pub struct UpOptions {
    /// The lab directory.
    pub dir: PathBuf,
    /// Each volume's size (`DEFAULT_VOLUME_SIZE_MIB`).
    pub volume_size_mib: Option<u64>,
    /// Each NVLog's size (`DEFAULT_NVLOG_SIZE_MIB`).
    pub nvlog_size_mib: Option<u64>,
    /// NVLog durability (process).
    pub durability: Option<Durability>,
    /// `timers.mirror_timeout_ms`.
    pub mirror_timeout_ms: Option<u64>,
    /// `timers.cp_interval_ms`.
    pub cp_interval_ms: Option<u64>,
    /// `timers.keepalive_interval_ms`.
    pub keepalive_interval_ms: Option<u64>,
    /// `timers.keepalive_timeout_ms`.
    pub keepalive_timeout_ms: Option<u64>,
    /// `timers.margin_ms`.
    pub margin_ms: Option<u64>,
    /// `mediator.heartbeat_ms` (and the mediator's `timers.heartbeat_ms`).
    pub heartbeat_ms: Option<u64>,
    /// `mediator.lease_ms` (and the mediator's `timers.lease_ms`).
    pub lease_ms: Option<u64>,
    /// `mediator.auso_window_ms` (and the mediator's `timers.auso_window_ms`).
    pub auso_window_ms: Option<u64>,
    /// A lab without a mediator (the configuration of the lab before it had one).
    pub no_mediator: bool,
    /// The controller binary (else `MC_CONTROLLER_BIN`, else next to the running executable).
    pub controller_bin: Option<PathBuf>,
    /// The mediator binary (else `MC_MEDIATOR_BIN`, else next to the running executable).
    pub mediator_bin: Option<PathBuf>,
}

impl UpOptions {
    /// Whether any option that only shapes a new lab was given.
    fn shapes_a_new_lab(&self) -> bool {
        self.volume_size_mib.is_some()
            || self.nvlog_size_mib.is_some()
            || self.durability.is_some()
            || self.mirror_timeout_ms.is_some()
            || self.cp_interval_ms.is_some()
            || self.keepalive_interval_ms.is_some()
            || self.keepalive_timeout_ms.is_some()
            || self.margin_ms.is_some()
            || self.mediator_timers_given()
            || self.no_mediator
    }

    /// Whether a mediator timer was given.
    fn mediator_timers_given(&self) -> bool {
        self.heartbeat_ms.is_some() || self.lease_ms.is_some() || self.auso_window_ms.is_some()
    }
}

/// One controller as commands report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ControllerReport {
    /// Node id.
    pub node: u32,
    /// Site.
    pub site: LabSite,
    /// gRPC address.
    pub admin: String,
    /// `/metrics` address.
    pub metrics: String,
    /// NBD address.
    pub nbd: String,
    /// Pid, if the lab started one that was not stopped since.
    pub pid: Option<u32>,
    /// Log file.
    pub log: PathBuf,
    /// Configuration file.
    pub config: PathBuf,
}

impl ControllerReport {
    fn of(controller: &LabController) -> ControllerReport {
        ControllerReport {
            node: controller.node,
            site: controller.site,
            admin: controller.admin.clone(),
            metrics: controller.metrics.clone(),
            nbd: controller.nbd.clone(),
            pid: controller.pid,
            log: controller.log.clone(),
            config: controller.config.clone(),
        }
    }
}

/// The mediator as commands report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MediatorReport {
    /// gRPC address (`mcctl mediator show --mediator` takes it).
    pub grpc: String,
    /// `/metrics` address.
    pub metrics: String,
    /// Pid, if the lab started one that was not stopped since.
    pub pid: Option<u32>,
    /// Log file.
    pub log: PathBuf,
    /// Configuration file.
    pub config: PathBuf,
}

impl MediatorReport {
    fn of(mediator: &LabMediator) -> MediatorReport {
        MediatorReport {
            grpc: mediator.grpc.clone(),
            metrics: mediator.metrics.clone(),
            pid: mediator.pid,
            log: mediator.log.clone(),
            config: mediator.config.clone(),
        }
    }
}

/// One volume as commands report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeReport {
    /// Name.
    pub name: String,
    /// The site exporting it.
    pub site: LabSite,
    /// NBD URI.
    pub uri: String,
    /// Size.
    pub size_bytes: u64,
    /// `online`/`offline` as its controller reports it; `None` when the controller does not
    /// answer or the report did not ask.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl VolumeReport {
    fn of(volume: &LabVolume) -> VolumeReport {
        VolumeReport {
            name: volume.name.clone(),
            site: volume.site,
            uri: volume.uri.clone(),
            size_bytes: volume.size_bytes,
            state: None,
        }
    }
}

/// What `up` did.
#[derive(Clone, Debug, Serialize)]
pub struct UpReport {
    /// The lab directory.
    pub dir: PathBuf,
    /// The cluster id.
    pub cluster_id: String,
    /// Whether a new lab was created (else an existing one was restarted).
    pub created: bool,
    /// The volumes.
    pub volumes: Vec<VolumeReport>,
    /// The controllers.
    pub controllers: Vec<ControllerReport>,
    /// The mediator; absent for a lab without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mediator: Option<MediatorReport>,
    /// Remarks for the operator (options that were ignored).
    pub notes: Vec<String>,
}

/// One controller's status.
#[derive(Clone, Debug, Serialize)]
pub struct ControllerStatus {
    /// Node id.
    pub node: u32,
    /// Site.
    pub site: LabSite,
    /// The pid the lab recorded.
    pub pid: Option<u32>,
    /// Whether that pid is a running controller of this lab.
    pub running: bool,
    /// `starting`, `fenced`, `recovering`, `serving`, `stopping` as it reports; `unreachable`
    /// when it runs but does not answer; `stopped` when it does not run.
    pub node_state: String,
    /// Why, in its words (or the call's error).
    pub reason: String,
    /// gRPC address.
    pub admin: String,
    /// `/metrics` address.
    pub metrics: String,
    /// NBD address.
    pub nbd: String,
    /// Log file.
    pub log: PathBuf,
}

/// What `status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// The lab directory.
    pub dir: PathBuf,
    /// The cluster id.
    pub cluster_id: String,
    /// Whether the lab was completely created.
    pub complete: bool,
    /// Sites A and B.
    pub controllers: Vec<ControllerStatus>,
    /// The mediator; absent for a lab without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mediator: Option<MediatorStatus>,
    /// The volumes.
    pub volumes: Vec<VolumeReport>,
}

/// The mediator's status.
#[derive(Clone, Debug, Serialize)]
pub struct MediatorStatus {
    /// The pid the lab recorded.
    pub pid: Option<u32>,
    /// Whether that pid is the running mediator of this lab.
    pub running: bool,
    /// `answering` when its `Show` answers, `unreachable` when it runs but does not answer,
    /// `stopped` when it does not run.
    pub state: String,
    /// What it sees (its diagnosis: `healthy`, `site A lost`, …), or why it does not answer or
    /// run.
    pub reason: String,
    /// gRPC address.
    pub grpc: String,
    /// `/metrics` address.
    pub metrics: String,
    /// Log file.
    pub log: PathBuf,
}

/// How a controller was stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StopReport {
    /// Node id.
    pub node: u32,
    /// Site.
    pub site: LabSite,
    /// The pid that was stopped; `None` if it was not running.
    pub pid: Option<u32>,
    /// `sigterm`, `sigkill` (after SIGTERM's deadline, or for `kill`), or `not-running`.
    pub how: String,
}

/// How the mediator was stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MediatorStopReport {
    /// The pid that was stopped; `None` if it was not running.
    pub pid: Option<u32>,
    /// `sigterm`, `sigkill` (after SIGTERM's deadline, or for `kill`), or `not-running`.
    pub how: String,
}

/// What `down` and `kill` did.
#[derive(Clone, Debug, Serialize)]
pub struct DownReport {
    /// The lab directory.
    pub dir: PathBuf,
    /// One per controller concerned.
    pub controllers: Vec<StopReport>,
    /// The mediator, when concerned (`down` of a lab with one, `kill --mediator`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mediator: Option<MediatorStopReport>,
}

/// What `start_mediator` did.
#[derive(Clone, Debug, Serialize)]
pub struct MediatorStartReport {
    /// The mediator started.
    pub mediator: MediatorReport,
    /// What it sees once it answered (`healthy`, or which failure).
    pub diagnosis: String,
}

/// What `start` did.
#[derive(Clone, Debug, Serialize)]
pub struct StartReport {
    /// The controller started.
    pub controller: ControllerReport,
    /// Its state once `start` returned (`serving`, or `fenced` while its partner is down or
    /// while it waits for switchback).
    pub node_state: String,
    /// Its MetroCluster mode (`normal`; `waiting-for-switchback` when its aggregates were
    /// switched over while it was down).
    pub mode: String,
    /// Why, in its words.
    pub reason: String,
}

/// Finds the controller binary: `explicit`, else `$MC_CONTROLLER_BIN`, else `mc-controller` next
/// to the running executable.
pub fn controller_bin(explicit: Option<&Path>) -> Result<PathBuf, LabError> {
    find_bin(
        explicit,
        "--controller-bin",
        CONTROLLER_BIN_ENV,
        "mc-controller",
        "cargo build -p controller",
        "",
    )
}

/// Finds the mediator binary: `explicit`, else `$MC_MEDIATOR_BIN`, else `mc-mediator` next to
/// the running executable.
pub fn mediator_bin(explicit: Option<&Path>) -> Result<PathBuf, LabError> {
    find_bin(
        explicit,
        "--mediator-bin",
        MEDIATOR_BIN_ENV,
        "mc-mediator",
        "cargo build -p mediator",
        ", or make a lab without a mediator with --no-mediator",
    )
}

/// `explicit` (the option `flag`), else the environment variable `env`, else `name` next to the
/// running executable; an error saying how to build it (`build`) and what else to do (`other`).
fn find_bin(
    explicit: Option<&Path>,
    flag: &str,
    env: &str,
    name: &str,
    build: &str,
    other: &str,
) -> Result<PathBuf, LabError> {
    let (path, from) = if let Some(path) = explicit {
        (path.to_path_buf(), flag)
    } else if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        (PathBuf::from(path), env)
    } else {
        let exe = std::env::current_exe()
            .map_err(|e| LabError::ControllerBin(format!("cannot find the running executable: {e}")))?;
        let dir = exe.parent().ok_or_else(|| {
            LabError::ControllerBin(format!("the running executable {} has no directory", exe.display()))
        })?;
        (dir.join(name), "the directory of mcctl")
    };
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(LabError::ControllerBin(format!("{} (from {from}) is not a file", path.display()))),
        Err(e) => Err(LabError::ControllerBin(format!(
            "no {name} at {} (from {from}): {e}; build it (`{build}`), or name it with {flag} or {env}{other}",
            path.display()
        ))),
    }
}

/// The size of each disk of an aggregate holding one volume of `volume_bytes`: the volume,
/// `DISK_ROOM_BYTES`, and twice the checksum area's share (one 4-byte CRC per 4 KiB block),
/// rounded up to 1 MiB.
pub fn disk_size_bytes(volume_bytes: u64) -> Option<u64> {
    let bytes = volume_bytes.checked_add(DISK_ROOM_BYTES)?.checked_add(volume_bytes.div_ceil(512))?;
    bytes.checked_next_multiple_of(1 << 20)
}

/// The lowest port the kernel hands out to outgoing connections, when the machine says.
fn ephemeral_port_floor() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// A listener on a free port of 127.0.0.1, below the kernel's ephemeral port range.
///
/// A controller or mediator that is stopped and started again listens on the same port, which
/// is free in between. A port of the ephemeral range can be taken then by any outgoing
/// connection on the machine (the partner reconnecting, a gRPC channel), which holds it as
/// long as it lives: the restart fails with "address in use". The kernel never picks a port
/// below the range for an outgoing connection. Falls back to any port (`127.0.0.1:0`) when the
/// range starts too low to leave room.
pub fn reserve_port() -> std::io::Result<std::net::TcpListener> {
    const FLOOR: u16 = 10_000;
    let ceiling = ephemeral_port_floor().unwrap_or(32_768);
    if ceiling > FLOOR + 1_000 {
        for _ in 0..256 {
            let port = rand::random_range(FLOOR..ceiling);
            if let Ok(listener) = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)) {
                return Ok(listener);
            }
        }
    }
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
}

/// Three free ports per site (gRPC, metrics, NBD) and two for the mediator (gRPC, metrics), all
/// distinct: every listener is held until all are chosen.
fn free_ports() -> Result<([[u16; 3]; 2], [u16; 2]), LabError> {
    let mut listeners = Vec::new();
    let mut choose = || {
        let listener = reserve_port().map_err(io_error("bind 127.0.0.1 to choose a free port"))?;
        let port = listener.local_addr().map_err(io_error("read a chosen port"))?.port();
        listeners.push(listener);
        Ok::<_, LabError>(port)
    };
    let mut ports = [[0u16; 3]; 2];
    for site in &mut ports {
        for port in site.iter_mut() {
            *port = choose()?;
        }
    }
    let mediator = [choose()?, choose()?];
    Ok((ports, mediator))
}

fn utf8(path: &Path) -> Result<&str, LabError> {
    path.to_str().ok_or_else(|| LabError::BadDir {
        dir: path.to_path_buf(),
        message: "the path is not valid UTF-8 (it goes into TOML configurations)".into(),
    })
}

/// The TOML configuration of `site`'s controller; with `mediator_grpc_port`, a `[mediator]`
/// section naming it.
fn config_text(
    options: &UpOptions,
    cluster_id: &str,
    site_dir: &Path,
    site: LabSite,
    ports: [u16; 3],
    partner_grpc_port: u16,
    mediator_grpc_port: Option<u16>,
) -> Result<String, LabError> {
    use toml::{Table, Value};
    let int = |n: u64| {
        i64::try_from(n).map(Value::Integer).map_err(|_| LabError::Invalid(format!("{n} is too large")))
    };
    let path = |p: PathBuf| utf8(&p).map(|s| Value::String(s.to_string()));
    let mut root = Table::new();
    root.insert("cluster_id".into(), Value::String(cluster_id.into()));
    root.insert("node_id".into(), Value::Integer(site.node_id().into()));
    root.insert("site".into(), Value::String(site.name().into()));
    root.insert("shelf_dir".into(), path(site_dir.join("shelf"))?);
    let mut partner = Table::new();
    partner.insert("node_id".into(), Value::Integer(site.partner().node_id().into()));
    partner.insert("address".into(), Value::String(format!("127.0.0.1:{partner_grpc_port}")));
    root.insert("dr_partner".into(), Value::Table(partner));
    let mut nvlog = Table::new();
    nvlog.insert("path".into(), path(site_dir.join("nvlog"))?);
    nvlog.insert("size_mib".into(), int(options.nvlog_size_mib.unwrap_or(DEFAULT_NVLOG_SIZE_MIB))?);
    let durability = match options.durability.unwrap_or(Durability::Process) {
        Durability::Process => "process",
        Durability::Power => "power",
    };
    nvlog.insert("durability".into(), Value::String(durability.into()));
    root.insert("nvlog".into(), Value::Table(nvlog));
    let mut listen = Table::new();
    for (key, port) in ["grpc", "metrics", "nbd"].into_iter().zip(ports) {
        listen.insert(key.into(), Value::String(format!("127.0.0.1:{port}")));
    }
    root.insert("listen".into(), Value::Table(listen));
    let mut timers = Table::new();
    let given = [
        ("mirror_timeout_ms", options.mirror_timeout_ms),
        ("cp_interval_ms", options.cp_interval_ms),
        ("keepalive_interval_ms", options.keepalive_interval_ms),
        ("keepalive_timeout_ms", options.keepalive_timeout_ms),
        ("margin_ms", options.margin_ms),
    ];
    for (key, value) in given {
        if let Some(value) = value {
            timers.insert(key.into(), int(value)?);
        }
    }
    if !timers.is_empty() {
        root.insert("timers".into(), Value::Table(timers));
    }
    if let Some(port) = mediator_grpc_port {
        let mut mediator = Table::new();
        mediator.insert("address".into(), Value::String(format!("127.0.0.1:{port}")));
        let given = [
            ("heartbeat_ms", options.heartbeat_ms),
            ("lease_ms", options.lease_ms),
            ("auso_window_ms", options.auso_window_ms),
        ];
        for (key, value) in given {
            if let Some(value) = value {
                mediator.insert(key.into(), int(value)?);
            }
        }
        root.insert("mediator".into(), Value::Table(mediator));
    }
    toml::to_string(&root).map_err(|e| LabError::Invalid(format!("encode the configuration: {e}")))
}

/// The TOML configuration of the mediator (the layout of `mediator/src/config.rs`): its state
/// in `mediator_dir/state`, both controllers, and every timer with the value `controller` (a
/// parsed controller configuration of this lab, which has a mediator) uses, so the two sides
/// agree on DESIGN §10.1's timers.
fn mediator_config_text(
    cluster_id: &str,
    mediator_dir: &Path,
    ports: [u16; 2],
    controller: &Config,
) -> Result<String, LabError> {
    use toml::{Table, Value};
    let mediator = controller
        .mediator
        .as_ref()
        .ok_or_else(|| LabError::Invalid("the controllers' configuration names no mediator".into()))?;
    let ms = |d: Duration| {
        i64::try_from(d.as_millis())
            .map(Value::Integer)
            .map_err(|_| LabError::Invalid(format!("{d:?} is too large")))
    };
    let mut root = Table::new();
    root.insert("cluster_id".into(), Value::String(cluster_id.into()));
    root.insert("state_dir".into(), Value::String(utf8(&mediator_dir.join("state"))?.to_string()));
    let mut listen = Table::new();
    for (key, port) in ["grpc", "metrics"].into_iter().zip(ports) {
        listen.insert(key.into(), Value::String(format!("127.0.0.1:{port}")));
    }
    root.insert("listen".into(), Value::Table(listen));
    let mut timers = Table::new();
    let t = &controller.timers;
    timers.insert("keepalive_timeout_ms".into(), ms(t.keepalive_timeout)?);
    timers.insert("heartbeat_ms".into(), ms(mediator.heartbeat)?);
    timers.insert("lease_ms".into(), ms(mediator.lease)?);
    timers.insert("margin_ms".into(), ms(t.margin)?);
    timers.insert("mirror_timeout_ms".into(), ms(t.mirror_timeout)?);
    timers.insert("auso_window_ms".into(), ms(mediator.auso_window)?);
    root.insert("timers".into(), Value::Table(timers));
    let controllers = LabSite::ALL
        .into_iter()
        .map(|site| {
            let mut c = Table::new();
            c.insert("node".into(), Value::Integer(site.node_id().into()));
            c.insert("site".into(), Value::String(site.name().into()));
            Value::Table(c)
        })
        .collect();
    root.insert("controllers".into(), Value::Array(controllers));
    toml::to_string(&root).map_err(|e| LabError::Invalid(format!("encode the mediator's configuration: {e}")))
}

/// Brings a lab up in `options.dir`: a new one in an empty or absent directory, or the
/// existing one restarted. Returns once the mediator (if the lab has one) answers and every
/// controller serves (and, for a new lab, the aggregates and volumes exist). On failure,
/// whatever it started is stopped again.
pub async fn up(options: &UpOptions) -> Result<UpReport, LabError> {
    let dir = &options.dir;
    if options.no_mediator && options.mediator_timers_given() {
        return Err(LabError::Invalid(
            "--heartbeat-ms, --lease-ms and --auso-window-ms are the mediator's timers: a lab with \
             --no-mediator has none"
                .into(),
        ));
    }
    let bin = controller_bin(options.controller_bin.as_deref())?;
    // Settings for a new lab are checked before anything is created.
    let mut new_mediator_bin = None;
    if !dir.join(LAB_FILE).exists() {
        new_lab_sizes(options, dir)?;
        if !options.no_mediator {
            new_mediator_bin = Some(mediator_bin(options.mediator_bin.as_deref())?);
        }
    }
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(LabError::BadDir {
                dir: dir.clone(),
                message: "not a directory (give a new or empty directory for a new lab, or a lab's)".into(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_error(format!("create {}", dir.display())))?;
        }
        Err(e) => return Err(io_error(format!("inspect {}", dir.display()))(e)),
    }
    // Absolute paths go into the configurations and the processes' command lines (which is how
    // a pid is recognised as ours).
    let dir = std::fs::canonicalize(dir).map_err(io_error(format!("resolve {}", dir.display())))?;
    utf8(&dir)?;
    let lock = LabLock::take(&dir).await?;
    let report = if dir.join(LAB_FILE).exists() {
        let mut report = restart(&dir, &bin, options.mediator_bin.as_deref()).await?;
        if options.shapes_a_new_lab() {
            report.notes.push(
                "the lab exists: it was restarted with its configurations; the size, durability, timer and \
                 mediator options given were ignored"
                    .into(),
            );
        }
        report
    } else {
        let mediator_bin = match new_mediator_bin {
            Some(bin) => Some(bin),
            // The lab file went away between the checks and the lock: check again.
            None if !options.no_mediator => Some(mediator_bin(options.mediator_bin.as_deref())?),
            None => None,
        };
        create(options, &dir, &bin, mediator_bin.as_deref()).await?
    };
    drop(lock);
    Ok(report)
}

/// Checks the settings of a new lab in `dir` (the daemon's own validation of a configuration
/// made from them, so a bad option is refused by its key); returns the volume size and the
/// size of each aggregate disk.
fn new_lab_sizes(options: &UpOptions, dir: &Path) -> Result<(u64, u64), LabError> {
    let volume_mib = options.volume_size_mib.unwrap_or(DEFAULT_VOLUME_SIZE_MIB);
    if !(1..=MAX_VOLUME_SIZE_MIB).contains(&volume_mib) {
        return Err(LabError::Invalid(format!(
            "volume size {volume_mib} MiB is outside 1..={MAX_VOLUME_SIZE_MIB}"
        )));
    }
    let volume_bytes = volume_mib << 20;
    let disk_bytes = disk_size_bytes(volume_bytes)
        .ok_or_else(|| LabError::Invalid(format!("volume size {volume_mib} MiB is too large")))?;
    let site_dir = dir.join(LabSite::A.name());
    let mediator = (!options.no_mediator).then_some(5);
    let text = config_text(options, &hex(&[0x11; 16]), &site_dir, LabSite::A, [1, 2, 3], 4, mediator)?;
    Config::parse(&text, &site_dir.join("controller.toml"), &Overrides::default()).map_err(|e| {
        let hint = match &e {
            crate::config::ConfigError::Invalid { key, .. }
                if key.starts_with("timers.") || key.starts_with("mediator.") =>
            {
                " (--mirror-timeout-ms, --cp-interval-ms, --keepalive-interval-ms, --keepalive-timeout-ms and \
                 --margin-ms set the timers, --heartbeat-ms, --lease-ms and --auso-window-ms the mediator's; \
                 the ones not given keep the product's defaults; --no-mediator makes a lab without a \
                 mediator)"
            }
            _ => "",
        };
        LabError::Invalid(format!("{e}{hint}"))
    })?;
    Ok((volume_bytes, disk_bytes))
}

/// Restarts the existing lab in `dir`: its mediator first (if it has one and it does not run),
/// then both controllers.
async fn restart(dir: &Path, bin: &Path, mediator_bin_path: Option<&Path>) -> Result<UpReport, LabError> {
    let mut state = LabState::load(dir)?;
    if !state.complete {
        return Err(LabError::Refused(format!(
            "the lab in {} is incomplete (its creation failed or was interrupted); stop it with `mcctl lab \
             down --dir {}`, then remove the directory and run `mcctl lab up` again",
            dir.display(),
            dir.display()
        )));
    }
    let running: Vec<String> = state
        .controllers
        .iter()
        .filter_map(|c| running_pid(c).map(|pid| format!("site {} (pid {pid})", c.site)))
        .collect();
    if !running.is_empty() {
        return Err(LabError::Refused(format!(
            "the lab in {} is running already: {}; see `mcctl lab status --dir {}`, or stop it with `mcctl \
             lab down`",
            dir.display(),
            running.join(", "),
            dir.display()
        )));
    }
    let cluster = state.cluster_bytes()?;
    let mut notes = Vec::new();
    let mut children = Vec::new();
    if state.mediator.is_some() {
        match state.process(LabMember::Mediator)?.running_pid() {
            Some(pid) => notes.push(format!("the mediator was running already (pid {pid}); it was kept")),
            None => {
                let mediator_bin = mediator_bin(mediator_bin_path)?;
                children.push(start_process(dir, &mediator_bin, &mut state, LabMember::Mediator)?);
            }
        }
    }
    let started = async {
        wait_ready(dir, &mut state, &cluster, &mut children).await?;
        children.extend(start_all(dir, bin, &mut state)?);
        wait_ready(dir, &mut state, &cluster, &mut children).await
    }
    .await;
    if let Err(error) = started {
        stop_after_failure(dir, &mut state, children).await;
        return Err(error);
    }
    let mut report = up_report(dir, &state, false);
    report.notes = notes;
    Ok(report)
}

/// Writes the mediator's configuration into `mediator_dir` and has `mc-mediator
/// --check-config` validate it; on refusal, removes `mediator_dir` again (the directory of a
/// new lab stays empty) and returns the mediator's message.
fn write_mediator_config(mediator_bin: &Path, mediator_dir: &Path, text: &str) -> Result<PathBuf, LabError> {
    let state_dir = mediator_dir.join("state");
    std::fs::create_dir_all(&state_dir).map_err(io_error(format!("create {}", state_dir.display())))?;
    write_atomically(mediator_dir, "mediator.toml", text.as_bytes())?;
    let config = mediator_dir.join("mediator.toml");
    let out = Command::new(mediator_bin)
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Start {
            who: LabMember::Mediator.who(),
            message: format!("cannot run {} --check-config: {e}", mediator_bin.display()),
        })?;
    if out.status.success() {
        return Ok(config);
    }
    let _ = std::fs::remove_dir_all(mediator_dir);
    Err(LabError::Invalid(format!(
        "{} refuses the mediator configuration the lab made ({}): {}",
        mediator_bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Creates a new lab in the empty directory `dir`, with a mediator unless `mediator_bin` is
/// `None` (`--no-mediator`).
async fn create(
    options: &UpOptions,
    dir: &Path,
    bin: &Path,
    mediator_bin: Option<&Path>,
) -> Result<UpReport, LabError> {
    let entries = std::fs::read_dir(dir).map_err(io_error(format!("list {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_error(format!("list {}", dir.display())))?;
        if entry.file_name() != LOCK_FILE {
            return Err(LabError::BadDir {
                dir: dir.to_path_buf(),
                message: format!(
                    "not empty and no lab ({} is there, {LAB_FILE} is not): give a new or empty directory",
                    entry.file_name().to_string_lossy()
                ),
            });
        }
    }
    let (volume_bytes, disk_bytes) = new_lab_sizes(options, dir)?;
    let cluster = rand::random::<[u8; 16]>();
    let cluster_id = hex(&cluster);
    let (ports, mediator_ports) = free_ports()?;
    let mediator_port = mediator_bin.map(|_| mediator_ports[0]);
    let mut controllers = Vec::new();
    let mut texts = Vec::new();
    let mut parsed = Vec::new();
    for site in LabSite::ALL {
        let index = usize::from(site == LabSite::B);
        let site_dir = dir.join(site.name());
        let config = site_dir.join("controller.toml");
        let partner_grpc = ports[1 - index][0];
        let text =
            config_text(options, &cluster_id, &site_dir, site, ports[index], partner_grpc, mediator_port)?;
        // Checked again with the real ports and paths, before anything is written or started.
        parsed.push(
            Config::parse(&text, &config, &Overrides::default())
                .map_err(|e| LabError::Invalid(e.to_string()))?,
        );
        texts.push((site_dir.clone(), text));
        controllers.push(LabController {
            node: site.node_id(),
            site,
            config,
            admin: format!("127.0.0.1:{}", ports[index][0]),
            metrics: format!("127.0.0.1:{}", ports[index][1]),
            nbd: format!("127.0.0.1:{}", ports[index][2]),
            pid: None,
            log: site_dir.join("controller.log"),
        });
    }
    // The mediator's configuration first: it is the one checked by another program, and on
    // refusal nothing else has been written.
    let mediator = match mediator_bin {
        Some(mediator_bin) => {
            let mediator_dir = dir.join(MEDIATOR_DIR);
            let text = mediator_config_text(&cluster_id, &mediator_dir, mediator_ports, &parsed[0])?;
            let config = write_mediator_config(mediator_bin, &mediator_dir, &text)?;
            Some(LabMediator {
                config,
                grpc: format!("127.0.0.1:{}", mediator_ports[0]),
                metrics: format!("127.0.0.1:{}", mediator_ports[1]),
                pid: None,
                log: mediator_dir.join("mediator.log"),
            })
        }
        None => None,
    };
    for (site_dir, text) in &texts {
        std::fs::create_dir_all(site_dir.join("shelf"))
            .map_err(io_error(format!("create {}", site_dir.join("shelf").display())))?;
        write_atomically(site_dir, "controller.toml", text.as_bytes())?;
    }
    let mut state = LabState {
        format: LAB_FORMAT,
        cluster_id,
        complete: false,
        controllers,
        volumes: Vec::new(),
        mediator,
    };
    state.save(dir)?;
    let mut children = Vec::new();
    let created = async {
        if let Some(mediator_bin) = mediator_bin {
            // The mediator answers before the controllers start: their lease starts with a round
            // trip (S6), and their first heartbeats find it.
            children.push(start_process(dir, mediator_bin, &mut state, LabMember::Mediator)?);
            wait_ready(dir, &mut state, &cluster, &mut children).await?;
        }
        children.extend(start_all(dir, bin, &mut state)?);
        wait_ready(dir, &mut state, &cluster, &mut children).await?;
        let mut volumes = Vec::new();
        for site in LabSite::ALL {
            volumes.push(create_volume(&state, &cluster, site, volume_bytes, disk_bytes).await?);
        }
        Ok::<_, LabError>(volumes)
    }
    .await;
    match created {
        Ok(volumes) => {
            state.volumes = volumes;
            state.complete = true;
            state.save(dir)?;
            Ok(up_report(dir, &state, true))
        }
        Err(error) => {
            stop_after_failure(dir, &mut state, children).await;
            Err(error)
        }
    }
}

/// Creates `site`'s aggregate (plex 0 on its shelf, plex 1 on its partner's) and volume.
async fn create_volume(
    state: &LabState,
    cluster: &[u8; 16],
    site: LabSite,
    volume_bytes: u64,
    disk_bytes: u64,
) -> Result<LabVolume, LabError> {
    let controller = state.controller(site);
    let aggregate = format!("aggr_{}", site.lower());
    let name = format!("vol_{}", site.lower());
    let rpc_error = |what: &str| {
        let what = what.to_string();
        move |message: String| LabError::Rpc { site, what, message }
    };
    let mut admin = admin_client(&controller.admin).await.map_err(rpc_error("connect"))?;
    let mut request = tonic::Request::new(CreateAggregateRequest {
        cluster_id: cluster.to_vec(),
        name: aggregate.clone(),
        plex0_disks: vec![format!("{aggregate}-p0-d0")],
        plex1_disks: vec![format!("{aggregate}-p1-d0")],
        disk_size_bytes: disk_bytes,
    });
    request.set_timeout(CREATE_TIMEOUT);
    admin
        .create_aggregate(request)
        .await
        .map_err(|s| rpc_error(&format!("create aggregate {aggregate}"))(s.message().to_string()))?;
    let mut request = tonic::Request::new(CreateVolumeRequest {
        cluster_id: cluster.to_vec(),
        aggregate: aggregate.clone(),
        name: name.clone(),
        size_bytes: volume_bytes,
    });
    request.set_timeout(CREATE_TIMEOUT);
    admin
        .create_volume(request)
        .await
        .map_err(|s| rpc_error(&format!("create volume {name}"))(s.message().to_string()))?;
    let uri = format!("nbd://{}/{name}", controller.nbd);
    Ok(LabVolume { name, site, aggregate, size_bytes: volume_bytes, uri })
}

fn up_report(dir: &Path, state: &LabState, created: bool) -> UpReport {
    UpReport {
        dir: dir.to_path_buf(),
        cluster_id: state.cluster_id.clone(),
        created,
        volumes: state.volumes.iter().map(VolumeReport::of).collect(),
        controllers: state.controllers.iter().map(ControllerReport::of).collect(),
        mediator: state.mediator.as_ref().map(MediatorReport::of),
        notes: Vec::new(),
    }
}

/// A started process: its child handle (while this process is its parent), the binary it runs
/// (to start it again) and where its log stood before the start.
#[derive(Debug)]
struct Started {
    member: LabMember,
    bin: PathBuf,
    child: Child,
    log_offset: u64,
}

/// Starts both controllers and records their pids.
fn start_all(dir: &Path, bin: &Path, state: &mut LabState) -> Result<Vec<Started>, LabError> {
    let mut started = Vec::new();
    for site in LabSite::ALL {
        match start_process(dir, bin, state, LabMember::Controller(site)) {
            Ok(one) => started.push(one),
            Err(error) => {
                for mut one in started {
                    let _ = one.child.kill();
                    let _ = one.child.wait();
                    state.set_pid(one.member, None);
                }
                let _ = state.save(dir);
                return Err(error);
            }
        }
    }
    Ok(started)
}

/// Spawns `member` (`bin --config CONFIG`) in its own session and saves its pid in `lab.json`
/// at once.
fn start_process(
    dir: &Path,
    bin: &Path,
    state: &mut LabState,
    member: LabMember,
) -> Result<Started, LabError> {
    let process = state.process(member)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&process.log)
        .map_err(io_error(format!("open {}", process.log.display())))?;
    let log_offset =
        log.seek(SeekFrom::End(0)).map_err(io_error(format!("seek {}", process.log.display())))?;
    let _ =
        writeln!(log, "=== mcctl lab: starting {} --config {} ===", bin.display(), process.config.display());
    let stderr = log.try_clone().map_err(io_error(format!("duplicate {}", process.log.display())))?;
    let mut command = Command::new(bin);
    command.arg("--config").arg(&process.config).stdin(Stdio::null()).stdout(log).stderr(stderr);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    if std::env::var_os("NO_COLOR").is_none() {
        // The log is a file: no terminal colour codes in it.
        command.env("NO_COLOR", "1");
    }
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed; `setsid` is one, and the closure touches no memory of the parent. A new
    // session keeps the process out of mcctl's process group, so a Ctrl-C at the terminal or
    // mcctl's exit does not reach it.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| LabError::Start {
        who: member.who(),
        message: format!("cannot start {}: {e}", bin.display()),
    })?;
    // No `await` between the spawn and the save (module invariant).
    state.set_pid(member, Some(child.id()));
    if let Err(error) = state.save(dir) {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        state.set_pid(member, None);
        return Err(error);
    }
    Ok(Started { member, bin: bin.to_path_buf(), child, log_offset })
}

/// Whether `started` has exited. A process that exited because an address of its was in use
/// (held for a moment by its killed predecessor, or taken by another program since the lab
/// chose it) is started again while `deadline` allows; any other exit is an error with the
/// tail of its log.
fn check_exit(
    dir: &Path,
    state: &mut LabState,
    started: &mut Started,
    deadline: Instant,
) -> Result<(), LabError> {
    let Some(status) = started.child.try_wait().map_err(io_error("wait for a started process"))? else {
        return Ok(());
    };
    let member = started.member;
    let process = state.process(member)?;
    let since = log_since(&process.log, started.log_offset);
    if since.contains("Address already in use") && Instant::now() < deadline {
        let bin = started.bin.clone();
        *started = start_process(dir, &bin, state, member)?;
        return Ok(());
    }
    state.set_pid(member, None);
    state.save(dir)?;
    let what = match member {
        LabMember::Controller(_) => "serving",
        LabMember::Mediator => "answering",
    };
    Err(LabError::Start {
        who: member.who(),
        message: format!(
            "exited ({status}) before {what}; the end of {}:\n{}",
            process.log.display(),
            tail_of(&since)
        ),
    })
}

/// Whether `member` is ready: a controller serves, the mediator answers `Show`; else what it is.
async fn readiness(state: &LabState, cluster: &[u8; 16], member: LabMember) -> Result<(), String> {
    match member {
        LabMember::Controller(site) => match node_status(&state.controller(site).admin, cluster).await {
            Ok(status) if status.node_state == "serving" => Ok(()),
            Ok(status) => Err(format!("{} ({})", status.node_state, status.state_reason)),
            Err(message) => Err(format!("unreachable ({message})")),
        },
        LabMember::Mediator => {
            let Some(mediator) = &state.mediator else { return Err("not in this lab".into()) };
            match mediator_show(&mediator.grpc, cluster).await {
                Ok(_) => Ok(()),
                Err(message) => Err(format!("not answering ({message})")),
            }
        }
    }
}

/// Waits until every started process is ready (`readiness`), checking that none exited.
async fn wait_ready(
    dir: &Path,
    state: &mut LabState,
    cluster: &[u8; 16],
    children: &mut [Started],
) -> Result<(), LabError> {
    let deadline = Instant::now() + READY_DEADLINE;
    let mut last: BTreeMap<LabMember, String> = BTreeMap::new();
    loop {
        let mut pending = None;
        for started in children.iter_mut() {
            check_exit(dir, state, started, deadline)?;
            if let Err(why) = readiness(state, cluster, started.member).await {
                last.insert(started.member, why);
                pending = pending.or(Some(started.member));
            }
        }
        let Some(member) = pending else { return Ok(()) };
        if Instant::now() > deadline {
            let Some(started) = children.iter().find(|c| c.member == member) else { return Ok(()) };
            let process = state.process(member)?;
            let what = match member {
                LabMember::Controller(_) => "serving",
                LabMember::Mediator => "answering",
            };
            return Err(LabError::Start {
                who: member.who(),
                message: format!(
                    "not {what} after {} s: it is {}; the end of {}:\n{}",
                    READY_DEADLINE.as_secs(),
                    last.get(&member).map_or("unknown", String::as_str),
                    process.log.display(),
                    log_tail(&process.log, started.log_offset)
                ),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Stops the processes this command started (it is their parent), after a failure: the
/// controllers first, then the mediator.
async fn stop_after_failure(dir: &Path, state: &mut LabState, mut children: Vec<Started>) {
    children.sort_by_key(|started| started.member == LabMember::Mediator);
    for mut started in children {
        // SIGTERM first, so the process's last words reach its log.
        if let Ok(pid) = i32::try_from(started.child.id()) {
            // SAFETY: signalling our own child, which has not been waited for, so its pid is not
            // reused yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        loop {
            match started.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = started.child.kill();
                    let _ = started.child.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
        state.set_pid(started.member, None);
    }
    if let Err(error) = state.save(dir) {
        tracing::warn!(%error, "cannot record the stopped processes");
    }
}

/// What `log` holds after `offset` (at most its last 64 KiB: enough for what is shown).
fn log_since(log: &Path, offset: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(log)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(offset.max(len.saturating_sub(64 << 10))))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    read().unwrap_or_else(|e| format!("({} cannot be read: {e})", log.display()))
}

/// The last `LOG_TAIL_LINES` lines of `text`.
fn tail_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    if tail.is_empty() { "(nothing)".into() } else { tail }
}

/// The last `LOG_TAIL_LINES` lines of `log` written after `offset`.
pub fn log_tail(log: &Path, offset: u64) -> String {
    tail_of(&log_since(log, offset))
}

async fn admin_client(address: &str) -> Result<AdminClient<Channel>, String> {
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(STATUS_TIMEOUT)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(AdminClient::new(channel).max_decoding_message_size(64 << 20))
}

/// `Admin.Status` of the controller at `address`.
pub async fn node_status(address: &str, cluster: &[u8; 16]) -> Result<StatusReply, String> {
    let mut admin = admin_client(address).await?;
    let mut request = tonic::Request::new(StatusRequest { cluster_id: cluster.to_vec() });
    request.set_timeout(STATUS_TIMEOUT);
    admin
        .status(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() })
}

/// `Mediator.Show` of the mediator at `address` for `cluster`.
pub async fn mediator_show(address: &str, cluster: &[u8; 16]) -> Result<MediatorShowReply, String> {
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(STATUS_TIMEOUT)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = MediatorClient::new(channel);
    let mut request = tonic::Request::new(MediatorShowRequest { cluster_id: cluster.to_vec() });
    request.set_timeout(STATUS_TIMEOUT);
    client
        .show(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| if s.message().is_empty() { format!("{:?}", s.code()) } else { s.message().to_string() })
}

/// The process `pid` as this lab knows it: running (not a zombie) with `--config CONFIG` on its
/// command line (a controller's or the mediator's configuration of this lab).
pub fn is_our_process(pid: u32, config: &Path) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    if raw <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled; nothing is
    // delivered.
    let alive = unsafe { libc::kill(raw, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !alive {
        return false;
    }
    // A zombie (exited, not yet reaped by its parent) is not running.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X" | "x")) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let config = config.as_os_str().as_encoded_bytes();
    args.windows(2).any(|pair| pair[0] == b"--config" && pair[1] == config)
}

/// The pid of `controller` if it runs.
fn running_pid(controller: &LabController) -> Option<u32> {
    controller.pid.filter(|&pid| is_our_process(pid, &controller.config))
}

/// The lab in `dir` as it is now: each controller's process and state, the mediator's, and the
/// volumes.
pub async fn status(dir: &Path) -> Result<StatusReport, LabError> {
    let dir = std::fs::canonicalize(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LabError::NoLab { dir: dir.to_path_buf() },
        _ => io_error(format!("resolve {}", dir.display()))(e),
    })?;
    let state = LabState::load(&dir)?;
    let cluster = state.cluster_bytes()?;
    let mut controllers = Vec::new();
    let mut volume_states: BTreeMap<String, String> = BTreeMap::new();
    for controller in &state.controllers {
        let running = running_pid(controller).is_some();
        let (node_state, reason) = if running {
            match node_status(&controller.admin, &cluster).await {
                Ok(reply) => {
                    for volume in reply.aggregates.iter().flat_map(|a| &a.volumes) {
                        volume_states.insert(volume.name.clone(), volume.state.clone());
                    }
                    (reply.node_state, reply.state_reason)
                }
                Err(message) => ("unreachable".to_string(), message),
            }
        } else {
            ("stopped".to_string(), not_running_reason(controller.pid))
        };
        controllers.push(ControllerStatus {
            node: controller.node,
            site: controller.site,
            pid: controller.pid,
            running,
            node_state,
            reason,
            admin: controller.admin.clone(),
            metrics: controller.metrics.clone(),
            nbd: controller.nbd.clone(),
            log: controller.log.clone(),
        });
    }
    let mediator = match &state.mediator {
        Some(mediator) => {
            let running = state.process(LabMember::Mediator)?.running_pid().is_some();
            let (mediator_state, reason) = if running {
                match mediator_show(&mediator.grpc, &cluster).await {
                    Ok(reply) => ("answering".to_string(), reply.diagnosis),
                    Err(message) => ("unreachable".to_string(), message),
                }
            } else {
                ("stopped".to_string(), not_running_reason(mediator.pid))
            };
            Some(MediatorStatus {
                pid: mediator.pid,
                running,
                state: mediator_state,
                reason,
                grpc: mediator.grpc.clone(),
                metrics: mediator.metrics.clone(),
                log: mediator.log.clone(),
            })
        }
        None => None,
    };
    let volumes = state
        .volumes
        .iter()
        .map(|volume| VolumeReport {
            state: volume_states.get(&volume.name).cloned(),
            ..VolumeReport::of(volume)
        })
        .collect();
    Ok(StatusReport {
        dir,
        cluster_id: state.cluster_id,
        complete: state.complete,
        controllers,
        mediator,
        volumes,
    })
}

/// Why a process of the lab whose recorded pid is `pid` does not run.
fn not_running_reason(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid} is not running (it exited or was killed)"),
        None => "stopped by `mcctl lab down` or `mcctl lab kill`".to_string(),
    }
}

/// Opens the lab in `dir` for a change: the canonical directory, its lock and its state.
async fn open_for_change(dir: &Path) -> Result<(PathBuf, LabLock, LabState), LabError> {
    check_dir(dir)?;
    let dir = std::fs::canonicalize(dir).map_err(io_error(format!("resolve {}", dir.display())))?;
    // The state must exist before a lock file is created in the directory.
    LabState::load(&dir)?;
    let lock = LabLock::take(&dir).await?;
    let state = LabState::load(&dir)?;
    Ok((dir, lock, state))
}

fn signal(pid: u32, signal: i32) -> Result<(), std::io::Error> {
    let raw = i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: `kill` touches no memory; the caller checked just before that `pid` is a
    // process of this lab (`is_our_process`).
    if unsafe { libc::kill(raw, signal) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Waits until none of `pids` is a running process of its configuration, or `deadline`.
async fn wait_gone(pids: &[(u32, &Path)], deadline: Instant) -> Vec<u32> {
    loop {
        let left: Vec<u32> =
            pids.iter().filter(|(pid, config)| is_our_process(*pid, config)).map(|(pid, _)| *pid).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Stops the running processes of `members` together: SIGTERM, then SIGKILL after
/// `STOP_DEADLINE`; records them as stopped. Returns how each was stopped (`None`: it was not
/// running).
async fn stop_members(
    dir: &Path,
    state: &mut LabState,
    members: &[LabMember],
) -> Result<Vec<(LabMember, Option<u32>, &'static str)>, LabError> {
    let mut reports = Vec::new();
    let mut running = Vec::new();
    for &member in members {
        let process = state.process(member)?;
        match process.running_pid() {
            Some(pid) => {
                match signal(pid, libc::SIGTERM) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => {
                        return Err(LabError::Stop {
                            who: member.to_string(),
                            pid,
                            message: format!("SIGTERM: {e}"),
                        });
                    }
                }
                running.push((member, pid, process.config));
            }
            None => reports.push((member, None, "not-running")),
        }
    }
    let pids: Vec<(u32, &Path)> = running.iter().map(|(_, pid, config)| (*pid, config.as_path())).collect();
    let left = wait_gone(&pids, Instant::now() + STOP_DEADLINE).await;
    for &pid in &left {
        let _ = signal(pid, libc::SIGKILL);
    }
    let still = wait_gone(&pids, Instant::now() + STOP_DEADLINE).await;
    for (member, pid, _) in &running {
        if still.contains(pid) {
            state.save(dir)?;
            return Err(LabError::Stop {
                who: member.to_string(),
                pid: *pid,
                message: "it survived SIGKILL".into(),
            });
        }
        let how = if left.contains(pid) { "sigkill" } else { "sigterm" };
        reports.push((*member, Some(*pid), how));
    }
    for &member in members {
        state.set_pid(member, None);
    }
    state.save(dir)?;
    Ok(reports)
}

/// Stops every running process of the lab in `dir`: the controllers, then the mediator; each
/// gets SIGTERM, then SIGKILL after `STOP_DEADLINE`. The data stays.
pub async fn down(dir: &Path) -> Result<DownReport, LabError> {
    let (dir, _lock, mut state) = open_for_change(dir).await?;
    let sites: Vec<LabMember> = LabSite::ALL.into_iter().map(LabMember::Controller).collect();
    let mut controllers: Vec<StopReport> = stop_members(&dir, &mut state, &sites)
        .await?
        .into_iter()
        .filter_map(|(member, pid, how)| match member {
            LabMember::Controller(site) => {
                Some(StopReport { node: site.node_id(), site, pid, how: how.to_string() })
            }
            LabMember::Mediator => None,
        })
        .collect();
    controllers.sort_by_key(|r| r.site);
    // After the controllers: none of them runs without its mediator.
    let mediator = if state.mediator.is_some() {
        let stopped = stop_members(&dir, &mut state, &[LabMember::Mediator]).await?;
        stopped.first().map(|&(_, pid, how)| MediatorStopReport { pid, how: how.to_string() })
    } else {
        None
    };
    Ok(DownReport { dir, controllers, mediator })
}

/// `kill -9` of `member` (a site's controller, or the mediator); returns once it is gone.
pub async fn kill(dir: &Path, member: LabMember) -> Result<DownReport, LabError> {
    let (dir, _lock, mut state) = open_for_change(dir).await?;
    let process = state.process(member)?;
    let Some(pid) = process.running_pid() else {
        return Err(LabError::Refused(format!(
            "{member} is not running{}",
            process.pid.map(|pid| format!(" (pid {pid} has gone)")).unwrap_or_default()
        )));
    };
    signal(pid, libc::SIGKILL).map_err(|e| LabError::Stop {
        who: member.to_string(),
        pid,
        message: format!("SIGKILL: {e}"),
    })?;
    let left = wait_gone(&[(pid, process.config.as_path())], Instant::now() + STOP_DEADLINE).await;
    if !left.is_empty() {
        return Err(LabError::Stop { who: member.to_string(), pid, message: "it survived SIGKILL".into() });
    }
    state.set_pid(member, None);
    state.save(&dir)?;
    let how = "sigkill".to_string();
    Ok(match member {
        LabMember::Controller(site) => DownReport {
            dir,
            controllers: vec![StopReport { node: site.node_id(), site, pid: Some(pid), how }],
            mediator: None,
        },
        LabMember::Mediator => DownReport {
            dir,
            controllers: Vec::new(),
            mediator: Some(MediatorStopReport { pid: Some(pid), how }),
        },
    })
}

/// Opens the complete lab in `dir` to start `member` again: refused if the lab is incomplete or
/// `member` runs.
async fn open_for_start(dir: &Path, member: LabMember) -> Result<(PathBuf, LabLock, LabState), LabError> {
    let (dir, lock, state) = open_for_change(dir).await?;
    if !state.complete {
        return Err(LabError::Refused(format!(
            "the lab in {} is incomplete (its creation failed or was interrupted); remove it and run `mcctl \
             lab up` again",
            dir.display()
        )));
    }
    if let Some(pid) = state.process(member)?.running_pid() {
        return Err(LabError::Refused(format!("{member} is running already (pid {pid})")));
    }
    Ok((dir, lock, state))
}

/// Starts `site`'s controller again with its configuration and waits until it serves (or, while
/// its partner is down, until it answers: it stays fenced until the partner confirms its epoch,
/// S2; or once it answers as waiting for switchback: its aggregates were switched over while it
/// was down and it serves none of them until heal and switchback).
pub async fn start(
    dir: &Path,
    site: LabSite,
    controller_bin_path: Option<&Path>,
) -> Result<StartReport, LabError> {
    let bin = controller_bin(controller_bin_path)?;
    let member = LabMember::Controller(site);
    let (dir, _lock, mut state) = open_for_start(dir, member).await?;
    let partner_running = running_pid(state.controller(site.partner())).is_some();
    let cluster = state.cluster_bytes()?;
    let mut started = start_process(&dir, &bin, &mut state, member)?;
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        check_exit(&dir, &mut state, &mut started, deadline)?;
        let controller = state.controller(site).clone();
        let last = match node_status(&controller.admin, &cluster).await {
            Ok(reply)
                if reply.node_state == "serving"
                    || reply.mode == "waiting-for-switchback"
                    || !partner_running =>
            {
                return Ok(StartReport {
                    controller: ControllerReport::of(&controller),
                    node_state: reply.node_state,
                    mode: reply.mode,
                    reason: reply.state_reason,
                });
            }
            Ok(reply) => format!("{} ({})", reply.node_state, reply.state_reason),
            Err(message) => format!("unreachable ({message})"),
        };
        if Instant::now() > deadline {
            let tail = log_tail(&controller.log, started.log_offset);
            stop_after_failure(&dir, &mut state, vec![started]).await;
            return Err(LabError::Start {
                who: member.who(),
                message: format!(
                    "not serving after {} s: it is {last}; stopped it again; the end of {}:\n{tail}",
                    READY_DEADLINE.as_secs(),
                    controller.log.display()
                ),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Starts the lab's mediator again with its configuration (and its state directory) and waits
/// until it answers.
pub async fn start_mediator(
    dir: &Path,
    mediator_bin_path: Option<&Path>,
) -> Result<MediatorStartReport, LabError> {
    let (dir, _lock, mut state) = open_for_start(dir, LabMember::Mediator).await?;
    let bin = mediator_bin(mediator_bin_path)?;
    let cluster = state.cluster_bytes()?;
    let mut children = vec![start_process(&dir, &bin, &mut state, LabMember::Mediator)?];
    if let Err(error) = wait_ready(&dir, &mut state, &cluster, &mut children).await {
        stop_after_failure(&dir, &mut state, children).await;
        return Err(error);
    }
    let mediator = state.mediator.as_ref().ok_or_else(no_mediator)?;
    let diagnosis = match mediator_show(&mediator.grpc, &cluster).await {
        Ok(reply) => reply.diagnosis,
        Err(e) => format!("(it answered, then not: {e})"),
    };
    Ok(MediatorStartReport { mediator: MediatorReport::of(mediator), diagnosis })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The disks the lab asks for must hold the volume table, the volume and every per-disk
    /// area, or `CreateVolume` fails with no space on a new lab.
    #[test]
    fn an_aggregate_disk_holds_its_volume() {
        for mib in [1, 16, 64, 1024, 100 << 10, 16 << 20, MAX_VOLUME_SIZE_MIB] {
            let volume = mib << 20;
            let disk = disk_size_bytes(volume).unwrap();
            let areas = plex::layout::plan_plex(&[disk], 64 * 1024).unwrap();
            let table = crate::volume::VolumeTable::new([1; 16], "aggr_a").unwrap();
            table.with_volume("vol_a", volume, areas[0].data.len).unwrap();
        }
    }

    fn state() -> LabState {
        let controller = |site: LabSite| LabController {
            node: site.node_id(),
            site,
            config: PathBuf::from(format!("/lab/{site}/controller.toml")),
            admin: "127.0.0.1:1".into(),
            metrics: "127.0.0.1:2".into(),
            nbd: "127.0.0.1:3".into(),
            pid: Some(42),
            log: PathBuf::from(format!("/lab/{site}/controller.log")),
        };
        LabState {
            format: LAB_FORMAT,
            cluster_id: "00112233445566778899aabbccddeeff".into(),
            complete: true,
            controllers: vec![controller(LabSite::A), controller(LabSite::B)],
            volumes: Vec::new(),
            mediator: Some(LabMediator {
                config: PathBuf::from("/lab/mediator/mediator.toml"),
                grpc: "127.0.0.1:5".into(),
                metrics: "127.0.0.1:6".into(),
                pid: Some(43),
                log: PathBuf::from("/lab/mediator/mediator.log"),
            }),
        }
    }

    /// A `lab.json` written before the lab had a mediator (no `mediator` key) is a lab without
    /// one, and a lab without one is written without the key (as before): older labs keep
    /// working, and `--no-mediator` labs stay what they were.
    #[test]
    fn a_state_file_without_a_mediator_is_a_lab_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = state();
        old.mediator = None;
        let text = serde_json::to_string_pretty(&old).unwrap();
        assert!(!text.contains("mediator"), "{text}");
        std::fs::write(dir.path().join(LAB_FILE), &text).unwrap();
        let loaded = LabState::load(dir.path()).unwrap();
        assert_eq!(loaded, old);
        assert!(matches!(loaded.process(LabMember::Mediator), Err(LabError::Refused(_))));
        let mut with = state();
        with.save(dir.path()).unwrap();
        assert_eq!(LabState::load(dir.path()).unwrap(), with);
        with.mediator.as_mut().unwrap().pid = Some(0);
        std::fs::write(dir.path().join(LAB_FILE), serde_json::to_string(&with).unwrap()).unwrap();
        assert!(matches!(LabState::load(dir.path()), Err(LabError::Corrupt { .. })));
    }

    /// Prevents a lab whose mediator and controllers disagree on DESIGN §10.1's timers: the
    /// mediator's `[timers]` are the controller's values once parsed (given or defaults), and the
    /// controller's `[mediator]` names the mediator's address.
    #[test]
    fn the_mediator_config_has_the_controllers_timers() {
        for options in [
            UpOptions::default(),
            UpOptions {
                mirror_timeout_ms: Some(5000),
                keepalive_interval_ms: Some(200),
                keepalive_timeout_ms: Some(600),
                margin_ms: Some(500),
                heartbeat_ms: Some(200),
                lease_ms: Some(2000),
                auso_window_ms: Some(5000),
                ..UpOptions::default()
            },
        ] {
            let cluster = "00112233445566778899aabbccddeeff";
            let text = config_text(&options, cluster, Path::new("/lab/A"), LabSite::A, [1, 2, 3], 4, Some(7))
                .unwrap();
            let config = Config::parse(&text, Path::new("t"), &Overrides::default()).unwrap();
            let mediator = config.mediator.clone().unwrap();
            assert_eq!(mediator.address, "127.0.0.1:7");
            let text = mediator_config_text(cluster, Path::new("/lab/mediator"), [7, 8], &config).unwrap();
            let table: toml::Table = toml::from_str(&text).unwrap();
            assert_eq!(table["cluster_id"].as_str(), Some(cluster));
            assert_eq!(table["state_dir"].as_str(), Some("/lab/mediator/state"));
            assert_eq!(table["listen"]["grpc"].as_str(), Some("127.0.0.1:7"));
            assert_eq!(table["listen"]["metrics"].as_str(), Some("127.0.0.1:8"));
            let ms = |key: &str| Duration::from_millis(table["timers"][key].as_integer().unwrap() as u64);
            assert_eq!(ms("keepalive_timeout_ms"), config.timers.keepalive_timeout);
            assert_eq!(ms("margin_ms"), config.timers.margin);
            assert_eq!(ms("mirror_timeout_ms"), config.timers.mirror_timeout);
            assert_eq!(ms("heartbeat_ms"), mediator.heartbeat);
            assert_eq!(ms("lease_ms"), mediator.lease);
            assert_eq!(ms("auso_window_ms"), mediator.auso_window);
            let controllers = table["controllers"].as_array().unwrap();
            assert_eq!(controllers.len(), 2);
            assert_eq!(controllers[1]["node"].as_integer(), Some(2));
            assert_eq!(controllers[1]["site"].as_str(), Some("B"));
        }
        // Without a mediator, the configuration is the one the lab wrote before it had one.
        let text = config_text(
            &UpOptions::default(),
            "00112233445566778899aabbccddeeff",
            Path::new("/lab/A"),
            LabSite::A,
            [1, 2, 3],
            4,
            None,
        )
        .unwrap();
        assert!(!text.contains("mediator"), "{text}");
    }

    /// The lab's own timer options are checked by the controller's rules before anything is
    /// made: a mirror timeout too short for the product's lease is refused by key, with a hint
    /// naming the options, and mediator timers with `--no-mediator` are refused.
    #[test]
    fn mediator_timers_are_checked_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let small = UpOptions {
            mirror_timeout_ms: Some(5000),
            keepalive_interval_ms: Some(200),
            keepalive_timeout_ms: Some(1500),
            ..UpOptions::default()
        };
        let error = new_lab_sizes(&small, dir.path()).unwrap_err().to_string();
        assert!(error.contains("mediator.auso_window_ms") && error.contains("--lease-ms"), "{error}");
        assert!(new_lab_sizes(&UpOptions { no_mediator: true, ..small.clone() }, dir.path()).is_ok());
        let scaled =
            UpOptions { heartbeat_ms: Some(200), lease_ms: Some(2000), auso_window_ms: Some(5000), ..small };
        assert!(new_lab_sizes(&scaled, dir.path()).is_ok());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let options = UpOptions { dir: dir.path().join("lab"), no_mediator: true, ..scaled };
        let error = runtime.block_on(up(&options)).unwrap_err();
        assert!(matches!(error, LabError::Invalid(_)), "{error}");
        assert!(!dir.path().join("lab").exists());
    }

    /// A damaged or foreign `lab.json` is an error naming the file, never a panic or a lab
    /// with one controller.
    #[test]
    fn a_bad_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = state();
        good.save(dir.path()).unwrap();
        assert_eq!(LabState::load(dir.path()).unwrap(), good);
        let mut bad = Vec::new();
        let mut one = good.clone();
        one.controllers.pop();
        bad.push(serde_json::to_string(&one).unwrap());
        let mut swapped = good.clone();
        swapped.controllers.reverse();
        bad.push(serde_json::to_string(&swapped).unwrap());
        let mut id = good.clone();
        id.cluster_id = "xyz".into();
        bad.push(serde_json::to_string(&id).unwrap());
        let mut format = good.clone();
        format.format = 99;
        bad.push(serde_json::to_string(&format).unwrap());
        bad.extend(["".to_string(), "{".into(), "[]".into(), "\u{0}".into(), "{\"format\":1}".into()]);
        for text in bad {
            std::fs::write(dir.path().join(LAB_FILE), &text).unwrap();
            let error = LabState::load(dir.path()).unwrap_err();
            assert!(matches!(error, LabError::Corrupt { .. }), "{text}: {error}");
            assert!(error.to_string().contains(LAB_FILE), "{error}");
        }
    }

    /// The configuration the lab writes is one the daemon accepts, and it carries no timer the
    /// caller did not set.
    #[test]
    fn configs_parse_and_hold_only_given_timers() {
        let options = UpOptions { cp_interval_ms: Some(1000), ..UpOptions::default() };
        let text = config_text(
            &options,
            "00112233445566778899aabbccddeeff",
            Path::new("/lab/A"),
            LabSite::A,
            [1, 2, 3],
            4,
            None,
        )
        .unwrap();
        let config = Config::parse(&text, Path::new("t"), &Overrides::default()).unwrap();
        assert_eq!(config.node_id, 1);
        assert_eq!(config.dr_partner.node_id, 2);
        assert_eq!(config.dr_partner.address, "127.0.0.1:4");
        assert_eq!(config.nbd_listen.port(), 3);
        assert_eq!(config.durability, Durability::Process);
        assert_eq!(config.timers.cp_interval, Duration::from_secs(1));
        assert!(!text.contains("mirror_timeout_ms"), "{text}");
        let text = config_text(
            &UpOptions::default(),
            "00112233445566778899aabbccddeeff",
            Path::new("/lab/B"),
            LabSite::B,
            [1, 2, 3],
            4,
            None,
        )
        .unwrap();
        assert!(!text.contains("[timers]"), "{text}");
    }

    #[test]
    fn sites_parse() {
        assert_eq!("A".parse::<LabSite>().unwrap(), LabSite::A);
        assert_eq!("b".parse::<LabSite>().unwrap(), LabSite::B);
        assert!("C".parse::<LabSite>().unwrap_err().contains("unknown site"));
    }
}
