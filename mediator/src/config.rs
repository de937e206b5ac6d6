//! The mediator's configuration (DESIGN §10, §12): one TOML file, unknown keys rejected, every
//! error naming its key; timer defaults are `decide::Timers::DEFAULT` (DESIGN §10.1).
//!
//! ```toml
//! cluster_id = "00112233445566778899aabbccddeeff"
//! state_dir = "/var/lib/mc-mediator"
//! observer = false            # rule 6; default false
//!
//! [listen]
//! grpc = "127.0.0.1:7300"
//! metrics = "127.0.0.1:7301"
//!
//! [timers]                    # every key optional, in milliseconds
//! keepalive_timeout_ms = 3000
//! heartbeat_ms = 1000
//! lease_ms = 10000
//! margin_ms = 1000
//! mirror_timeout_ms = 30000
//! auso_window_ms = 30000
//!
//! [[controllers]]
//! node = 1
//! site = "A"
//! [[controllers]]
//! node = 2
//! site = "B"
//! ```
//!
//! Invariants: a `Config` only exists validated: the timers satisfy S11
//! (`decide::Timers::validate`), and `decide::Mediator::new` accepts its controllers (both
//! sites present); node ids are non-zero (0 is the mediator in `Identity.receiver_node`) and
//! unique.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::decide::{self, Controller, NodeId, Site, Timers};

/// Default timers (DESIGN §10.1).
pub const DEFAULT_TIMERS: Timers = Timers::DEFAULT;
/// No timer may be longer than a day: a larger value is a typo (seconds for milliseconds).
pub const MAX_TIMER_MS: u64 = 24 * 3600 * 1000;
/// More controllers than any configuration has (DESIGN §2: two or four).
pub const MAX_CONTROLLERS: usize = 64;

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
        /// The key, dotted (`timers.lease_ms`, `controllers[1].site`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The cluster's id: 32 hex digits.
    pub cluster_id: String,
    /// The directory of `mediator.state` (created if absent).
    pub state_dir: PathBuf,
    /// Observer mode (rule 6).
    #[serde(default)]
    pub observer: bool,
    /// Where to listen.
    pub listen: ListenFile,
    /// Timers (DESIGN §10.1).
    #[serde(default)]
    pub timers: TimersFile,
    /// Every controller of the cluster.
    pub controllers: Vec<ControllerFile>,
}

/// `[listen]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// The gRPC `Mediator` service (port 0: any free port, printed at start).
    pub grpc: String,
    /// Prometheus `/metrics` over HTTP.
    pub metrics: String,
}

/// `[timers]` as written, in milliseconds.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimersFile {
    /// Stream keepalive timeout between the sites.
    #[serde(default = "d_keepalive_timeout")]
    pub keepalive_timeout_ms: u64,
    /// The controllers' heartbeat interval (also the mediator's tick).
    #[serde(default = "d_heartbeat")]
    pub heartbeat_ms: u64,
    /// The lease (S6).
    #[serde(default = "d_lease")]
    pub lease_ms: u64,
    /// Clock and delivery slack.
    #[serde(default = "d_margin")]
    pub margin_ms: u64,
    /// SyncMirror's timeout.
    #[serde(default = "d_mirror_timeout")]
    pub mirror_timeout_ms: u64,
    /// The AUSO window.
    #[serde(default = "d_auso_window")]
    pub auso_window_ms: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
fn d_keepalive_timeout() -> u64 {
    ms(DEFAULT_TIMERS.keepalive_timeout)
}
fn d_heartbeat() -> u64 {
    ms(DEFAULT_TIMERS.heartbeat)
}
fn d_lease() -> u64 {
    ms(DEFAULT_TIMERS.lease)
}
fn d_margin() -> u64 {
    ms(DEFAULT_TIMERS.margin)
}
fn d_mirror_timeout() -> u64 {
    ms(DEFAULT_TIMERS.mirror_timeout)
}
fn d_auso_window() -> u64 {
    ms(DEFAULT_TIMERS.auso_window)
}

impl Default for TimersFile {
    fn default() -> TimersFile {
        TimersFile {
            keepalive_timeout_ms: d_keepalive_timeout(),
            heartbeat_ms: d_heartbeat(),
            lease_ms: d_lease(),
            margin_ms: d_margin(),
            mirror_timeout_ms: d_mirror_timeout(),
            auso_window_ms: d_auso_window(),
        }
    }
}

/// `[[controllers]]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerFile {
    /// Its node id (non-zero).
    pub node: u32,
    /// `A` or `B`.
    pub site: String,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The cluster's id.
    pub cluster_id: [u8; 16],
    /// The state directory.
    pub state_dir: PathBuf,
    /// gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// `/metrics` listen address.
    pub metrics_listen: SocketAddr,
    /// What the decision core needs: controllers, timers, observer mode.
    pub decide: decide::Config,
}

/// Parses 32 hex digits.
pub fn parse_hex_id(text: &str) -> Option<[u8; 16]> {
    let text = text.trim();
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|e| invalid(key, format!("{text:?} is not an ip:port address ({e})")))
}

fn timers(t: &TimersFile) -> Result<Timers, ConfigError> {
    let fields = [
        ("timers.keepalive_timeout_ms", t.keepalive_timeout_ms),
        ("timers.heartbeat_ms", t.heartbeat_ms),
        ("timers.lease_ms", t.lease_ms),
        ("timers.margin_ms", t.margin_ms),
        ("timers.mirror_timeout_ms", t.mirror_timeout_ms),
        ("timers.auso_window_ms", t.auso_window_ms),
    ];
    for (key, value) in fields {
        if value > MAX_TIMER_MS {
            return Err(invalid(key, format!("{value} ms is more than a day ({MAX_TIMER_MS} ms)")));
        }
    }
    let timers = Timers {
        keepalive_timeout: Duration::from_millis(t.keepalive_timeout_ms),
        heartbeat: Duration::from_millis(t.heartbeat_ms),
        lease: Duration::from_millis(t.lease_ms),
        margin: Duration::from_millis(t.margin_ms),
        mirror_timeout: Duration::from_millis(t.mirror_timeout_ms),
        auso_window: Duration::from_millis(t.auso_window_ms),
    };
    // `validate` names the timers in its message (all violations, joined); the key is the
    // table, since one rule involves several keys.
    timers.validate().map_err(|why| invalid("timers", format!("{why} (DESIGN §10.1, S11)")))?;
    Ok(timers)
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML `text` (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        Config::validate(file)
    }

    /// Checks every value, the timer rules (S11) and that the decision core accepts it.
    pub fn validate(file: FileConfig) -> Result<Config, ConfigError> {
        let cluster_id = parse_hex_id(&file.cluster_id)
            .ok_or_else(|| invalid("cluster_id", format!("{:?} is not 32 hex digits", file.cluster_id)))?;
        if file.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "empty path"));
        }
        let grpc_listen = parse_addr("listen.grpc", &file.listen.grpc)?;
        let metrics_listen = parse_addr("listen.metrics", &file.listen.metrics)?;
        if grpc_listen == metrics_listen && grpc_listen.port() != 0 {
            return Err(invalid("listen.metrics", "the same address as listen.grpc"));
        }
        let timers = timers(&file.timers)?;
        if file.controllers.len() > MAX_CONTROLLERS {
            return Err(invalid(
                "controllers",
                format!("{} controllers, more than {MAX_CONTROLLERS}", file.controllers.len()),
            ));
        }
        let mut controllers = Vec::with_capacity(file.controllers.len());
        let mut seen = BTreeSet::new();
        for (i, c) in file.controllers.iter().enumerate() {
            if c.node == 0 {
                return Err(invalid(
                    format!("controllers[{i}].node"),
                    "0 is not a node id (it is the mediator's)",
                ));
            }
            if !seen.insert(c.node) {
                return Err(invalid(
                    format!("controllers[{i}].node"),
                    format!("node {} is listed twice", c.node),
                ));
            }
            let site = match c.site.as_str() {
                "A" | "a" => Site(0),
                "B" | "b" => Site(1),
                other => {
                    return Err(invalid(
                        format!("controllers[{i}].site"),
                        format!("{other:?} is neither A nor B"),
                    ));
                }
            };
            controllers.push(Controller { node: NodeId(c.node), site });
        }
        let decide = decide::Config { controllers, timers, observer: file.observer };
        // The decision core's own checks (both sites configured); timers passed above.
        decide::Mediator::new(decide.clone(), None).map_err(|why| invalid("controllers", why))?;
        Ok(Config { cluster_id, state_dir: file.state_dir, grpc_listen, metrics_listen, decide })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const GOOD: &str = r#"
cluster_id = "00112233445566778899aabbccddeeff"
state_dir = "/tmp/mediator"

[listen]
grpc = "127.0.0.1:0"
metrics = "127.0.0.1:0"

[timers]
keepalive_timeout_ms = 600
heartbeat_ms = 200
lease_ms = 2000
margin_ms = 500
mirror_timeout_ms = 5000
auso_window_ms = 5000

[[controllers]]
node = 1
site = "A"

[[controllers]]
node = 2
site = "B"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn a_good_file_parses() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.cluster_id[0], 0x00);
        assert_eq!(config.cluster_id[15], 0xff);
        assert_eq!(config.decide.timers, Timers::SCALED);
        assert!(!config.decide.observer);
        assert_eq!(
            config.decide.controllers,
            vec![
                Controller { node: NodeId(1), site: Site(0) },
                Controller { node: NodeId(2), site: Site(1) }
            ]
        );
        let observer = parse(&GOOD.replace("state_dir", "observer = true\nstate_dir")).unwrap();
        assert!(observer.decide.observer);
    }

    /// Prevents defaults that drift from DESIGN §10.1.
    #[test]
    fn timer_defaults_are_the_design_values() {
        let (head, tail) = GOOD.split_once("[timers]").unwrap();
        let controllers = &tail[tail.find("[[controllers]]").unwrap()..];
        let config = parse(&format!("{head}{controllers}")).unwrap();
        assert_eq!(config.decide.timers, Timers::DEFAULT);
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        for (from, to, name) in [
            ("lease_ms = 2000", "lease_ms = 2000\nlease_s = 2", "lease_s"),
            ("state_dir", "stat_dir = \"x\"\nstate_dir", "stat_dir"),
            ("site = \"A\"", "site = \"A\"\nweight = 1", "weight"),
        ] {
            let error = parse(&GOOD.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(error.contains(name), "{error}");
        }
    }

    /// Prevents a configuration that breaks S11 or names a controller twice from starting.
    #[test]
    fn bad_values_are_refused_by_key() {
        let cases = [
            ("cluster_id = \"00112233445566778899aabbccddeeff\"", "cluster_id = \"0011\"", "cluster_id"),
            (
                "cluster_id = \"00112233445566778899aabbccddeeff\"",
                "cluster_id = \"zz112233445566778899aabbccddeeff\"",
                "cluster_id",
            ),
            ("state_dir = \"/tmp/mediator\"", "state_dir = \"\"", "state_dir"),
            ("grpc = \"127.0.0.1:0\"", "grpc = \"localhost\"", "listen.grpc"),
            ("metrics = \"127.0.0.1:0\"", "metrics = \"127.0.0.1\"", "listen.metrics"),
            ("node = 1", "node = 0", "controllers[0].node"),
            ("node = 2", "node = 1", "controllers[1].node"),
            ("site = \"B\"", "site = \"C\"", "controllers[1].site"),
            ("site = \"B\"", "site = \"A\"", "controllers"),
            ("margin_ms = 500", "margin_ms = 0", "timers"),
            ("heartbeat_ms = 200", "heartbeat_ms = 700", "timers"),
            ("auso_window_ms = 5000", "auso_window_ms = 2400", "timers"),
            ("auso_window_ms = 5000", "auso_window_ms = 6000", "timers"),
            ("lease_ms = 2000", "lease_ms = 500", "timers"),
            ("lease_ms = 2000", "lease_ms = 99999999999", "timers.lease_ms"),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "{from}");
            let message = parse(&GOOD.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(message.starts_with(&format!("{key}:")), "{to}: {message}");
        }
        // The timer message names the rule that failed.
        let message = parse(&GOOD.replacen("heartbeat_ms = 200", "heartbeat_ms = 700", 1)).unwrap_err();
        assert!(message.to_string().contains("heartbeat"), "{message}");
        let same = GOOD.replacen("127.0.0.1:0", "127.0.0.1:7300", 2);
        assert!(parse(&same).unwrap_err().to_string().starts_with("listen.metrics:"));
    }

    #[test]
    fn garbage_and_missing_keys_are_errors() {
        for text in ["", "cluster_id = ", "\u{0}\u{1}", "[[[", "cluster_id = 5", "[listen]\ngrpc = 1"] {
            assert!(matches!(parse(text), Err(ConfigError::Parse { .. })), "{text:?}");
        }
        let no_controllers = GOOD.split("[[controllers]]").next().unwrap();
        let error = parse(no_controllers).unwrap_err().to_string();
        assert!(error.contains("controllers"), "{error}");
        let empty = format!("controllers = []\n{no_controllers}");
        let error = parse(&empty).unwrap_err().to_string();
        assert!(error.starts_with("controllers:"), "{error}");
    }
}
