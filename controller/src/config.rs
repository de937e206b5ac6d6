//! The controller's configuration (DESIGN §12): one TOML file, unknown keys rejected, every
//! error naming its key; flags override the file; defaults are named constants. `Config` is
//! the validated form, with the timer rules of DESIGN §10.1 that apply without a mediator
//! (S11).
//!
//! Invariants: a `Config` only exists validated; node ids are non-zero and the DR partner is
//! another node; `margin > 0`, `mirror_timeout ≥ 1 s`, keepalive interval < keepalive timeout,
//! and keepalive timeout + margin < mirror_timeout − margin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// SyncMirror's mirror timeout (DESIGN §4.1).
pub const DEFAULT_MIRROR_TIMEOUT_MS: u64 = 30_000;
/// Consistency point interval (DESIGN §4).
pub const DEFAULT_CP_INTERVAL_MS: u64 = 10_000;
/// Stream keepalive interval (DESIGN §10.1).
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 1_000;
/// Stream keepalive timeout (DESIGN §10.1).
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 3_000;
/// Clock and delivery slack (DESIGN §10.1).
pub const DEFAULT_MARGIN_MS: u64 = 1_000;
/// NVLog file size.
pub const DEFAULT_NVLOG_SIZE_MIB: u64 = 256;
/// The smallest NVLog that holds two partitions of two halves with room for 1 MiB records.
pub const MIN_NVLOG_SIZE_MIB: u64 = 16;
/// The largest NVLog accepted (the file is memory-mapped).
pub const MAX_NVLOG_SIZE_MIB: u64 = 64 << 10;
/// Where hosts reach the NBD export unless `listen.nbd` says otherwise: the port IANA assigned
/// to NBD, on the loopback interface only (DESIGN §13: no TLS yet).
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

/// Why a configuration is refused; every message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, missing key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and its line.
        message: String,
    },
    /// A value is out of range or contradicts another.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, dotted (`timers.mirror_timeout_ms`).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The cluster's id: 32 hex digits.
    pub cluster_id: String,
    /// This controller's node id (non-zero).
    pub node_id: u32,
    /// `A` or `B`.
    pub site: String,
    /// The directory holding this site's shelf of disks (files).
    pub shelf_dir: PathBuf,
    /// The DR partner at the other site.
    pub dr_partner: PartnerFile,
    /// The NVLog.
    pub nvlog: NvlogFile,
    /// Where to listen.
    pub listen: ListenFile,
    /// Timers (DESIGN §10.1).
    #[serde(default)]
    pub timers: TimersFile,
    /// Plex resync (DESIGN §6.4).
    #[serde(default)]
    pub resync: ResyncFile,
    /// The mediator on the third site (DESIGN §10); absent: no mediator (no automatic
    /// switchover, S2's fallbacks).
    #[serde(default)]
    pub mediator: Option<MediatorFile>,
}

/// Heartbeat interval to the mediator (DESIGN §10.1).
pub const DEFAULT_HEARTBEAT_MS: u64 = 1_000;
/// The self-fence lease (DESIGN §10.1, S6).
pub const DEFAULT_LEASE_MS: u64 = 10_000;
/// The AUSO window (DESIGN §10.1).
pub const DEFAULT_AUSO_WINDOW_MS: u64 = 30_000;

/// `[mediator]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediatorFile {
    /// The mediator's gRPC address (`host:port`).
    pub address: String,
    /// Heartbeat interval.
    #[serde(default = "d_heartbeat")]
    pub heartbeat_ms: u64,
    /// The self-fence lease (S6).
    #[serde(default = "d_lease")]
    pub lease_ms: u64,
    /// The AUSO window.
    #[serde(default = "d_auso_window")]
    pub auso_window_ms: u64,
}

fn d_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_MS
}
fn d_lease() -> u64 {
    DEFAULT_LEASE_MS
}
fn d_auso_window() -> u64 {
    DEFAULT_AUSO_WINDOW_MS
}

/// The mediator, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediatorConfig {
    /// Its gRPC address.
    pub address: String,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// The self-fence lease (S6).
    pub lease: Duration,
    /// The AUSO window.
    pub auso_window: Duration,
}

/// `[resync]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncFile {
    /// The most bytes per second a resync copies; 0 (the default) copies as fast as the disks
    /// and the link go.
    #[serde(default)]
    pub max_bytes_per_second: u64,
}

/// A partner as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerFile {
    /// Its node id.
    pub node_id: u32,
    /// Its gRPC address.
    pub address: String,
}

/// The NVLog as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvlogFile {
    /// The file (created and formatted if absent).
    pub path: PathBuf,
    /// Its size in MiB.
    #[serde(default = "default_nvlog_size_mib")]
    pub size_mib: u64,
    /// `process` or `power` (DESIGN §5).
    #[serde(default = "default_durability")]
    pub durability: String,
}

fn default_nvlog_size_mib() -> u64 {
    DEFAULT_NVLOG_SIZE_MIB
}

fn default_durability() -> String {
    "power".to_string()
}

/// Listen addresses as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// gRPC services (port 0: any free port, printed at start).
    pub grpc: String,
    /// Prometheus `/metrics` over HTTP.
    pub metrics: String,
    /// The NBD export of this node's volumes (DESIGN §9).
    #[serde(default = "default_nbd_listen")]
    pub nbd: String,
}

fn default_nbd_listen() -> String {
    DEFAULT_NBD_LISTEN.to_string()
}

/// Timers as written, in milliseconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimersFile {
    /// DESIGN §4.1.
    #[serde(default = "d_mirror")]
    pub mirror_timeout_ms: u64,
    /// DESIGN §4.
    #[serde(default = "d_cp")]
    pub cp_interval_ms: u64,
    /// DESIGN §10.1.
    #[serde(default = "d_ka_interval")]
    pub keepalive_interval_ms: u64,
    /// DESIGN §10.1.
    #[serde(default = "d_ka_timeout")]
    pub keepalive_timeout_ms: u64,
    /// DESIGN §10.1.
    #[serde(default = "d_margin")]
    pub margin_ms: u64,
}

fn d_mirror() -> u64 {
    DEFAULT_MIRROR_TIMEOUT_MS
}
fn d_cp() -> u64 {
    DEFAULT_CP_INTERVAL_MS
}
fn d_ka_interval() -> u64 {
    DEFAULT_KEEPALIVE_INTERVAL_MS
}
fn d_ka_timeout() -> u64 {
    DEFAULT_KEEPALIVE_TIMEOUT_MS
}
fn d_margin() -> u64 {
    DEFAULT_MARGIN_MS
}

impl Default for TimersFile {
    fn default() -> TimersFile {
        TimersFile {
            mirror_timeout_ms: d_mirror(),
            cp_interval_ms: d_cp(),
            keepalive_interval_ms: d_ka_interval(),
            keepalive_timeout_ms: d_ka_timeout(),
            margin_ms: d_margin(),
        }
    }
}

/// Values given on the command line, which override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `listen.grpc`.
    pub grpc_listen: Option<String>,
    /// `listen.metrics`.
    pub metrics_listen: Option<String>,
    /// `listen.nbd`.
    pub nbd_listen: Option<String>,
    /// `nvlog.path`.
    pub nvlog_path: Option<PathBuf>,
    /// `dr_partner.address`.
    pub dr_partner_address: Option<String>,
    /// `timers.mirror_timeout_ms`.
    pub mirror_timeout_ms: Option<u64>,
}

/// Which site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Site A.
    A,
    /// Site B.
    B,
}

/// NVLog durability (DESIGN §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Durable once in the mapping: survives a process crash.
    Process,
    /// Durable once msynced: survives a power loss.
    Power,
}

/// The validated timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// DESIGN §4.1.
    pub mirror_timeout: Duration,
    /// DESIGN §4.
    pub cp_interval: Duration,
    /// DESIGN §10.1.
    pub keepalive_interval: Duration,
    /// DESIGN §10.1.
    pub keepalive_timeout: Duration,
    /// DESIGN §10.1.
    pub margin: Duration,
}

/// A partner, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partner {
    /// Its node id.
    pub node_id: u32,
    /// Its gRPC address (`host:port`).
    pub address: String,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The cluster's id.
    pub cluster_id: [u8; 16],
    /// This node.
    pub node_id: u32,
    /// This node's site.
    pub site: Site,
    /// The shelf directory.
    pub shelf_dir: PathBuf,
    /// The DR partner.
    pub dr_partner: Partner,
    /// The NVLog file.
    pub nvlog_path: PathBuf,
    /// Its size in bytes.
    pub nvlog_size_bytes: u64,
    /// When an append is durable.
    pub durability: Durability,
    /// gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// `/metrics` listen address.
    pub metrics_listen: SocketAddr,
    /// NBD listen address.
    pub nbd_listen: SocketAddr,
    /// Timers.
    pub timers: Timers,
    /// The resync bandwidth limit in bytes per second (`None`: unlimited).
    pub resync_bytes_per_second: Option<u64>,
    /// The mediator, if one is configured.
    pub mediator: Option<MediatorConfig>,
}

fn parse_hex_id(key: &'static str, text: &str) -> Result<[u8; 16], ConfigError> {
    let text = text.trim();
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(key, format!("{text:?} is not 32 hex digits")));
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| invalid(key, format!("{text:?} is not 32 hex digits")))?;
    }
    Ok(id)
}

fn parse_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|e| invalid(key, format!("{text:?} is not an ip:port address ({e})")))
}

impl Config {
    /// Reads, parses and validates `path`, with `overrides` applied before validation.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, path, overrides)
    }

    /// Parses and validates TOML `text` (`path` is for messages).
    pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut file: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        if let Some(grpc) = &overrides.grpc_listen {
            file.listen.grpc = grpc.clone();
        }
        if let Some(metrics) = &overrides.metrics_listen {
            file.listen.metrics = metrics.clone();
        }
        if let Some(nbd) = &overrides.nbd_listen {
            file.listen.nbd = nbd.clone();
        }
        if let Some(nvlog) = &overrides.nvlog_path {
            file.nvlog.path = nvlog.clone();
        }
        if let Some(address) = &overrides.dr_partner_address {
            file.dr_partner.address = address.clone();
        }
        if let Some(timeout) = overrides.mirror_timeout_ms {
            file.timers.mirror_timeout_ms = timeout;
        }
        Config::validate(file)
    }

    /// Checks every value and the timer rules.
    pub fn validate(file: FileConfig) -> Result<Config, ConfigError> {
        let cluster_id = parse_hex_id("cluster_id", &file.cluster_id)?;
        if file.node_id == 0 {
            return Err(invalid("node_id", "0 is not a node id"));
        }
        let site = match file.site.as_str() {
            "A" | "a" => Site::A,
            "B" | "b" => Site::B,
            other => return Err(invalid("site", format!("{other:?} is neither A nor B"))),
        };
        if file.dr_partner.node_id == 0 {
            return Err(invalid("dr_partner.node_id", "0 is not a node id"));
        }
        if file.dr_partner.node_id == file.node_id {
            return Err(invalid("dr_partner.node_id", "the DR partner must be another node than node_id"));
        }
        if file.dr_partner.address.trim().is_empty() || !file.dr_partner.address.contains(':') {
            return Err(invalid(
                "dr_partner.address",
                format!("{:?} is not a host:port address", file.dr_partner.address),
            ));
        }
        if file.shelf_dir.as_os_str().is_empty() {
            return Err(invalid("shelf_dir", "empty path"));
        }
        if file.nvlog.path.as_os_str().is_empty() {
            return Err(invalid("nvlog.path", "empty path"));
        }
        if !(MIN_NVLOG_SIZE_MIB..=MAX_NVLOG_SIZE_MIB).contains(&file.nvlog.size_mib) {
            return Err(invalid(
                "nvlog.size_mib",
                format!("{} is outside {MIN_NVLOG_SIZE_MIB}..={MAX_NVLOG_SIZE_MIB}", file.nvlog.size_mib),
            ));
        }
        let durability = match file.nvlog.durability.as_str() {
            "process" => Durability::Process,
            "power" => Durability::Power,
            other => {
                return Err(invalid(
                    "nvlog.durability",
                    format!("{other:?} is neither \"process\" nor \"power\""),
                ));
            }
        };
        let grpc_listen = parse_addr("listen.grpc", &file.listen.grpc)?;
        let metrics_listen = parse_addr("listen.metrics", &file.listen.metrics)?;
        if grpc_listen == metrics_listen && grpc_listen.port() != 0 {
            return Err(invalid("listen.metrics", "the same address as listen.grpc"));
        }
        let nbd_listen = parse_addr("listen.nbd", &file.listen.nbd)?;
        if nbd_listen.port() != 0 && (nbd_listen == grpc_listen || nbd_listen == metrics_listen) {
            return Err(invalid("listen.nbd", "the same address as listen.grpc or listen.metrics"));
        }
        let timers = validate_timers(&file.timers)?;
        let mediator = file.mediator.as_ref().map(|m| validate_mediator(m, &file.timers)).transpose()?;
        Ok(Config {
            cluster_id,
            node_id: file.node_id,
            site,
            shelf_dir: file.shelf_dir,
            dr_partner: Partner { node_id: file.dr_partner.node_id, address: file.dr_partner.address },
            nvlog_path: file.nvlog.path,
            nvlog_size_bytes: file.nvlog.size_mib << 20,
            durability,
            grpc_listen,
            metrics_listen,
            nbd_listen,
            timers,
            resync_bytes_per_second: match file.resync.max_bytes_per_second {
                0 => None,
                n if n < 64 * 1024 => {
                    return Err(invalid(
                        "resync.max_bytes_per_second",
                        format!("{n} is below 64 KiB/s (one region)"),
                    ));
                }
                n => Some(n),
            },
            mediator,
        })
    }
}

/// The rules of DESIGN §10.1 that involve the mediator (S11).
fn validate_mediator(m: &MediatorFile, t: &TimersFile) -> Result<MediatorConfig, ConfigError> {
    if m.address.trim().is_empty() || !m.address.contains(':') {
        return Err(invalid("mediator.address", format!("{:?} is not a host:port address", m.address)));
    }
    if m.heartbeat_ms == 0 || m.heartbeat_ms.saturating_mul(3) > m.lease_ms {
        return Err(invalid(
            "mediator.heartbeat_ms",
            format!(
                "{} must be above 0 and at most lease_ms / 3 ({}) (DESIGN §10.1)",
                m.heartbeat_ms,
                m.lease_ms / 3
            ),
        ));
    }
    if t.keepalive_timeout_ms >= m.lease_ms {
        return Err(invalid(
            "mediator.lease_ms",
            format!(
                "{} must be above timers.keepalive_timeout_ms ({}) (DESIGN §10.1)",
                m.lease_ms, t.keepalive_timeout_ms
            ),
        ));
    }
    if m.lease_ms.saturating_add(t.margin_ms) >= m.auso_window_ms {
        return Err(invalid(
            "mediator.auso_window_ms",
            format!(
                "{} must be above lease_ms + margin_ms ({}) (DESIGN §10.1)",
                m.auso_window_ms,
                m.lease_ms.saturating_add(t.margin_ms)
            ),
        ));
    }
    if m.auso_window_ms > t.mirror_timeout_ms {
        return Err(invalid(
            "mediator.auso_window_ms",
            format!(
                "{} must be at most timers.mirror_timeout_ms ({}) (DESIGN §10.1)",
                m.auso_window_ms, t.mirror_timeout_ms
            ),
        ));
    }
    Ok(MediatorConfig {
        address: m.address.clone(),
        heartbeat: Duration::from_millis(m.heartbeat_ms),
        lease: Duration::from_millis(m.lease_ms),
        auso_window: Duration::from_millis(m.auso_window_ms),
    })
}

/// The rules of DESIGN §10.1 that hold without a mediator (S11).
fn validate_timers(t: &TimersFile) -> Result<Timers, ConfigError> {
    if t.margin_ms == 0 {
        return Err(invalid("timers.margin_ms", "must be > 0 (DESIGN §10.1)"));
    }
    if t.mirror_timeout_ms < 1_000 {
        return Err(invalid(
            "timers.mirror_timeout_ms",
            format!("{} ms is below 1 s (DESIGN §10.1)", t.mirror_timeout_ms),
        ));
    }
    if t.cp_interval_ms == 0 {
        return Err(invalid("timers.cp_interval_ms", "must be > 0"));
    }
    if t.keepalive_interval_ms == 0 {
        return Err(invalid("timers.keepalive_interval_ms", "must be > 0"));
    }
    if t.keepalive_interval_ms >= t.keepalive_timeout_ms {
        return Err(invalid(
            "timers.keepalive_timeout_ms",
            format!(
                "{} ms must be above keepalive_interval_ms ({} ms)",
                t.keepalive_timeout_ms, t.keepalive_interval_ms
            ),
        ));
    }
    // keepalive timeout + margin < mirror_timeout − margin
    let left = t.keepalive_timeout_ms.saturating_add(t.margin_ms);
    let right = t.mirror_timeout_ms.saturating_sub(t.margin_ms);
    if left >= right {
        return Err(invalid(
            "timers.keepalive_timeout_ms",
            format!(
                "keepalive_timeout_ms + margin_ms ({left} ms) must be below mirror_timeout_ms - margin_ms \
                 ({right} ms) (DESIGN §10.1)"
            ),
        ));
    }
    Ok(Timers {
        mirror_timeout: Duration::from_millis(t.mirror_timeout_ms),
        cp_interval: Duration::from_millis(t.cp_interval_ms),
        keepalive_interval: Duration::from_millis(t.keepalive_interval_ms),
        keepalive_timeout: Duration::from_millis(t.keepalive_timeout_ms),
        margin: Duration::from_millis(t.margin_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster_id = "00112233445566778899aabbccddeeff"
node_id = 1
site = "A"
shelf_dir = "/tmp/shelf"

[dr_partner]
node_id = 2
address = "127.0.0.1:7102"

[nvlog]
path = "/tmp/nvlog"
size_mib = 64
durability = "process"

[listen]
grpc = "127.0.0.1:0"
metrics = "127.0.0.1:0"
nbd = "127.0.0.1:0"

[timers]
mirror_timeout_ms = 5000
cp_interval_ms = 1000
keepalive_interval_ms = 200
keepalive_timeout_ms = 600
margin_ms = 500
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), &Overrides::default())
    }

    #[test]
    fn a_good_file_parses_and_flags_override_it() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.node_id, 1);
        assert_eq!(config.site, Site::A);
        assert_eq!(config.durability, Durability::Process);
        assert_eq!(config.nvlog_size_bytes, 64 << 20);
        assert_eq!(config.timers.mirror_timeout, Duration::from_secs(5));
        assert_eq!(config.cluster_id[15], 0xff);
        let overrides = Overrides {
            grpc_listen: Some("127.0.0.1:7000".into()),
            mirror_timeout_ms: Some(9000),
            ..Overrides::default()
        };
        let config = Config::parse(GOOD, Path::new("t"), &overrides).unwrap();
        assert_eq!(config.grpc_listen.port(), 7000);
        assert_eq!(config.timers.mirror_timeout, Duration::from_secs(9));
    }

    #[test]
    fn defaults_are_the_design_values() {
        let text = GOOD.split("[timers]").next().unwrap();
        let config = parse(text).unwrap();
        assert_eq!(config.timers.mirror_timeout, Duration::from_millis(DEFAULT_MIRROR_TIMEOUT_MS));
        assert_eq!(config.timers.cp_interval, Duration::from_secs(10));
        assert_eq!(config.timers.keepalive_timeout, Duration::from_secs(3));
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let text = GOOD.replace("size_mib = 64", "size_mib = 64\nsize_gib = 1");
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("size_gib"), "{error}");
        let text = format!("{GOOD}\n[mediator]\naddress = \"x\"\n");
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("mediator"), "{error}");
    }

    #[test]
    fn bad_values_and_impossible_timers_are_refused_by_key() {
        let cases = [
            ("node_id = 1", "node_id = 0", "node_id"),
            ("site = \"A\"", "site = \"C\"", "site"),
            ("node_id = 2", "node_id = 1", "dr_partner.node_id"),
            ("durability = \"process\"", "durability = \"fast\"", "nvlog.durability"),
            ("size_mib = 64", "size_mib = 1", "nvlog.size_mib"),
            ("grpc = \"127.0.0.1:0\"", "grpc = \"localhost\"", "listen.grpc"),
            ("cluster_id = \"00112233445566778899aabbccddeeff\"", "cluster_id = \"xyz\"", "cluster_id"),
            ("margin_ms = 500", "margin_ms = 0", "timers.margin_ms"),
            ("mirror_timeout_ms = 5000", "mirror_timeout_ms = 500", "timers.mirror_timeout_ms"),
            ("keepalive_timeout_ms = 600", "keepalive_timeout_ms = 100", "timers.keepalive_timeout_ms"),
            // 4200 + 500 is not below 5000 - 500.
            ("keepalive_timeout_ms = 600", "keepalive_timeout_ms = 4200", "timers.keepalive_timeout_ms"),
            ("cp_interval_ms = 1000", "cp_interval_ms = 0", "timers.cp_interval_ms"),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "{from}");
            let error = parse(&GOOD.replacen(from, to, 1)).unwrap_err();
            let message = error.to_string();
            assert!(message.starts_with(key), "{to}: {message}");
        }
    }

    /// Prevents a mediator configuration that breaks the timer order of DESIGN §10.1 (S11).
    #[test]
    fn the_mediator_timers_are_validated_by_key() {
        let good = format!(
            "{GOOD}\n[mediator]\naddress = \"127.0.0.1:7200\"\nheartbeat_ms = 200\nlease_ms = 2000\nauso_window_ms = 5000\n"
        );
        let config = parse(&good).unwrap();
        let mediator = config.mediator.unwrap();
        assert_eq!(
            (mediator.heartbeat, mediator.lease),
            (Duration::from_millis(200), Duration::from_secs(2))
        );
        assert!(parse(GOOD).unwrap().mediator.is_none());
        let cases = [
            ("heartbeat_ms = 200", "heartbeat_ms = 700", "mediator.heartbeat_ms"),
            ("lease_ms = 2000", "lease_ms = 500", "mediator.heartbeat_ms"),
            ("lease_ms = 2000", "lease_ms = 4800", "mediator.auso_window_ms"),
            ("auso_window_ms = 5000", "auso_window_ms = 6000", "mediator.auso_window_ms"),
            ("address = \"127.0.0.1:7200\"", "address = \"nowhere\"", "mediator.address"),
        ];
        for (from, to, key) in cases {
            let error = parse(&good.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(error.starts_with(key), "{to}: {error}");
        }
        let short_lease = good.replacen("heartbeat_ms = 200", "heartbeat_ms = 100", 1).replacen(
            "lease_ms = 2000",
            "lease_ms = 600",
            1,
        );
        let error = parse(&short_lease).unwrap_err().to_string();
        assert!(error.starts_with("mediator.lease_ms"), "{error}");
    }

    #[test]
    fn garbage_is_an_error() {
        for text in ["", "node_id = ", "\u{0}\u{1}", "[[[", "node_id = \"one\""] {
            assert!(matches!(parse(text), Err(ConfigError::Parse { .. })), "{text:?}");
        }
    }
}
