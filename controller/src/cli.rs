//! What `mcctl`'s admin commands print (DESIGN §11): tables for people and JSON values for
//! scripts, built from the answers of every node (`Admin.Status`, `Admin.Operations`) and from
//! the replies of `Switchover` and `Unfence`, so the shapes are tested without processes;
//! `mirror status` (one row per mirrored aggregate) and `check run`'s ok/warning report (stored
//! as JSON for `check show`) too. The binary (`src/bin/mcctl.rs`) does the calls and picks the
//! format.
//!
//! Invariants:
//! - every function here is pure: the same answers give the same text, with nodes in the order
//!   they were asked and aggregates, plexes and volumes in the order each node reported them;
//! - a node that did not answer is never dropped silently: `node show` lists it as
//!   `unreachable` with the error, the other commands list it under `unreachable`;
//! - JSON field names are snake_case, sizes are raw byte counts (`size_bytes`) and uuids are
//!   lowercase hex; tables show sizes in binary units (`1.1 GiB`);
//! - times are UTC RFC 3339 text with milliseconds (`2026-11-26T15:00:36.123Z`, "-" for none) in
//!   tables, and both that text and the raw unix milliseconds in JSON.

use mc_proto::v1::{
    AggregateInfo, HealReply, MirrorState, Operation, StatusReply, SwitchbackReply, SwitchoverReply, Veto,
    VolumeInfo,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Exit code: the command did what it was asked.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command failed (an RPC error, a node that did not answer, nothing found).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage (clap's own code).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the operation was vetoed (a switchover refused by its checks).
pub const EXIT_VETOED: u8 = 3;

/// Where a node was asked and what it is known to be before it answers (`--lab` knows the node
/// id and site; `--endpoint` knows only the address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT` of its admin service.
    pub address: String,
    /// Its node id, when known beforehand.
    pub node: Option<u32>,
    /// Its site ("A" or "B"), when known beforehand.
    pub site: Option<String>,
}

/// One node's answer to `Admin.Status`, or why there is none.
#[derive(Clone, Debug)]
pub struct NodeAnswer {
    /// The node asked.
    pub target: Target,
    /// Its status, or the error (connection refused, deadline, a refused cluster id).
    pub result: Result<StatusReply, String>,
}

impl NodeAnswer {
    /// The node id: the one it reported, else the one known beforehand.
    fn node(&self) -> Option<u32> {
        match &self.result {
            Ok(reply) => reply.identity.as_ref().map(|i| i.sender_node).or(self.target.node),
            Err(_) => self.target.node,
        }
    }
}

/// Whether any node did not answer (the command then exits with `EXIT_FAILED`).
pub fn any_unreachable(answers: &[NodeAnswer]) -> bool {
    answers.iter().any(|a| a.result.is_err())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cluster id given as 32 hex digits.
pub fn parse_cluster_id(text: &str) -> Result<[u8; 16], String> {
    let bad = || format!("cluster id {text:?} is not 32 hex digits");
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(id)
}

/// `bytes` in the largest binary unit that keeps a whole part, with one decimal when it is not
/// whole: `512 B`, `64 MiB`, `1.1 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    // Tenths of the unit, rounded to the nearest; u128 so no size overflows.
    let scale = 1u128 << (10 * unit);
    let tenths = (u128::from(bytes) * 10 + scale / 2) / scale;
    if tenths.is_multiple_of(10) {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// A mirror state as a short name (`in_sync`, `out_of_sync`, `resyncing`, `offline`).
pub fn mirror_state_name(state: i32) -> String {
    match MirrorState::try_from(state) {
        Ok(MirrorState::Unspecified) => "unspecified".into(),
        Ok(known) => known.as_str_name().trim_start_matches("MIRROR_STATE_").to_ascii_lowercase(),
        Err(_) => format!("unknown({state})"),
    }
}

/// A table of left-aligned columns separated by two spaces, with a header row.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles and no rows.
    pub fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|h| (*h).to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The aligned text, one line per row, trailing spaces trimmed.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i >= widths.len() {
                    widths.push(0);
                }
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// A node that did not answer, as the non-node commands list it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unreachable {
    /// The address asked.
    pub endpoint: String,
    /// Its node id, when known.
    pub node: Option<u32>,
    /// Why there is no answer.
    pub error: String,
}

/// The nodes that did not answer.
pub fn unreachable(answers: &[NodeAnswer]) -> Vec<Unreachable> {
    answers
        .iter()
        .filter_map(|a| match &a.result {
            Ok(_) => None,
            Err(error) => {
                Some(Unreachable { endpoint: a.target.address.clone(), node: a.node(), error: error.clone() })
            }
        })
        .collect()
}

/// The lines a table is followed by when nodes did not answer (empty when all did).
fn unreachable_text(answers: &[NodeAnswer]) -> String {
    let mut out = String::new();
    for u in unreachable(answers) {
        let node = u.node.map_or_else(String::new, |n| format!("node {n} "));
        out.push_str(&format!("unreachable: {node}at {}: {}\n", u.endpoint, u.error));
    }
    out
}

/// An option as ONTAP prints it.
fn on_off(value: bool) -> &'static str {
    if value { "on" } else { "off" }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() { "-".into() } else { text.to_string() }
}

fn opt_text<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// One row of `node show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    /// The address asked.
    pub endpoint: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Its node id, when known.
    pub node: Option<u32>,
    /// Its site, when known.
    pub site: Option<String>,
    /// `node_state` ("serving", "fenced", …), or "unreachable".
    pub state: String,
    /// Why it is in that state (for an unreachable node: the error).
    pub reason: String,
    /// The NVLog's log generation.
    pub log_generation: Option<u64>,
    /// Its writer's account of the NVLog mirror to the DR partner.
    pub dr_mirror: Option<MirrorRow>,
    /// Its consistency points.
    pub cp: Option<CpRow>,
}

/// The DR mirror as `node show` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MirrorRow {
    /// The DR partner's node id.
    pub partner_node: u32,
    /// `in_sync`, `out_of_sync`, `resyncing` or `offline`.
    pub state: String,
    /// Whether the mirror connection is up.
    pub connected: bool,
    /// Every record up to this lsn is persisted at the partner.
    pub acked_lsn: u64,
    /// While resyncing: in sync once a CP covers every lsn below this.
    pub resync_from_lsn: u64,
}

/// The consistency points as `node show` reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpRow {
    /// CPs completed since the node started.
    pub completed: u64,
    /// The last CP's id.
    pub last_id: u64,
    /// The last lsn the last CP covers.
    pub last_lsn: u64,
}

/// The rows of `node show`, one per node asked.
pub fn node_rows(answers: &[NodeAnswer]) -> Vec<NodeRow> {
    answers
        .iter()
        .map(|a| match &a.result {
            Ok(reply) => NodeRow {
                endpoint: a.target.address.clone(),
                reachable: true,
                node: a.node(),
                site: Some(reply.site.clone()),
                state: reply.node_state.clone(),
                reason: reply.state_reason.clone(),
                log_generation: Some(reply.log_generation),
                dr_mirror: reply.dr_mirror.as_ref().map(|m| MirrorRow {
                    partner_node: m.partner_node,
                    state: mirror_state_name(m.state),
                    connected: m.connected,
                    acked_lsn: m.acked_lsn,
                    resync_from_lsn: m.resync_from_lsn,
                }),
                cp: reply.cp.as_ref().map(|cp| CpRow {
                    completed: cp.completed,
                    last_id: cp.last_id,
                    last_lsn: cp.last_lsn,
                }),
            },
            Err(error) => NodeRow {
                endpoint: a.target.address.clone(),
                reachable: false,
                node: a.node(),
                site: a.target.site.clone(),
                state: "unreachable".into(),
                reason: error.clone(),
                log_generation: None,
                dr_mirror: None,
                cp: None,
            },
        })
        .collect()
}

/// `node show` as a table. The reason comes last: it is the one long, free-text column.
pub fn nodes_table(answers: &[NodeAnswer]) -> String {
    let mut table = Table::new(&[
        "NODE",
        "SITE",
        "STATE",
        "DR PARTNER",
        "MIRROR",
        "CONNECTED",
        "ACKED LSN",
        "CPS",
        "LAST CP LSN",
        "REASON",
    ]);
    for row in node_rows(answers) {
        let mirror = row.dr_mirror.as_ref();
        table.row(vec![
            opt_text(row.node),
            opt_text(row.site.as_deref()),
            row.state.clone(),
            opt_text(mirror.map(|m| m.partner_node)),
            opt_text(mirror.map(|m| m.state.clone())),
            opt_text(mirror.map(|m| if m.connected { "yes" } else { "no" })),
            opt_text(mirror.map(|m| m.acked_lsn)),
            opt_text(row.cp.as_ref().map(|cp| cp.completed)),
            opt_text(row.cp.as_ref().map(|cp| cp.last_lsn)),
            or_dash(&row.reason),
        ]);
    }
    table.render()
}

/// `node show` as one JSON object: `{"nodes": [...]}`.
pub fn nodes_json(answers: &[NodeAnswer]) -> Value {
    json!({ "nodes": node_rows(answers) })
}

/// One row of `aggregate show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AggregateRow {
    /// Its name.
    pub name: String,
    /// Its uuid in hex.
    pub uuid: String,
    /// The node that owns it (the one that reported it).
    pub node: Option<u32>,
    /// That node's site.
    pub site: String,
    /// As ONTAP shows it: "mirrored,normal", "mirror degraded", "resyncing", "unmirrored".
    pub state: String,
    /// Its usable size.
    pub size_bytes: u64,
    /// How many plexes it has.
    pub plex_count: usize,
    /// How many volumes it holds.
    pub volume_count: usize,
    /// The last CP's id.
    pub last_cp_id: u64,
    /// The last lsn that CP covers.
    pub last_cp_lsn: u64,
}

/// Every aggregate the answering nodes report, with the answer it came from, in order.
fn aggregates<'a>(
    answers: &'a [NodeAnswer],
    name: Option<&'a str>,
) -> impl Iterator<Item = (&'a NodeAnswer, &'a StatusReply, &'a AggregateInfo)> + 'a {
    answers.iter().flat_map(move |a| {
        let reply = a.result.as_ref().ok();
        reply.into_iter().flat_map(move |reply| {
            reply
                .aggregates
                .iter()
                .filter(move |aggr| name.is_none_or(|n| aggr.name == n))
                .map(move |aggr| (a, reply, aggr))
        })
    })
}

/// The rows of `aggregate show`, only aggregate `name` when given.
pub fn aggregate_rows(answers: &[NodeAnswer], name: Option<&str>) -> Vec<AggregateRow> {
    aggregates(answers, name)
        .map(|(a, reply, aggr)| AggregateRow {
            name: aggr.name.clone(),
            uuid: hex(&aggr.uuid),
            node: a.node(),
            site: reply.site.clone(),
            state: aggr.state.clone(),
            size_bytes: aggr.size_bytes,
            plex_count: aggr.plexes.len(),
            volume_count: aggr.volumes.len(),
            last_cp_id: aggr.last_cp_id,
            last_cp_lsn: aggr.last_cp_lsn,
        })
        .collect()
}

/// `aggregate show` as a table, followed by a line per node that did not answer.
pub fn aggregates_table(answers: &[NodeAnswer], name: Option<&str>) -> String {
    let mut table =
        Table::new(&["AGGREGATE", "NODE", "SITE", "STATE", "SIZE", "PLEXES", "VOLUMES", "LAST CP"]);
    for row in aggregate_rows(answers, name) {
        table.row(vec![
            row.name,
            opt_text(row.node),
            row.site,
            row.state,
            human_size(row.size_bytes),
            row.plex_count.to_string(),
            row.volume_count.to_string(),
            row.last_cp_id.to_string(),
        ]);
    }
    table.render() + &unreachable_text(answers)
}

/// `aggregate show` as one JSON object: `{"aggregates": [...], "unreachable": [...]}`.
pub fn aggregates_json(answers: &[NodeAnswer], name: Option<&str>) -> Value {
    json!({ "aggregates": aggregate_rows(answers, name), "unreachable": unreachable(answers) })
}

/// One row of `plex show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlexRow {
    /// The aggregate's name.
    pub aggregate: String,
    /// The aggregate's uuid in hex.
    pub aggregate_uuid: String,
    /// `plex0` or `plex1`.
    pub plex: String,
    /// The plex index.
    pub index: u32,
    /// The site of its disks.
    pub site: String,
    /// "normal", "failed", "out_of_date" or "resyncing …".
    pub state: String,
    /// The plex generation.
    pub generation: u64,
    /// Its disks.
    pub disks: Vec<String>,
}

/// The rows of `plex show`, only aggregate `aggregate`'s when given.
pub fn plex_rows(answers: &[NodeAnswer], aggregate: Option<&str>) -> Vec<PlexRow> {
    aggregates(answers, aggregate)
        .flat_map(|(_, _, aggr)| {
            aggr.plexes.iter().map(move |plex| PlexRow {
                aggregate: aggr.name.clone(),
                aggregate_uuid: hex(&aggr.uuid),
                plex: format!("plex{}", plex.index),
                index: plex.index,
                site: plex.site.clone(),
                state: plex.state.clone(),
                generation: plex.generation,
                disks: plex.disks.clone(),
            })
        })
        .collect()
}

/// `plex show` as a table, followed by a line per node that did not answer.
pub fn plexes_table(answers: &[NodeAnswer], aggregate: Option<&str>) -> String {
    let mut table = Table::new(&["AGGREGATE", "PLEX", "SITE", "STATE", "GENERATION", "DISKS"]);
    for row in plex_rows(answers, aggregate) {
        table.row(vec![
            row.aggregate,
            row.plex,
            row.site,
            row.state,
            row.generation.to_string(),
            or_dash(&row.disks.join(",")),
        ]);
    }
    table.render() + &unreachable_text(answers)
}

/// `plex show` as one JSON object: `{"plexes": [...], "unreachable": [...]}`.
pub fn plexes_json(answers: &[NodeAnswer], aggregate: Option<&str>) -> Value {
    json!({ "plexes": plex_rows(answers, aggregate), "unreachable": unreachable(answers) })
}

/// One row of `volume show` (and of `volume create`'s answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeRow {
    /// Its name.
    pub name: String,
    /// Its id in the aggregate's volume table.
    pub id: u32,
    /// The aggregate's name.
    pub aggregate: String,
    /// The aggregate's uuid in hex.
    pub aggregate_uuid: String,
    /// The node that owns the aggregate.
    pub node: Option<u32>,
    /// Its size.
    pub size_bytes: u64,
    /// "online", "offline" or "nvfailed".
    pub state: String,
    /// Why it is offline.
    pub reason: String,
    /// NVFAIL option: fence the volume when NVLog records may have been lost (DESIGN §9).
    pub nvfail: bool,
    /// NVFAIL option: fence it on every forced switchover.
    pub dr_force_nvfail: bool,
    /// Fenced by NVFAIL until an operator clears it (`volume modify --in-nvfailed-state false`).
    pub in_nvfailed_state: bool,
}

/// A volume of aggregate `aggregate`, owned by `node`, as a row.
pub fn volume_row(volume: &VolumeInfo, aggregate: &str, node: Option<u32>) -> VolumeRow {
    VolumeRow {
        name: volume.name.clone(),
        id: volume.id,
        aggregate: aggregate.to_string(),
        aggregate_uuid: hex(&volume.aggregate_uuid),
        node,
        size_bytes: volume.size_bytes,
        state: volume.state.clone(),
        reason: volume.reason.clone(),
        nvfail: volume.nvfail,
        dr_force_nvfail: volume.dr_force_nvfail,
        in_nvfailed_state: volume.in_nvfailed_state,
    }
}

/// The rows of `volume show`, only volume `name` when given.
pub fn volume_rows(answers: &[NodeAnswer], name: Option<&str>) -> Vec<VolumeRow> {
    aggregates(answers, None)
        .flat_map(|(a, _, aggr)| {
            aggr.volumes
                .iter()
                .filter(move |v| name.is_none_or(|n| v.name == n))
                .map(move |v| volume_row(v, &aggr.name, a.node()))
        })
        .collect()
}

/// Volume rows as a table.
pub fn volume_rows_table(rows: &[VolumeRow]) -> String {
    let mut table = Table::new(&[
        "VOLUME",
        "AGGREGATE",
        "NODE",
        "SIZE",
        "STATE",
        "NVFAIL",
        "DR-FORCE-NVFAIL",
        "IN-NVFAILED-STATE",
        "REASON",
    ]);
    for row in rows {
        table.row(vec![
            row.name.clone(),
            row.aggregate.clone(),
            opt_text(row.node),
            human_size(row.size_bytes),
            row.state.clone(),
            on_off(row.nvfail).into(),
            on_off(row.dr_force_nvfail).into(),
            row.in_nvfailed_state.to_string(),
            or_dash(&row.reason),
        ]);
    }
    table.render()
}

/// `volume show` as a table, followed by a line per node that did not answer.
pub fn volumes_table(answers: &[NodeAnswer], name: Option<&str>) -> String {
    volume_rows_table(&volume_rows(answers, name)) + &unreachable_text(answers)
}

/// `volume show` as one JSON object: `{"volumes": [...], "unreachable": [...]}`.
pub fn volumes_json(answers: &[NodeAnswer], name: Option<&str>) -> Value {
    json!({ "volumes": volume_rows(answers, name), "unreachable": unreachable(answers) })
}

/// `unix_ms` as UTC RFC 3339 text with milliseconds (`2026-11-26T15:00:36.123Z`), "-" for 0 (no
/// time: an operation still in progress has no end).
pub fn utc_text(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let (secs, millis) = (unix_ms / 1000, unix_ms % 1000);
    let (days, in_day) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (in_day / 3600, in_day % 3600 / 60, in_day % 60);
    // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`),
    // in unsigned arithmetic: the days are never negative here.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}

/// One row of `cluster show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterNodeRow {
    /// The address asked.
    pub endpoint: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Its node id, when known.
    pub node: Option<u32>,
    /// Its site, when known.
    pub site: Option<String>,
    /// Its MetroCluster mode ("normal", "switchover", …); none when it did not answer.
    pub mode: Option<String>,
    /// `node_state` ("serving", "fenced", …), or "unreachable".
    pub state: String,
    /// Why it is in that state (for an unreachable node: the error).
    pub reason: String,
}

/// The cluster's mode, as `cluster show` derives it from the nodes'.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterMode {
    /// As ONTAP names it: "normal", "switchover", "partial-switchover", "partial-switchback",
    /// "waiting-for-switchback"; "inconsistent" when the nodes contradict each other, "unknown"
    /// when none answered or a node reports a mode this tool does not know.
    pub mode: String,
    /// What the mode rests on, when it is not plain (a node that did not answer, a conflict).
    pub note: String,
}

/// The rows of `cluster show`, one per node asked.
pub fn cluster_node_rows(answers: &[NodeAnswer]) -> Vec<ClusterNodeRow> {
    answers
        .iter()
        .map(|a| match &a.result {
            Ok(reply) => ClusterNodeRow {
                endpoint: a.target.address.clone(),
                reachable: true,
                node: a.node(),
                site: Some(reply.site.clone()),
                mode: Some(if reply.mode.is_empty() { "unknown".into() } else { reply.mode.clone() }),
                state: reply.node_state.clone(),
                reason: reply.state_reason.clone(),
            },
            Err(error) => ClusterNodeRow {
                endpoint: a.target.address.clone(),
                reachable: false,
                node: a.node(),
                site: a.target.site.clone(),
                mode: None,
                state: "unreachable".into(),
                reason: error.clone(),
            },
        })
        .collect()
}

/// The modes in which a node serves (some of) its DR partner's aggregates.
const TAKEOVER_MODES: [&str; 3] = ["switchover", "partial-switchover", "partial-switchback"];

fn node_name(row: &ClusterNodeRow) -> String {
    row.node.map_or_else(|| format!("the node at {}", row.endpoint), |n| format!("node {n}"))
}

/// The cluster's mode from its nodes', as a decision table (first match wins):
///
/// | nodes | cluster |
/// |---|---|
/// | none answered | unknown |
/// | two or more in a takeover mode (switchover, partial-*) | inconsistent |
/// | one in takeover mode M (the others unreachable, not serving or waiting) | M |
/// | one waiting-for-switchback, none in takeover mode | switchover (the survivor is unheard) |
/// | every one that answered normal | normal (noted when some did not answer) |
/// | otherwise | unknown |
pub fn cluster_mode(rows: &[ClusterNodeRow]) -> ClusterMode {
    let mode = |mode: &str, note: String| ClusterMode { mode: mode.into(), note };
    let answered: Vec<&ClusterNodeRow> = rows.iter().filter(|r| r.reachable).collect();
    let silent: Vec<String> = rows.iter().filter(|r| !r.reachable).map(node_name).collect();
    let silent_note =
        if silent.is_empty() { String::new() } else { format!("{} did not answer", silent.join(", ")) };
    if answered.is_empty() {
        return mode("unknown", "no node answered".into());
    }
    let node_mode = |r: &ClusterNodeRow| r.mode.clone().unwrap_or_default();
    let takeover: Vec<&&ClusterNodeRow> =
        answered.iter().filter(|r| TAKEOVER_MODES.contains(&node_mode(r).as_str())).collect();
    if takeover.len() > 1 {
        let who: Vec<String> =
            takeover.iter().map(|r| format!("{} is in {}", node_name(r), node_mode(r))).collect();
        return mode(
            "inconsistent",
            format!("more than one node serves its partner's aggregates: {}", who.join(", ")),
        );
    }
    if let Some(survivor) = takeover.first() {
        let others: Vec<String> = answered
            .iter()
            .filter(|r| r.endpoint != survivor.endpoint && node_mode(r) == "normal" && r.state == "serving")
            .map(|r| format!("{} reports normal and serving too", node_name(r)))
            .collect();
        return mode(&node_mode(survivor), others.join("; "));
    }
    if let Some(waiting) = answered.iter().find(|r| node_mode(r) == "waiting-for-switchback") {
        let note =
            format!("{} waits for switchback; the node in switchover did not answer", node_name(waiting));
        return mode("switchover", note);
    }
    if answered.iter().all(|r| node_mode(r) == "normal") {
        return mode("normal", silent_note);
    }
    let modes: Vec<String> =
        answered.iter().map(|r| format!("{} reports {}", node_name(r), node_mode(r))).collect();
    mode("unknown", modes.join(", "))
}

/// `cluster show` as a table: a line per node, then the cluster's mode.
pub fn cluster_table(answers: &[NodeAnswer]) -> String {
    let rows = cluster_node_rows(answers);
    let mut table = Table::new(&["NODE", "SITE", "MODE", "STATE", "REASON"]);
    for row in &rows {
        table.row(vec![
            opt_text(row.node),
            opt_text(row.site.as_deref()),
            opt_text(row.mode.as_deref()),
            row.state.clone(),
            or_dash(&row.reason),
        ]);
    }
    let cluster = cluster_mode(&rows);
    let mut out = table.render();
    out.push_str(&format!("\ncluster mode: {}", cluster.mode));
    if !cluster.note.is_empty() {
        out.push_str(&format!(" ({})", cluster.note));
    }
    out.push('\n');
    out
}

/// `cluster show` as one JSON object: `{"cluster": {"mode", "note"}, "nodes": [...]}`.
pub fn cluster_json(answers: &[NodeAnswer]) -> Value {
    let rows = cluster_node_rows(answers);
    json!({ "cluster": cluster_mode(&rows), "nodes": rows })
}

/// One operation as `operation show`, `switchover` and `node unfence` print it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OperationRow {
    /// Its id on its node.
    pub id: u64,
    /// The node that ran it.
    pub node: u32,
    /// "switchover" or "unfence".
    pub kind: String,
    /// "in_progress", "successful", "partially_successful" or "failed".
    pub state: String,
    /// When it started, UTC RFC 3339.
    pub start: String,
    /// When it ended, UTC RFC 3339, "-" while in progress.
    pub end: String,
    /// The start in unix milliseconds.
    pub start_unix_ms: u64,
    /// The end in unix milliseconds, 0 while in progress.
    pub end_unix_ms: u64,
    /// The step reached.
    pub step: String,
    /// What failed.
    pub errors: Vec<String>,
}

/// An operation as a row.
pub fn operation_row(operation: &Operation) -> OperationRow {
    OperationRow {
        id: operation.id,
        node: operation.node,
        kind: operation.kind.clone(),
        state: operation.state.clone(),
        start: utc_text(operation.start_unix_ms),
        end: utc_text(operation.end_unix_ms),
        start_unix_ms: operation.start_unix_ms,
        end_unix_ms: operation.end_unix_ms,
        step: operation.step.clone(),
        errors: operation.errors.clone(),
    }
}

/// Operation rows as a table (errors joined by "; ", last: the long column).
pub fn operation_rows_table(rows: &[OperationRow]) -> String {
    let mut table = Table::new(&["ID", "NODE", "KIND", "STATE", "START", "END", "STEP", "ERRORS"]);
    for row in rows {
        table.row(vec![
            row.id.to_string(),
            row.node.to_string(),
            row.kind.clone(),
            row.state.clone(),
            row.start.clone(),
            row.end.clone(),
            or_dash(&row.step),
            or_dash(&row.errors.join("; ")),
        ]);
    }
    table.render()
}

/// One node's answer to `Admin.Operations`, or why there is none.
#[derive(Clone, Debug)]
pub struct OperationsAnswer {
    /// The node asked.
    pub target: Target,
    /// Its operations, oldest first, or the error.
    pub result: Result<Vec<Operation>, String>,
}

/// The rows of `operation show`: every node's newest operation, or all of them with `all`, in
/// the order the nodes were asked, each node's oldest first.
pub fn operations_rows(answers: &[OperationsAnswer], all: bool) -> Vec<OperationRow> {
    answers
        .iter()
        .filter_map(|a| a.result.as_ref().ok())
        .flat_map(|operations| {
            let skip = if all { 0 } else { operations.len().saturating_sub(1) };
            operations.iter().skip(skip).map(operation_row)
        })
        .collect()
}

fn operations_unreachable(answers: &[OperationsAnswer]) -> Vec<Unreachable> {
    answers
        .iter()
        .filter_map(|a| {
            let error = a.result.as_ref().err()?;
            Some(Unreachable {
                endpoint: a.target.address.clone(),
                node: a.target.node,
                error: error.clone(),
            })
        })
        .collect()
}

/// Whether any node did not answer `Admin.Operations`.
pub fn any_operations_unreachable(answers: &[OperationsAnswer]) -> bool {
    answers.iter().any(|a| a.result.is_err())
}

/// `operation show` as a table ("no operations" when there is none), then a line per node that
/// did not answer.
pub fn operations_table(answers: &[OperationsAnswer], all: bool) -> String {
    let rows = operations_rows(answers, all);
    let mut out = if rows.is_empty() { "no operations\n".to_string() } else { operation_rows_table(&rows) };
    for u in operations_unreachable(answers) {
        let node = u.node.map_or_else(String::new, |n| format!("node {n} "));
        out.push_str(&format!("unreachable: {node}at {}: {}\n", u.endpoint, u.error));
    }
    out
}

/// `operation show` as one JSON object: `{"operations": [...], "unreachable": [...]}`.
pub fn operations_json(answers: &[OperationsAnswer], all: bool) -> Value {
    json!({ "operations": operations_rows(answers, all), "unreachable": operations_unreachable(answers) })
}

/// A veto as `switchover` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VetoRow {
    /// "hard" or "soft".
    pub kind: String,
    /// Its stable name ("partner_reachable", "out_of_sync", …).
    pub code: String,
    /// The aggregate (hex uuid), empty for the whole operation.
    pub aggregate: String,
    /// What is wrong and what to do.
    pub reason: String,
}

/// The vetoes as rows.
pub fn veto_rows(vetoes: &[Veto]) -> Vec<VetoRow> {
    vetoes
        .iter()
        .map(|v| VetoRow {
            kind: v.kind.clone(),
            code: v.code.clone(),
            aggregate: v.aggregate.clone(),
            reason: v.reason.clone(),
        })
        .collect()
}

/// The vetoes as a table, or "no vetoes".
pub fn vetoes_table(vetoes: &[Veto]) -> String {
    if vetoes.is_empty() {
        return "no vetoes\n".into();
    }
    let mut table = Table::new(&["KIND", "CODE", "AGGREGATE", "REASON"]);
    for v in veto_rows(vetoes) {
        table.row(vec![v.kind, v.code, or_dash(&v.aggregate), v.reason]);
    }
    table.render()
}

/// Whether `vetoes` stop a switchover: any hard one, or a soft one not overridden.
pub fn vetoes_stop(vetoes: &[Veto], override_vetoes: bool) -> bool {
    vetoes.iter().any(|v| v.kind != "soft" || !override_vetoes)
}

/// How a `switchover` call ended, for printing.
#[derive(Clone, Debug, PartialEq)]
pub enum SwitchoverOutcome {
    /// A simulation: the vetoes found (stopping or not).
    Simulated(SwitchoverReply),
    /// Refused by its vetoes (`FAILED_PRECONDITION` with the reply in its details).
    Vetoed(SwitchoverReply),
    /// Done (or partly, or failed: the operation says).
    Ran(SwitchoverReply),
}

/// `switchover` as a table-and-lines text for people; `node` is the survivor it ran on.
pub fn switchover_text(node: Option<u32>, outcome: &SwitchoverOutcome, override_vetoes: bool) -> String {
    switchover_text_of(node, outcome, override_vetoes, true)
}

/// `switchover_text` of a forced (`forced`) or negotiated switchover.
pub fn switchover_text_of(
    node: Option<u32>,
    outcome: &SwitchoverOutcome,
    override_vetoes: bool,
    forced: bool,
) -> String {
    let on = node.map_or_else(String::new, |n| format!(" on node {n}"));
    let (kind, kind_lower) = if forced {
        ("Forced switchover", "forced switchover")
    } else {
        ("Negotiated switchover", "negotiated switchover")
    };
    match outcome {
        SwitchoverOutcome::Simulated(reply) => {
            let verdict = if vetoes_stop(&reply.vetoes, override_vetoes) {
                "would be vetoed"
            } else if reply.vetoes.is_empty() {
                "would proceed"
            } else {
                "would proceed, overriding the soft vetoes (their volumes are NVFAILed)"
            };
            format!("Simulated {kind_lower}{on}: {verdict}\n{}", vetoes_table(&reply.vetoes))
        }
        SwitchoverOutcome::Vetoed(reply) => {
            let hint = if reply.vetoes.iter().all(|v| v.kind == "soft") {
                "\nOnly soft vetoes: --override-vetoes goes on and NVFAILs their volumes.\n"
            } else {
                ""
            };
            format!("{kind}{on} vetoed:\n{}{hint}", vetoes_table(&reply.vetoes))
        }
        SwitchoverOutcome::Ran(reply) => {
            let mut out = format!("{kind}{on}:\n");
            match &reply.operation {
                Some(operation) => out.push_str(&operation_rows_table(&[operation_row(operation)])),
                None => out.push_str("no operation reported\n"),
            }
            out.push_str(&format!("volumes now served: {}\n", list_or_none(&reply.volumes)));
            out.push_str(&format!("NVFAILed volumes: {}\n", list_or_none(&reply.nvfailed_volumes)));
            if !reply.vetoes.is_empty() {
                out.push_str("vetoes overridden:\n");
                out.push_str(&vetoes_table(&reply.vetoes));
            }
            out
        }
    }
}

/// What `mcctl switchback` got.
#[derive(Clone, Debug)]
pub enum SwitchbackOutcome {
    /// A simulation: the vetoes found.
    Simulated(SwitchbackReply),
    /// Refused by its vetoes.
    Vetoed(SwitchbackReply),
    /// Done (or stopped: the operation says).
    Ran(SwitchbackReply),
}

/// `switchback` for people; `node` is the node that ran it (the one serving the partner's
/// aggregates).
pub fn switchback_text(node: Option<u32>, outcome: &SwitchbackOutcome) -> String {
    let on = node.map_or_else(String::new, |n| format!(" on node {n}"));
    match outcome {
        SwitchbackOutcome::Simulated(reply) => {
            let verdict = if reply.vetoes.is_empty() { "would proceed" } else { "would be vetoed" };
            format!("Simulated switchback{on}: {verdict}\n{}", vetoes_table(&reply.vetoes))
        }
        SwitchbackOutcome::Vetoed(reply) => {
            format!("Switchback{on} vetoed:\n{}", vetoes_table(&reply.vetoes))
        }
        SwitchbackOutcome::Ran(reply) => {
            let mut out = format!("Switchback{on}:\n");
            match &reply.operation {
                Some(operation) => out.push_str(&operation_rows_table(&[operation_row(operation)])),
                None => out.push_str("no operation reported\n"),
            }
            out.push_str(&format!(
                "volumes handed back to their home node: {}\n",
                list_or_none(&reply.volumes)
            ));
            out
        }
    }
}

/// `switchback -o json`: `{"node", "simulate", "vetoed", "vetoes", "operation", "volumes"}`.
pub fn switchback_json(node: Option<u32>, outcome: &SwitchbackOutcome) -> Value {
    let (reply, simulate, vetoed) = match outcome {
        SwitchbackOutcome::Simulated(reply) => (reply, true, !reply.vetoes.is_empty()),
        SwitchbackOutcome::Vetoed(reply) => (reply, false, true),
        SwitchbackOutcome::Ran(reply) => (reply, false, false),
    };
    json!({
        "node": node,
        "simulate": simulate,
        "vetoed": vetoed,
        "vetoes": veto_rows(&reply.vetoes),
        "operation": reply.operation.as_ref().map(operation_row),
        "volumes": reply.volumes,
    })
}

/// `switchback`'s exit code: vetoed (or would be), failed, or ok.
pub fn switchback_exit(outcome: &SwitchbackOutcome) -> u8 {
    match outcome {
        SwitchbackOutcome::Simulated(reply) if !reply.vetoes.is_empty() => EXIT_VETOED,
        SwitchbackOutcome::Simulated(_) => EXIT_OK,
        SwitchbackOutcome::Vetoed(_) => EXIT_VETOED,
        SwitchbackOutcome::Ran(reply) => match &reply.operation {
            Some(operation) if operation.state == "successful" => EXIT_OK,
            _ => EXIT_FAILED,
        },
    }
}

/// One aggregate of a heal, as printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealRow {
    /// The aggregate.
    pub aggregate: String,
    /// Its home plex was reattached (its resync runs in the background).
    pub reattached: bool,
    /// Regions the home node's unreleased records added to the resync set (S8).
    pub regions_marked: u64,
    /// What happened.
    pub result: String,
}

fn heal_rows(reply: &HealReply) -> Vec<HealRow> {
    reply
        .aggregates
        .iter()
        .map(|a| HealRow {
            aggregate: a.name.clone(),
            reattached: a.reattached,
            regions_marked: a.regions_marked,
            result: a.result.clone(),
        })
        .collect()
}

/// `heal` for people.
pub fn heal_text(node: Option<u32>, reply: &HealReply) -> String {
    let on = node.map_or_else(String::new, |n| format!(" on node {n}"));
    let mut out = format!("Heal{on}:\n");
    if let Some(operation) = &reply.operation {
        out.push_str(&operation_rows_table(&[operation_row(operation)]));
    }
    let mut table = Table::new(&["AGGREGATE", "REATTACHED", "REGIONS MARKED", "RESULT"]);
    for row in heal_rows(reply) {
        table.row(vec![row.aggregate, yes_no(row.reattached), row.regions_marked.to_string(), row.result]);
    }
    out.push_str(&table.render());
    out
}

fn yes_no(value: bool) -> String {
    if value { "yes".into() } else { "no".into() }
}

/// `heal -o json`: `{"node", "operation", "aggregates": [{"aggregate", "reattached",
/// "regions_marked", "result"}]}`.
pub fn heal_json(node: Option<u32>, reply: &HealReply) -> Value {
    json!({
        "node": node,
        "operation": reply.operation.as_ref().map(operation_row),
        "aggregates": heal_rows(reply),
    })
}

/// The resync of aggregates `names` at one node, summed: (copied, total, bytes per second,
/// every one done). An aggregate that is no longer resyncing and mirrored normal counts as done.
pub fn resync_sum(status: &StatusReply, names: &[String]) -> (u64, u64, u64, bool) {
    let (mut copied, mut total, mut rate, mut done) = (0u64, 0u64, 0u64, true);
    for name in names {
        let Some(aggregate) = status.aggregates.iter().find(|a| &a.name == name) else {
            done = false;
            continue;
        };
        if aggregate.state != "mirrored,normal" {
            done = false;
        }
        if let Some(resync) = &aggregate.resync {
            copied += resync.copied_bytes.min(resync.total_bytes);
            total += resync.total_bytes;
            rate += resync.bytes_per_second;
        }
    }
    (copied, total, rate, done)
}

/// One progress line: a bar on a terminal (`width` cells), plain text otherwise.
pub fn progress_line(what: &str, copied: u64, total: u64, rate: u64, bar: Option<usize>) -> String {
    let percent = copied.saturating_mul(100).checked_div(total).unwrap_or(100);
    let eta = if rate == 0 || copied >= total {
        "-".to_string()
    } else {
        format!("{}s", (total - copied).div_ceil(rate))
    };
    let numbers = format!(
        "{percent:>3}% {} / {} at {}/s, eta {eta}",
        human_size(copied),
        human_size(total),
        human_size(rate)
    );
    match bar {
        Some(width) => {
            let filled = usize::try_from(percent).unwrap_or(100).min(100) * width / 100;
            format!("{what} [{}{}] {numbers}", "#".repeat(filled), ".".repeat(width - filled))
        }
        None => format!("{what}: {numbers}"),
    }
}

/// `mediator show` for people.
pub fn mediator_text(reply: &mc_proto::v1::MediatorShowReply) -> String {
    let mut out = format!(
        "Mediator: {}\nmode: {}; state version {}{}\n",
        reply.diagnosis,
        if reply.observer {
            "observer (never switches over by itself)"
        } else {
            "automatic switchover allowed"
        },
        reply.state_version,
        if reply.state_lost {
            "; STATE LOST: rebuilding from the controllers' reports (nothing is granted)"
        } else {
            ""
        }
    );
    let mut nodes = Table::new(&["NODE", "SITE", "LAST HEARD", "MODE", "FENCED"]);
    for n in &reply.nodes {
        nodes.row(vec![
            n.node.to_string(),
            n.site.clone(),
            if n.heard { format!("{:.1} s ago", n.heard_ms_ago as f64 / 1000.0) } else { "never".into() },
            or_dash(&n.mode),
            yes_no(n.fenced),
        ]);
    }
    out.push_str(&nodes.render());
    let mut aggregates = Table::new(&["AGGREGATE", "EPOCH", "IN SYNC", "MIRROR INTACT"]);
    for a in &reply.aggregates {
        let epoch =
            a.epoch.as_ref().map_or_else(|| "-".into(), |e| format!("{}@node{}", e.number, e.owner_node));
        aggregates.row(vec![crate::node::hex(&a.uuid), epoch, yes_no(a.in_sync), yes_no(a.mirror_intact)]);
    }
    out.push_str(&aggregates.render());
    let mut auso = Table::new(&["AUSO TO SITE", "ENABLED", "WHY NOT"]);
    for a in &reply.auso {
        auso.row(vec![a.site.clone(), yes_no(a.enabled), or_dash(&a.reason)]);
    }
    out.push_str(&auso.render());
    out.push_str(&format!("last decision: {}\n", or_dash(&reply.last_decision)));
    for g in &reply.pending_grants {
        out.push_str(&format!(
            "pending grant: site {}'s aggregates to node {} ({}{}), not confirmed yet\n",
            g.from_site,
            g.to_node,
            if g.automatic { "automatic" } else { "manual" },
            if g.nvfail { ", NVFAIL" } else { "" }
        ));
    }
    out
}

/// `mediator show -o json`: `{"diagnosis", "observer", "state_lost", "state_version", "nodes",
/// "aggregates", "auso", "last_decision", "pending_grants"}`.
pub fn mediator_json(reply: &mc_proto::v1::MediatorShowReply) -> Value {
    json!({
        "diagnosis": reply.diagnosis,
        "observer": reply.observer,
        "state_lost": reply.state_lost,
        "state_version": reply.state_version,
        "nodes": reply.nodes.iter().map(|n| json!({
            "node": n.node, "site": n.site, "heard": n.heard, "heard_ms_ago": n.heard_ms_ago,
            "mode": n.mode, "fenced": n.fenced,
        })).collect::<Vec<_>>(),
        "aggregates": reply.aggregates.iter().map(|a| json!({
            "uuid": crate::node::hex(&a.uuid),
            "epoch": a.epoch.as_ref().map(|e| json!({"number": e.number, "owner": e.owner_node})),
            "in_sync": a.in_sync,
            "mirror_intact": a.mirror_intact,
        })).collect::<Vec<_>>(),
        "auso": reply.auso.iter().map(|a| json!({"site": a.site, "enabled": a.enabled, "reason": a.reason}))
            .collect::<Vec<_>>(),
        "last_decision": reply.last_decision,
        "pending_grants": reply.pending_grants.iter().map(|g| json!({
            "to_node": g.to_node, "from_site": g.from_site, "automatic": g.automatic, "nvfail": g.nvfail,
        })).collect::<Vec<_>>(),
    })
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "none".into() } else { items.join(", ") }
}

/// `switchover -o json`: `{"node", "simulate", "vetoed", "vetoes", "operation", "volumes",
/// "nvfailed_volumes"}` (`vetoed`: the vetoes stop, or would stop, the switchover).
pub fn switchover_json(node: Option<u32>, outcome: &SwitchoverOutcome, override_vetoes: bool) -> Value {
    let (reply, simulate, vetoed) = match outcome {
        SwitchoverOutcome::Simulated(reply) => (reply, true, vetoes_stop(&reply.vetoes, override_vetoes)),
        SwitchoverOutcome::Vetoed(reply) => (reply, false, true),
        SwitchoverOutcome::Ran(reply) => (reply, false, false),
    };
    json!({
        "node": node,
        "simulate": simulate,
        "vetoed": vetoed,
        "vetoes": veto_rows(&reply.vetoes),
        "operation": reply.operation.as_ref().map(operation_row),
        "volumes": reply.volumes,
        "nvfailed_volumes": reply.nvfailed_volumes,
    })
}

/// The exit code of a switchover: vetoed (3) when vetoes stop it (or would, for a simulation),
/// failed (1) when its operation did not fully succeed, else 0.
pub fn switchover_exit(outcome: &SwitchoverOutcome, override_vetoes: bool) -> u8 {
    match outcome {
        SwitchoverOutcome::Simulated(reply) if vetoes_stop(&reply.vetoes, override_vetoes) => EXIT_VETOED,
        SwitchoverOutcome::Simulated(_) => EXIT_OK,
        SwitchoverOutcome::Vetoed(_) => EXIT_VETOED,
        SwitchoverOutcome::Ran(reply) => match &reply.operation {
            Some(operation) if operation.state == "successful" => EXIT_OK,
            Some(_) => EXIT_FAILED,
            // A server that reports no operation: the call itself succeeded.
            None => EXIT_OK,
        },
    }
}

/// `node unfence` as text: the operation and the volumes NVFAILed.
pub fn unfence_text(node: u32, operation: Option<&Operation>, nvfailed: &[String]) -> String {
    let mut out = format!("Forced unfence of node {node}:\n");
    match operation {
        Some(operation) => out.push_str(&operation_rows_table(&[operation_row(operation)])),
        None => out.push_str("no operation reported\n"),
    }
    out.push_str(&format!("NVFAILed volumes: {}\n", list_or_none(nvfailed)));
    out
}

/// `node unfence -o json`: `{"node", "operation", "nvfailed_volumes"}`.
pub fn unfence_json(node: u32, operation: Option<&Operation>, nvfailed: &[String]) -> Value {
    json!({ "node": node, "operation": operation.map(operation_row), "nvfailed_volumes": nvfailed })
}

/// The kind of replication every mirror here is: a write is acknowledged once both plexes (and
/// both NVLog copies) hold it.
pub const MIRROR_TYPE: &str = "synchronous";

/// A resync in progress as `mirror status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResyncRow {
    /// "incremental" or "full".
    pub level: String,
    /// Bytes to copy (grows when writes dirty more regions meanwhile).
    pub total_bytes: u64,
    /// Bytes copied and durable on the target.
    pub copied_bytes: u64,
    /// Percent done (100 only once complete, as the controller counts it).
    pub percent: u64,
    /// Bytes per second so far.
    pub bytes_per_second: u64,
    /// Seconds left at the rate so far; none before anything was copied.
    pub eta_seconds: Option<u64>,
}

/// One row of `mirror status`: one mirrored aggregate. The aggregate, not the volume, is the
/// unit of mirroring here (its two plexes, its one dirty bitmap, its resync), as a DataKeeper
/// mirror is; its volumes are listed in the row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MirrorStatusRow {
    /// The aggregate's name.
    pub aggregate: String,
    /// The aggregate's uuid in hex.
    pub aggregate_uuid: String,
    /// The node that serves it.
    pub node: Option<u32>,
    /// Its volumes.
    pub volumes: Vec<String>,
    /// "normal" (both plexes in sync), "degraded" (one plex out of date or failed: writes go to
    /// the other only), "resyncing", or "paused" (`mirror pause`: degraded on purpose).
    pub state: String,
    /// The aggregate's state as the controller reports it ("mirrored,normal", …).
    pub aggregate_state: String,
    /// Always "synchronous".
    pub mirror_type: String,
    /// The plex that holds every write (`plex0`), and its site.
    pub source_plex: String,
    /// Its site.
    pub source_site: String,
    /// The plex it mirrors to, or that lacks writes when degraded or resyncing.
    pub target_plex: String,
    /// Its site.
    pub target_site: String,
    /// Regions (bits) of the source's dirty bitmap.
    pub bitmap_regions: u64,
    /// Regions marked dirty: written while the target was not `normal`, not yet copied to it.
    pub dirty_regions: u64,
    /// Dirty regions in percent of all, one decimal (rounded down, as DataKeeper shows it).
    pub dirty_percent: f64,
    /// Bytes per region.
    pub region_bytes: u64,
    /// The resync in progress, when resyncing.
    pub resync: Option<ResyncRow>,
}

/// The mirror state of an aggregate from its state and its plexes'.
fn mirror_state_of(aggr: &AggregateInfo) -> &'static str {
    if aggr.mirror_paused {
        return "paused";
    }
    let resyncing = aggr.state == "resyncing" || aggr.plexes.iter().any(|p| p.state.starts_with("resyncing"));
    if resyncing {
        "resyncing"
    } else if aggr.state == "mirrored,normal" && aggr.plexes.iter().all(|p| p.state == "normal") {
        "normal"
    } else {
        "degraded"
    }
}

/// Tenths of a percent of `part` in `whole`, rounded down (0 for an empty whole).
fn percent_tenths(part: u64, whole: u64) -> u64 {
    u64::try_from(u128::from(part) * 1000 / u128::from(whole.max(1))).unwrap_or(u64::MAX)
}

fn resync_row(aggr: &AggregateInfo) -> Option<ResyncRow> {
    let resync = aggr.resync.as_ref().filter(|r| !r.complete)?;
    let remaining = resync.total_bytes.saturating_sub(resync.copied_bytes);
    Some(ResyncRow {
        level: resync.level.clone(),
        total_bytes: resync.total_bytes,
        copied_bytes: resync.copied_bytes,
        percent: (percent_tenths(resync.copied_bytes, resync.total_bytes) / 10).min(99),
        bytes_per_second: resync.bytes_per_second,
        eta_seconds: (resync.bytes_per_second > 0).then(|| remaining / resync.bytes_per_second),
    })
}

/// The source and target plex indexes: the resync's while resyncing, else the `normal` plex
/// (plex 0 when both are) and the other.
fn source_and_target(aggr: &AggregateInfo, state: &str) -> (u32, u32) {
    if state == "resyncing"
        && let Some(resync) = aggr.resync.as_ref()
    {
        return (resync.source_plex, resync.target_plex);
    }
    let source = aggr.plexes.iter().find(|p| p.state == "normal").map_or(0, |p| p.index);
    (source, 1 - source.min(1))
}

/// The rows of `mirror status`: every aggregate, or only the one named `name` or holding volume
/// `name`.
pub fn mirror_rows(answers: &[NodeAnswer], name: Option<&str>) -> Vec<MirrorStatusRow> {
    aggregates(answers, None)
        .filter(|(_, _, aggr)| {
            name.is_none_or(|n| aggr.name == n || aggr.volumes.iter().any(|v| v.name == n))
        })
        .map(|(a, _, aggr)| {
            let state = mirror_state_of(aggr);
            let (source, target) = source_and_target(aggr, state);
            let site = |index: u32| {
                aggr.plexes.iter().find(|p| p.index == index).map_or_else(String::new, |p| p.site.clone())
            };
            MirrorStatusRow {
                aggregate: aggr.name.clone(),
                aggregate_uuid: hex(&aggr.uuid),
                node: a.node(),
                volumes: aggr.volumes.iter().map(|v| v.name.clone()).collect(),
                state: state.into(),
                aggregate_state: aggr.state.clone(),
                mirror_type: MIRROR_TYPE.into(),
                source_plex: format!("plex{source}"),
                source_site: site(source),
                target_plex: format!("plex{target}"),
                target_site: site(target),
                bitmap_regions: aggr.bitmap_regions,
                dirty_regions: aggr.dirty_regions,
                // Tenths are exact in f64 (far below 2^53).
                #[allow(clippy::cast_precision_loss)]
                dirty_percent: percent_tenths(aggr.dirty_regions, aggr.bitmap_regions) as f64 / 10.0,
                region_bytes: aggr.region_bytes,
                resync: if state == "resyncing" { resync_row(aggr) } else { None },
            }
        })
        .collect()
}

/// A resync's progress in a table cell: `incremental 42%, 1.5 MiB of 3.6 MiB, 12 MiB/s, ETA 1s`.
fn resync_text(resync: &ResyncRow) -> String {
    let eta = resync.eta_seconds.map_or_else(|| "ETA -".to_string(), |s| format!("ETA {s}s"));
    format!(
        "{} {}%, {} of {}, {}/s, {eta}",
        resync.level,
        resync.percent,
        human_size(resync.copied_bytes),
        human_size(resync.total_bytes),
        human_size(resync.bytes_per_second)
    )
}

/// `mirror status` as a table, followed by a line per node that did not answer.
pub fn mirror_table(answers: &[NodeAnswer], name: Option<&str>) -> String {
    let mut table = Table::new(&[
        "AGGREGATE",
        "NODE",
        "VOLUMES",
        "STATE",
        "TYPE",
        "SOURCE",
        "TARGET",
        "BITMAP",
        "DIRTY",
        "RESYNC",
    ]);
    for row in mirror_rows(answers, name) {
        table.row(vec![
            row.aggregate.clone(),
            opt_text(row.node),
            or_dash(&row.volumes.join(",")),
            row.state.clone(),
            row.mirror_type.clone(),
            format!("{} ({})", row.source_plex, row.source_site),
            format!("{} ({})", row.target_plex, row.target_site),
            format!("{} x {}", row.bitmap_regions, human_size(row.region_bytes)),
            format!("{} ({:.1}%)", row.dirty_regions, row.dirty_percent),
            row.resync.as_ref().map_or_else(|| "-".to_string(), resync_text),
        ]);
    }
    table.render() + &unreachable_text(answers)
}

/// `mirror status` as one JSON object: `{"mirrors": [...], "unreachable": [...]}`.
pub fn mirror_json(answers: &[NodeAnswer], name: Option<&str>) -> Value {
    json!({ "mirrors": mirror_rows(answers, name), "unreachable": unreachable(answers) })
}

/// The outcome of one check of `check run`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRow {
    /// "node", "dr_mirror", "aggregate" or "volume".
    pub component: String,
    /// What was checked: `node 1`, `node 1 -> node 2`, an aggregate's or a volume's name.
    pub subject: String,
    /// "ok" or "warning".
    pub status: String,
    /// What was found and, for a warning, what to do.
    pub reason: String,
}

/// What `check run` found, as stored for `check show`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// When it ran, UTC RFC 3339.
    pub ran: String,
    /// When it ran, unix milliseconds.
    pub ran_unix_ms: u64,
    /// "ok" when every check is, else "warning".
    pub status: String,
    /// How many checks warn.
    pub warnings: usize,
    /// Every check, nodes first, then DR mirrors, aggregates and volumes.
    pub checks: Vec<CheckRow>,
}

impl CheckReport {
    /// `EXIT_OK` when every check is ok, else `EXIT_FAILED`.
    pub fn exit_code(&self) -> u8 {
        if self.warnings == 0 { EXIT_OK } else { EXIT_FAILED }
    }
}

fn check(component: &str, subject: String, warnings: Vec<String>, ok: String) -> CheckRow {
    let (status, reason) = if warnings.is_empty() { ("ok", ok) } else { ("warning", warnings.join("; ")) };
    CheckRow { component: component.into(), subject, status: status.into(), reason }
}

fn node_subject(node: Option<u32>, address: &str) -> String {
    node.map_or_else(|| format!("node at {address}"), |n| format!("node {n}"))
}

/// The checks of `check run`: each node (reachable, serving, mode), its DR mirror (connected, in
/// sync), each aggregate it serves (mirrored and normal) or cannot serve, each volume (online).
pub fn check_rows(answers: &[NodeAnswer]) -> Vec<CheckRow> {
    let mut nodes = Vec::new();
    let mut mirrors = Vec::new();
    let mut aggrs = Vec::new();
    let mut volumes = Vec::new();
    for a in answers {
        let subject = node_subject(a.node(), &a.target.address);
        let reply = match &a.result {
            Ok(reply) => reply,
            Err(error) => {
                nodes.push(check(
                    "node",
                    subject,
                    vec![format!(
                        "did not answer at {}: {error}; check that its controller runs and that this host \
                         reaches it",
                        a.target.address
                    )],
                    String::new(),
                ));
                continue;
            }
        };
        let mut warnings = Vec::new();
        if reply.node_state != "serving" {
            let why = if reply.state_reason.is_empty() {
                String::new()
            } else {
                format!(": {}", reply.state_reason)
            };
            warnings.push(format!("{}{why}", reply.node_state));
        }
        match reply.mode.as_str() {
            "normal" => {}
            "switchover" | "partial-switchover" | "partial-switchback" => warnings.push(format!(
                "in {} mode: it serves its DR partner's aggregates; heal and switch back once the partner site \
                 is repaired",
                reply.mode
            )),
            "waiting-for-switchback" => warnings.push(
                "waiting for switchback: its DR partner serves its aggregates; switch back once they are in sync"
                    .into(),
            ),
            other => warnings.push(format!("mode {:?} unknown to this tool", other)),
        }
        nodes.push(check("node", subject.clone(), warnings, format!("serving, mode {}", reply.mode)));

        let mut warnings = Vec::new();
        let (mirror_subject, ok) = match &reply.dr_mirror {
            Some(m) => {
                let partner = format!("DR partner node {}", m.partner_node);
                if !m.connected {
                    warnings.push(format!(
                        "NVLog mirror to {partner} is disconnected: once the mirror timeout passes, new writes are held at this \
                         site only; check {partner} and the inter-site link"
                    ));
                }
                let state = mirror_state_name(m.state);
                match MirrorState::try_from(m.state) {
                    Ok(MirrorState::InSync) => {}
                    Ok(MirrorState::Resyncing) => warnings.push(format!(
                        "NVLog mirror to {partner} is resyncing: in sync once a CP covers lsn {}",
                        m.resync_from_lsn
                    )),
                    _ => warnings.push(format!(
                        "NVLog mirror to {partner} is {state}: a switchover now would NVFAIL volumes; bring \
                         {partner} back so the mirror re-establishes"
                    )),
                }
                (
                    format!("{subject} -> node {}", m.partner_node),
                    format!("connected to {partner}, in sync (acked lsn {})", m.acked_lsn),
                )
            }
            None => {
                warnings.push("reports no DR mirror".into());
                (subject.clone(), String::new())
            }
        };
        mirrors.push(check("dr_mirror", mirror_subject, warnings, ok));

        for aggr in &reply.aggregates {
            let state = mirror_state_of(aggr);
            let (source, target) = source_and_target(aggr, state);
            let plex_text = |index: u32| {
                let plex = aggr.plexes.iter().find(|p| p.index == index);
                let state = plex.map_or("missing", |p| p.state.as_str());
                let site = plex.map_or("?", |p| p.site.as_str());
                format!("plex{index} (site {site}) is {state}")
            };
            let mut warnings = Vec::new();
            match state {
                "normal" => {}
                "resyncing" => {
                    let progress = resync_row(aggr).map_or_else(String::new, |r| format!(": {}", resync_text(&r)));
                    warnings.push(format!(
                        "resyncing plex{target} from plex{source}{progress}; not redundant until it completes"
                    ));
                }
                _ => warnings.push(format!(
                    "mirror degraded: {}; writes go to plex{source} only ({} dirty regions); bring plex{target}'s \
                     site back and its resync starts on its own",
                    plex_text(target),
                    aggr.dirty_regions
                )),
            }
            if aggr.switched_over {
                warnings.push(format!(
                    "served after a switchover by {subject}; its home is node {}",
                    aggr.home_node
                ));
            }
            aggrs.push(check(
                "aggregate",
                aggr.name.clone(),
                warnings,
                format!("mirrored, normal, on {subject}"),
            ));
            for volume in &aggr.volumes {
                let warnings = match volume.state.as_str() {
                    "online" => Vec::new(),
                    "nvfailed" => vec![format!(
                        "NVFAILed{}: check its data, then `mcctl volume modify {} --in-nvfailed-state false \
                         --confirm`",
                        if volume.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", volume.reason)
                        },
                        volume.name
                    )],
                    other => vec![format!(
                        "{other}{}",
                        if volume.reason.is_empty() { String::new() } else { format!(": {}", volume.reason) }
                    )],
                };
                volumes.push(check(
                    "volume",
                    volume.name.clone(),
                    warnings,
                    format!("online in {}", aggr.name),
                ));
            }
        }
        for unavailable in &reply.unavailable {
            aggrs.push(check(
                "aggregate",
                hex(&unavailable.uuid),
                vec![format!("offline: {subject} does not serve it: {}", unavailable.reason)],
                String::new(),
            ));
        }
    }
    nodes.into_iter().chain(mirrors).chain(aggrs).chain(volumes).collect()
}

/// `check run`'s report of `answers`, run at `now_unix_ms`.
pub fn check_report(answers: &[NodeAnswer], now_unix_ms: u64) -> CheckReport {
    let checks = check_rows(answers);
    let warnings = checks.iter().filter(|c| c.status != "ok").count();
    CheckReport {
        ran: utc_text(now_unix_ms),
        ran_unix_ms: now_unix_ms,
        status: if warnings == 0 { "ok" } else { "warning" }.into(),
        warnings,
        checks,
    }
}

/// A check report as a table, then a summary line (`check show` puts when it ran first).
pub fn check_table(report: &CheckReport) -> String {
    let mut table = Table::new(&["COMPONENT", "SUBJECT", "STATUS", "REASON"]);
    for row in &report.checks {
        table.row(vec![row.component.clone(), row.subject.clone(), row.status.clone(), or_dash(&row.reason)]);
    }
    let summary = match report.warnings {
        0 => format!("all {} checks ok", report.checks.len()),
        1 => format!("1 warning in {} checks", report.checks.len()),
        n => format!("{n} warnings in {} checks", report.checks.len()),
    };
    format!("{}\n{summary}\n", table.render())
}

/// `check show`: when the stored check ran, then its table.
pub fn check_show_table(report: &CheckReport) -> String {
    format!("last check: {}\n\n{}", report.ran, check_table(report))
}

#[cfg(test)]
mod tests {
    use mc_proto::v1::{CpStats, Identity, PlexInfo, ResyncInfo, WriterMirror};

    use super::*;

    fn uuid(seed: u8) -> Vec<u8> {
        (0..16).map(|i| seed.wrapping_add(i)).collect()
    }

    /// Node `node` at site `site`, owning one aggregate with two plexes and one volume.
    fn reply(node: u32, site: &str, aggr: &str, volume: &str, seed: u8) -> StatusReply {
        let other = if site == "A" { "B" } else { "A" };
        StatusReply {
            identity: Some(Identity { cluster_id: vec![7; 16], sender_node: node, receiver_node: 0 }),
            site: site.into(),
            log_generation: 3,
            partitions: Vec::new(),
            node_state: "serving".into(),
            state_reason: String::new(),
            dr_mirror: Some(WriterMirror {
                partner_node: 3 - node,
                state: MirrorState::InSync as i32,
                resync_from_lsn: 0,
                connected: true,
                acked_lsn: 40 + u64::from(node),
            }),
            aggregates: vec![AggregateInfo {
                uuid: uuid(seed),
                name: aggr.into(),
                state: "mirrored,normal".into(),
                size_bytes: 1_181_116_006,
                plexes: (0..2u32)
                    .map(|index| PlexInfo {
                        index,
                        state: "normal".into(),
                        generation: 1 + u64::from(index),
                        disks: vec![format!("d{index}a.img"), format!("d{index}b.img")],
                        site: if index == 0 { site.into() } else { other.into() },
                    })
                    .collect(),
                volumes: vec![VolumeInfo {
                    id: 1,
                    name: volume.into(),
                    aggregate_uuid: uuid(seed),
                    size_bytes: 64 << 20,
                    state: "online".into(),
                    reason: String::new(),
                    nvfail: true,
                    dr_force_nvfail: false,
                    in_nvfailed_state: false,
                }],
                last_cp_id: 12,
                last_cp_lsn: 40,
                epoch: None,
                switched_over: false,
                home_node: node,
                bitmap_regions: 18_022,
                dirty_regions: 0,
                region_bytes: 65_536,
                resync: None,
                mirror_paused: false,
            }],
            cp: Some(CpStats {
                completed: 12,
                last_id: 12,
                last_lsn: 40 + u64::from(node),
                ..CpStats::default()
            }),
            mode: "normal".into(),
            unavailable: Vec::new(),
        }
    }

    fn target(address: &str, node: u32, site: &str) -> Target {
        Target { address: address.into(), node: Some(node), site: Some(site.into()) }
    }

    fn both() -> Vec<NodeAnswer> {
        vec![
            NodeAnswer {
                target: target("127.0.0.1:7001", 1, "A"),
                result: Ok(reply(1, "A", "aggr_a", "vol_a", 0x10)),
            },
            NodeAnswer {
                target: target("127.0.0.1:7002", 2, "B"),
                result: Ok(reply(2, "B", "aggr_b", "vol_b", 0x20)),
            },
        ]
    }

    /// B does not answer; B is known from the lab file only.
    fn b_down() -> Vec<NodeAnswer> {
        let mut answers = both();
        answers[1].result = Err("connect: connection refused".into());
        answers
    }

    /// `both()` with A's plex 1 dropped (A's mirror to B down) and B resyncing its plex 1.
    fn mirrors_in_trouble() -> Vec<NodeAnswer> {
        let mut answers = both();
        if let Ok(reply) = &mut answers[0].result {
            let aggr = &mut reply.aggregates[0];
            aggr.state = "mirror degraded".into();
            aggr.plexes[1].state = "out_of_date".into();
            aggr.dirty_regions = 901;
            if let Some(mirror) = &mut reply.dr_mirror {
                mirror.connected = false;
                mirror.state = MirrorState::OutOfSync as i32;
            }
        }
        if let Ok(reply) = &mut answers[1].result {
            let aggr = &mut reply.aggregates[0];
            aggr.state = "resyncing".into();
            aggr.plexes[1].state = "resyncing (incremental, 42%)".into();
            aggr.dirty_regions = 90;
            aggr.resync = Some(ResyncInfo {
                level: "incremental".into(),
                source_plex: 0,
                target_plex: 1,
                total_bytes: 10 << 20,
                copied_bytes: 4 << 20,
                bytes_per_second: 2 << 20,
                complete: false,
            });
            aggr.volumes[0].state = "nvfailed".into();
            aggr.volumes[0].reason = "forced switchover: the mirror was out of sync".into();
        }
        answers
    }

    /// Prevents a silent change of `mirror status`'s columns, of its states (normal, degraded,
    /// resyncing) or of the dirty percent, which is rounded down like DataKeeper's.
    #[test]
    fn mirror_status_table() {
        assert_eq!(
            mirror_table(&both(), None),
            "\
AGGREGATE  NODE  VOLUMES  STATE   TYPE         SOURCE     TARGET     BITMAP          DIRTY     RESYNC
aggr_a     1     vol_a    normal  synchronous  plex0 (A)  plex1 (B)  18022 x 64 KiB  0 (0.0%)  -
aggr_b     2     vol_b    normal  synchronous  plex0 (B)  plex1 (A)  18022 x 64 KiB  0 (0.0%)  -
"
        );
        assert_eq!(
            mirror_table(&mirrors_in_trouble(), None),
            "\
AGGREGATE  NODE  VOLUMES  STATE      TYPE         SOURCE     TARGET     BITMAP          DIRTY       RESYNC
aggr_a     1     vol_a    degraded   synchronous  plex0 (A)  plex1 (B)  18022 x 64 KiB  901 (4.9%)  -
aggr_b     2     vol_b    resyncing  synchronous  plex0 (B)  plex1 (A)  18022 x 64 KiB  90 (0.4%)   incremental 40%, 4 MiB of 10 MiB, 2 MiB/s, ETA 3s
"
        );
        // By volume or by aggregate name; B silent.
        assert_eq!(
            mirror_table(&b_down(), Some("vol_a")),
            "\
AGGREGATE  NODE  VOLUMES  STATE   TYPE         SOURCE     TARGET     BITMAP          DIRTY     RESYNC
aggr_a     1     vol_a    normal  synchronous  plex0 (A)  plex1 (B)  18022 x 64 KiB  0 (0.0%)  -
unreachable: node 2 at 127.0.0.1:7002: connect: connection refused
"
        );
        assert_eq!(mirror_rows(&both(), Some("aggr_b")).len(), 1);
        assert!(mirror_rows(&both(), Some("nothing")).is_empty());
    }

    /// Prevents a change of `mirror status -o json`.
    #[test]
    fn mirror_status_json() {
        let expected = json!({
            "mirrors": [{
                "aggregate": "aggr_b", "aggregate_uuid": "202122232425262728292a2b2c2d2e2f", "node": 2,
                "volumes": ["vol_b"], "state": "resyncing", "aggregate_state": "resyncing",
                "mirror_type": "synchronous",
                "source_plex": "plex0", "source_site": "B", "target_plex": "plex1", "target_site": "A",
                "bitmap_regions": 18022, "dirty_regions": 90, "dirty_percent": 0.4, "region_bytes": 65536,
                "resync": {
                    "level": "incremental", "total_bytes": 10u64 << 20, "copied_bytes": 4u64 << 20,
                    "percent": 40, "bytes_per_second": 2u64 << 20, "eta_seconds": 3
                }
            }],
            "unreachable": []
        });
        assert_eq!(mirror_json(&mirrors_in_trouble(), Some("vol_b")), expected);
        // A mirror the operator paused says so, whatever its plexes show.
        let mut paused = mirrors_in_trouble();
        for answer in &mut paused {
            if let Ok(status) = &mut answer.result {
                for aggr in &mut status.aggregates {
                    aggr.mirror_paused = true;
                }
            }
        }
        assert_eq!(mirror_json(&paused, Some("vol_b"))["mirrors"][0]["state"], "paused");
    }

    /// Prevents a healthy cluster reported with warnings (or exit code 1), or a check table that
    /// changes silently.
    #[test]
    fn check_all_ok() {
        let report = check_report(&both(), 1_796_136_036_123);
        assert_eq!(report.exit_code(), EXIT_OK);
        assert_eq!(
            check_show_table(&report),
            "\
last check: 2026-12-01T14:40:36.123Z

COMPONENT  SUBJECT           STATUS  REASON
node       node 1            ok      serving, mode normal
node       node 2            ok      serving, mode normal
dr_mirror  node 1 -> node 2  ok      connected to DR partner node 2, in sync (acked lsn 41)
dr_mirror  node 2 -> node 1  ok      connected to DR partner node 1, in sync (acked lsn 42)
aggregate  aggr_a            ok      mirrored, normal, on node 1
aggregate  aggr_b            ok      mirrored, normal, on node 2
volume     vol_a             ok      online in aggr_a
volume     vol_b             ok      online in aggr_b

all 8 checks ok
"
        );
    }

    /// Prevents a broken link, a silent node, a degraded or resyncing mirror or an NVFAILed
    /// volume passing the check: each is a warning naming what to do, and the exit code is 1.
    #[test]
    fn check_warnings() {
        let mut answers = mirrors_in_trouble();
        answers.push(NodeAnswer {
            target: target("127.0.0.1:7003", 3, "A"),
            result: Err("connect: connection refused".into()),
        });
        if let Ok(reply) = &mut answers[1].result {
            reply.unavailable.push(mc_proto::v1::UnavailableAggregate {
                uuid: uuid(0x30),
                reason: "deposed: a newer epoch".into(),
            });
        }
        let report = check_report(&answers, 1_796_136_036_123);
        assert_eq!(report.exit_code(), EXIT_FAILED);
        assert_eq!((report.status.as_str(), report.warnings), ("warning", 6));
        assert_eq!(
            check_table(&report),
            "\
COMPONENT  SUBJECT                           STATUS   REASON
node       node 1                            ok       serving, mode normal
node       node 2                            ok       serving, mode normal
node       node 3                            warning  did not answer at 127.0.0.1:7003: connect: connection refused; check that its controller runs and that this host reaches it
dr_mirror  node 1 -> node 2                  warning  NVLog mirror to DR partner node 2 is disconnected: once the mirror timeout passes, new writes are held at this site only; check DR partner node 2 and the inter-site link; NVLog mirror to DR partner node 2 is out_of_sync: a switchover now would NVFAIL volumes; bring DR partner node 2 back so the mirror re-establishes
dr_mirror  node 2 -> node 1                  ok       connected to DR partner node 1, in sync (acked lsn 42)
aggregate  aggr_a                            warning  mirror degraded: plex1 (site B) is out_of_date; writes go to plex0 only (901 dirty regions); bring plex1's site back and its resync starts on its own
aggregate  aggr_b                            warning  resyncing plex1 from plex0: incremental 40%, 4 MiB of 10 MiB, 2 MiB/s, ETA 3s; not redundant until it completes
aggregate  303132333435363738393a3b3c3d3e3f  warning  offline: node 2 does not serve it: deposed: a newer epoch
volume     vol_a                             ok       online in aggr_a
volume     vol_b                             warning  NVFAILed (forced switchover: the mirror was out of sync): check its data, then `mcctl volume modify vol_b --in-nvfailed-state false --confirm`

6 warnings in 10 checks
"
        );
    }

    /// Prevents `check show` losing what `check run` stored: the report survives its JSON form.
    #[test]
    fn check_report_round_trip() {
        let report = check_report(&b_down(), 1_796_136_036_123);
        let text = serde_json::to_string(&report).unwrap();
        let back: CheckReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);
        assert_eq!(back.checks[1].subject, "node 2");
        assert_eq!(back.checks[1].status, "warning");
        assert_eq!(serde_json::to_value(&report).unwrap()["ran"], "2026-12-01T14:40:36.123Z");
    }

    /// Prevents a silent change of `node show`'s columns or alignment.
    #[test]
    fn node_table() {
        assert_eq!(
            nodes_table(&both()),
            "\
NODE  SITE  STATE    DR PARTNER  MIRROR   CONNECTED  ACKED LSN  CPS  LAST CP LSN  REASON
1     A     serving  2           in_sync  yes        41         12   41           -
2     B     serving  1           in_sync  yes        42         12   42           -
"
        );
    }

    /// Prevents an unreachable node from vanishing from `node show` (or panicking it).
    #[test]
    fn node_table_unreachable() {
        assert!(any_unreachable(&b_down()));
        assert!(!any_unreachable(&both()));
        assert_eq!(
            nodes_table(&b_down()),
            "\
NODE  SITE  STATE        DR PARTNER  MIRROR   CONNECTED  ACKED LSN  CPS  LAST CP LSN  REASON
1     A     serving      2           in_sync  yes        41         12   41           -
2     B     unreachable  -           -        -          -          -    -            connect: connection refused
"
        );
    }

    /// Prevents a change of `node show -o json`'s field names or nesting.
    #[test]
    fn node_json() {
        let expected = json!({"nodes": [
            {
                "endpoint": "127.0.0.1:7001", "reachable": true, "node": 1, "site": "A",
                "state": "serving", "reason": "", "log_generation": 3,
                "dr_mirror": {"partner_node": 2, "state": "in_sync", "connected": true,
                              "acked_lsn": 41, "resync_from_lsn": 0},
                "cp": {"completed": 12, "last_id": 12, "last_lsn": 41}
            },
            {
                "endpoint": "127.0.0.1:7002", "reachable": false, "node": 2, "site": "B",
                "state": "unreachable", "reason": "connect: connection refused",
                "log_generation": null, "dr_mirror": null, "cp": null
            }
        ]});
        assert_eq!(nodes_json(&b_down()), expected);
    }

    /// Prevents a silent change of `aggregate show`'s columns, and checks the name filter.
    #[test]
    fn aggregate_table() {
        assert_eq!(
            aggregates_table(&both(), None),
            "\
AGGREGATE  NODE  SITE  STATE            SIZE     PLEXES  VOLUMES  LAST CP
aggr_a     1     A     mirrored,normal  1.1 GiB  2       1        12
aggr_b     2     B     mirrored,normal  1.1 GiB  2       1        12
"
        );
        assert_eq!(
            aggregates_table(&b_down(), Some("aggr_a")),
            "\
AGGREGATE  NODE  SITE  STATE            SIZE     PLEXES  VOLUMES  LAST CP
aggr_a     1     A     mirrored,normal  1.1 GiB  2       1        12
unreachable: node 2 at 127.0.0.1:7002: connect: connection refused
"
        );
    }

    /// Prevents a change of `aggregate show -o json` (raw sizes, hex uuids, the unreachable list).
    #[test]
    fn aggregate_json() {
        let expected = json!({
            "aggregates": [{
                "name": "aggr_a", "uuid": "101112131415161718191a1b1c1d1e1f", "node": 1, "site": "A",
                "state": "mirrored,normal", "size_bytes": 1_181_116_006u64, "plex_count": 2,
                "volume_count": 1, "last_cp_id": 12, "last_cp_lsn": 40
            }],
            "unreachable": [
                {"endpoint": "127.0.0.1:7002", "node": 2, "error": "connect: connection refused"}
            ]
        });
        assert_eq!(aggregates_json(&b_down(), None), expected);
    }

    /// Prevents a change of the printed JSON text itself (key order, nesting, number forms).
    #[test]
    fn aggregate_json_text() {
        let text = serde_json::to_string_pretty(&aggregates_json(&both(), Some("aggr_b"))).unwrap();
        assert_eq!(
            text,
            r#"{
  "aggregates": [
    {
      "last_cp_id": 12,
      "last_cp_lsn": 40,
      "name": "aggr_b",
      "node": 2,
      "plex_count": 2,
      "site": "B",
      "size_bytes": 1181116006,
      "state": "mirrored,normal",
      "uuid": "202122232425262728292a2b2c2d2e2f",
      "volume_count": 1
    }
  ],
  "unreachable": []
}"#
        );
    }

    /// Prevents a silent change of `plex show`'s columns, and checks the aggregate filter.
    #[test]
    fn plex_table() {
        assert_eq!(
            plexes_table(&both(), None),
            "\
AGGREGATE  PLEX   SITE  STATE   GENERATION  DISKS
aggr_a     plex0  A     normal  1           d0a.img,d0b.img
aggr_a     plex1  B     normal  2           d1a.img,d1b.img
aggr_b     plex0  B     normal  1           d0a.img,d0b.img
aggr_b     plex1  A     normal  2           d1a.img,d1b.img
"
        );
        assert_eq!(
            plexes_table(&both(), Some("aggr_x")),
            "AGGREGATE  PLEX  SITE  STATE  GENERATION  DISKS\n"
        );
    }

    /// Prevents a change of `plex show -o json`.
    #[test]
    fn plex_json() {
        let expected = json!({
            "plexes": [
                {"aggregate": "aggr_b", "aggregate_uuid": "202122232425262728292a2b2c2d2e2f", "plex": "plex0",
                 "index": 0, "site": "B", "state": "normal", "generation": 1,
                 "disks": ["d0a.img", "d0b.img"]},
                {"aggregate": "aggr_b", "aggregate_uuid": "202122232425262728292a2b2c2d2e2f", "plex": "plex1",
                 "index": 1, "site": "A", "state": "normal", "generation": 2,
                 "disks": ["d1a.img", "d1b.img"]}
            ],
            "unreachable": []
        });
        assert_eq!(plexes_json(&both(), Some("aggr_b")), expected);
    }

    /// Prevents a silent change of `volume show`'s columns, and checks the name filter.
    #[test]
    fn volume_table() {
        assert_eq!(
            volumes_table(&both(), None),
            "\
VOLUME  AGGREGATE  NODE  SIZE    STATE   NVFAIL  DR-FORCE-NVFAIL  IN-NVFAILED-STATE  REASON
vol_a   aggr_a     1     64 MiB  online  on      off              false              -
vol_b   aggr_b     2     64 MiB  online  on      off              false              -
"
        );
        assert_eq!(
            volumes_table(&b_down(), Some("vol_b")),
            "VOLUME  AGGREGATE  NODE  SIZE  STATE  NVFAIL  DR-FORCE-NVFAIL  IN-NVFAILED-STATE  REASON\n\
             unreachable: node 2 at 127.0.0.1:7002: connect: connection refused\n"
        );
    }

    /// Prevents a change of `volume show -o json`.
    #[test]
    fn volume_json() {
        let expected = json!({
            "volumes": [{
                "name": "vol_b", "id": 1, "aggregate": "aggr_b",
                "aggregate_uuid": "202122232425262728292a2b2c2d2e2f", "node": 2,
                "size_bytes": 67_108_864u64, "state": "online", "reason": "",
                "nvfail": true, "dr_force_nvfail": false, "in_nvfailed_state": false
            }],
            "unreachable": []
        });
        assert_eq!(volumes_json(&both(), Some("vol_b")), expected);
    }

    /// Prevents an NVFAILed volume shown as if it were online with default options.
    #[test]
    fn volume_table_nvfailed() {
        let mut answers = both();
        if let Ok(reply) = &mut answers[1].result {
            let volume = &mut reply.aggregates[0].volumes[0];
            volume.state = "nvfailed".into();
            volume.reason = "forced switchover: the mirror was out of sync".into();
            volume.nvfail = false;
            volume.dr_force_nvfail = true;
            volume.in_nvfailed_state = true;
        }
        assert_eq!(
            volumes_table(&answers, Some("vol_b")),
            "\
VOLUME  AGGREGATE  NODE  SIZE    STATE     NVFAIL  DR-FORCE-NVFAIL  IN-NVFAILED-STATE  REASON
vol_b   aggr_b     2     64 MiB  nvfailed  off     on               true               forced switchover: the mirror was out of sync
"
        );
    }

    /// `both()` after a forced switchover to A: A serves B's aggregate too; B did not answer.
    fn switched_over() -> Vec<NodeAnswer> {
        let mut answers = b_down();
        if let Ok(reply) = &mut answers[0].result {
            reply.mode = "switchover".into();
        }
        answers
    }

    fn cluster_row(node: u32, mode: Option<&str>, state: &str) -> ClusterNodeRow {
        ClusterNodeRow {
            endpoint: format!("127.0.0.1:700{node}"),
            reachable: mode.is_some(),
            node: Some(node),
            site: Some(if node == 1 { "A" } else { "B" }.into()),
            mode: mode.map(str::to_string),
            state: state.into(),
            reason: String::new(),
        }
    }

    /// Prevents a wrong cluster mode: the decision table of `cluster_mode`, row by row.
    #[test]
    fn cluster_modes() {
        // Each node as (mode, node state), mode None when it did not answer; then the cluster's.
        type Nodes<'a> = &'a [(Option<&'a str>, &'a str)];
        let cases: &[(Nodes<'_>, &str)] = &[
            (&[(Some("normal"), "serving"), (Some("normal"), "serving")], "normal"),
            (&[(Some("normal"), "serving"), (None, "unreachable")], "normal"),
            (&[(None, "unreachable"), (None, "unreachable")], "unknown"),
            (&[(Some("switchover"), "serving"), (None, "unreachable")], "switchover"),
            (&[(Some("switchover"), "serving"), (Some("normal"), "fenced")], "switchover"),
            (&[(Some("waiting-for-switchback"), "serving"), (Some("switchover"), "serving")], "switchover"),
            (&[(Some("partial-switchover"), "serving"), (None, "unreachable")], "partial-switchover"),
            (&[(Some("normal"), "fenced"), (Some("partial-switchback"), "serving")], "partial-switchback"),
            (&[(Some("waiting-for-switchback"), "serving"), (None, "unreachable")], "switchover"),
            (&[(Some("switchover"), "serving"), (Some("switchover"), "serving")], "inconsistent"),
            (&[(Some("normal"), "serving"), (Some("unknown"), "serving")], "unknown"),
        ];
        for (nodes, expected) in cases {
            let rows: Vec<ClusterNodeRow> = nodes
                .iter()
                .zip(1u32..)
                .map(|((mode, state), node)| cluster_row(node, *mode, state))
                .collect();
            assert_eq!(cluster_mode(&rows).mode, *expected, "{nodes:?}");
        }
        let both_normal =
            [cluster_row(1, Some("normal"), "serving"), cluster_row(2, Some("normal"), "serving")];
        assert_eq!(cluster_mode(&both_normal).note, "");
        let one_silent = [cluster_row(1, Some("normal"), "serving"), cluster_row(2, None, "unreachable")];
        assert_eq!(cluster_mode(&one_silent).note, "node 2 did not answer");
    }

    /// Prevents a silent change of `cluster show`'s columns or of its cluster line.
    #[test]
    fn cluster_table_shapes() {
        assert_eq!(
            cluster_table(&both()),
            "\
NODE  SITE  MODE    STATE    REASON
1     A     normal  serving  -
2     B     normal  serving  -

cluster mode: normal
"
        );
        assert_eq!(
            cluster_table(&switched_over()),
            "\
NODE  SITE  MODE        STATE        REASON
1     A     switchover  serving      -
2     B     -           unreachable  connect: connection refused

cluster mode: switchover
"
        );
    }

    /// Prevents a change of `cluster show -o json`.
    #[test]
    fn cluster_json_shape() {
        let expected = json!({
            "cluster": {"mode": "switchover", "note": ""},
            "nodes": [
                {"endpoint": "127.0.0.1:7001", "reachable": true, "node": 1, "site": "A",
                 "mode": "switchover", "state": "serving", "reason": ""},
                {"endpoint": "127.0.0.1:7002", "reachable": false, "node": 2, "site": "B",
                 "mode": null, "state": "unreachable", "reason": "connect: connection refused"}
            ]
        });
        assert_eq!(cluster_json(&switched_over()), expected);
    }

    /// Prevents wrong dates (leap years, month ends, the epoch) in operation times.
    #[test]
    fn utc_times() {
        assert_eq!(utc_text(0), "-");
        assert_eq!(utc_text(1), "1970-01-01T00:00:00.001Z");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_text(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(utc_text(1_735_689_599_000), "2024-12-31T23:59:59.000Z");
        assert_eq!(utc_text(1_796_136_036_123), "2026-12-01T14:40:36.123Z");
        // Never a panic, whatever a node reports.
        assert!(utc_text(u64::MAX).ends_with('Z'));
    }

    fn operation(id: u64, node: u32, state: &str) -> Operation {
        let done = state != "in_progress";
        Operation {
            id,
            kind: if id == 1 { "unfence" } else { "switchover" }.into(),
            state: state.into(),
            start_unix_ms: 1_796_136_036_123 + id * 1000,
            end_unix_ms: if done { 1_796_136_036_123 + id * 1000 + 500 } else { 0 },
            errors: if state == "failed" {
                vec!["aggr_b: no usable plex".into(), "x".into()]
            } else {
                Vec::new()
            },
            node,
            step: if done { "done" } else { "replay" }.into(),
        }
    }

    fn operation_answers() -> Vec<OperationsAnswer> {
        vec![
            OperationsAnswer {
                target: target("127.0.0.1:7001", 1, "A"),
                result: Ok(vec![operation(1, 1, "successful"), operation(2, 1, "failed")]),
            },
            OperationsAnswer { target: target("127.0.0.1:7002", 2, "B"), result: Ok(Vec::new()) },
        ]
    }

    /// Prevents a silent change of `operation show`'s columns; checks last-only against `--all`.
    #[test]
    fn operation_table() {
        assert_eq!(
            operations_table(&operation_answers(), false),
            "\
ID  NODE  KIND        STATE   START                     END                       STEP  ERRORS
2   1     switchover  failed  2026-12-01T14:40:38.123Z  2026-12-01T14:40:38.623Z  done  aggr_b: no usable plex; x
"
        );
        let mut answers = operation_answers();
        answers[1].result = Err("Unimplemented: operations".into());
        assert_eq!(
            operations_table(&answers, true),
            "\
ID  NODE  KIND        STATE       START                     END                       STEP  ERRORS
1   1     unfence     successful  2026-12-01T14:40:37.123Z  2026-12-01T14:40:37.623Z  done  -
2   1     switchover  failed      2026-12-01T14:40:38.123Z  2026-12-01T14:40:38.623Z  done  aggr_b: no usable plex; x
unreachable: node 2 at 127.0.0.1:7002: Unimplemented: operations
"
        );
        assert!(any_operations_unreachable(&answers));
        answers.truncate(0);
        assert_eq!(operations_table(&answers, true), "no operations\n");
    }

    /// Prevents a change of `operation show -o json` (both time forms, the unreachable list).
    #[test]
    fn operation_json() {
        let mut answers = operation_answers();
        answers[0].result = Ok(vec![operation(3, 1, "in_progress")]);
        answers[1].result = Err("connect: connection refused".into());
        let expected = json!({
            "operations": [{
                "id": 3, "node": 1, "kind": "switchover", "state": "in_progress",
                "start": "2026-12-01T14:40:39.123Z", "end": "-",
                "start_unix_ms": 1_796_136_039_123u64, "end_unix_ms": 0,
                "step": "replay", "errors": []
            }],
            "unreachable": [{"endpoint": "127.0.0.1:7002", "node": 2, "error": "connect: connection refused"}]
        });
        assert_eq!(operations_json(&answers, false), expected);
    }

    fn veto(kind: &str, code: &str, aggregate: &str) -> Veto {
        Veto {
            kind: kind.into(),
            code: code.into(),
            aggregate: aggregate.into(),
            reason: format!("{code} here"),
        }
    }

    /// Prevents a simulation or a refusal that hides its vetoes, or exits with the wrong code.
    #[test]
    fn switchover_vetoes() {
        let hard = SwitchoverReply {
            vetoes: vec![veto("hard", "partner_reachable", ""), veto("soft", "out_of_sync", "2021")],
            ..SwitchoverReply::default()
        };
        let soft = SwitchoverReply {
            vetoes: vec![veto("soft", "out_of_sync", "2021")],
            ..SwitchoverReply::default()
        };
        let vetoed = SwitchoverOutcome::Vetoed(hard.clone());
        assert_eq!(
            switchover_text(Some(1), &vetoed, false),
            "\
Forced switchover on node 1 vetoed:
KIND  CODE               AGGREGATE  REASON
hard  partner_reachable  -          partner_reachable here
soft  out_of_sync        2021       out_of_sync here
"
        );
        assert_eq!(switchover_exit(&vetoed, true), EXIT_VETOED);
        assert_eq!(
            switchover_text(Some(1), &SwitchoverOutcome::Vetoed(soft.clone()), false),
            "\
Forced switchover on node 1 vetoed:
KIND  CODE         AGGREGATE  REASON
soft  out_of_sync  2021       out_of_sync here

Only soft vetoes: --override-vetoes goes on and NVFAILs their volumes.
"
        );
        let simulated = SwitchoverOutcome::Simulated(soft.clone());
        assert_eq!(switchover_exit(&simulated, false), EXIT_VETOED);
        assert_eq!(switchover_exit(&simulated, true), EXIT_OK);
        assert_eq!(switchover_exit(&SwitchoverOutcome::Simulated(hard), true), EXIT_VETOED);
        let clean = SwitchoverOutcome::Simulated(SwitchoverReply::default());
        assert_eq!(switchover_exit(&clean, false), EXIT_OK);
        assert_eq!(
            switchover_text(None, &clean, false),
            "Simulated forced switchover: would proceed\nno vetoes\n"
        );
        assert_eq!(
            switchover_text_of(None, &clean, false, false),
            "Simulated negotiated switchover: would proceed\nno vetoes\n"
        );
        assert_eq!(
            switchover_json(Some(1), &simulated, false),
            json!({
                "node": 1, "simulate": true, "vetoed": true,
                "vetoes": [{"kind": "soft", "code": "out_of_sync", "aggregate": "2021", "reason": "out_of_sync here"}],
                "operation": null, "volumes": [], "nvfailed_volumes": []
            })
        );
    }

    /// Prevents a switchback whose vetoes, operation or volumes are not shown, or that exits with
    /// the wrong code.
    #[test]
    fn switchback_shapes() {
        let vetoed = SwitchbackOutcome::Vetoed(SwitchbackReply {
            vetoes: vec![veto("hard", "not_healed", "2021")],
            ..SwitchbackReply::default()
        });
        assert_eq!(
            switchback_text(Some(2), &vetoed),
            "\
Switchback on node 2 vetoed:
KIND  CODE        AGGREGATE  REASON
hard  not_healed  2021       not_healed here
"
        );
        assert_eq!(switchback_exit(&vetoed), EXIT_VETOED);
        let simulated = SwitchbackOutcome::Simulated(SwitchbackReply::default());
        assert_eq!(switchback_text(None, &simulated), "Simulated switchback: would proceed\nno vetoes\n");
        assert_eq!(switchback_exit(&simulated), EXIT_OK);
        let ran = SwitchbackOutcome::Ran(SwitchbackReply {
            vetoes: Vec::new(),
            operation: Some(operation(5, 2, "successful")),
            volumes: vec!["vol_a".into()],
        });
        let text = switchback_text(Some(2), &ran);
        assert!(text.starts_with("Switchback on node 2:\nID  NODE  KIND"), "{text}");
        assert!(text.ends_with("volumes handed back to their home node: vol_a\n"), "{text}");
        assert_eq!(switchback_exit(&ran), EXIT_OK);
        let json = switchback_json(Some(2), &ran);
        assert_eq!(json["vetoed"], false);
        assert_eq!(json["volumes"], json!(["vol_a"]));
        assert_eq!(json["operation"]["state"], "successful");
        assert_eq!(switchback_json(Some(2), &vetoed)["vetoes"][0]["code"], "not_healed");
        let stopped = SwitchbackOutcome::Ran(SwitchbackReply {
            operation: Some(operation(5, 2, "in_progress")),
            ..SwitchbackReply::default()
        });
        assert_eq!(switchback_exit(&stopped), EXIT_FAILED);
    }

    /// Prevents a mediator view that hides the failure it sees, a lost state, AUSO's reasons
    /// or a pending grant.
    #[test]
    fn mediator_shapes() {
        let reply = mc_proto::v1::MediatorShowReply {
            diagnosis: "site A lost: it does not report and the other site does not hear it".into(),
            observer: false,
            state_lost: true,
            state_version: 42,
            nodes: vec![
                mc_proto::v1::MediatorNodeView {
                    node: 1,
                    site: "A".into(),
                    heard: true,
                    heard_ms_ago: 3500,
                    mode: "normal".into(),
                    fenced: false,
                },
                mc_proto::v1::MediatorNodeView {
                    node: 2,
                    site: "B".into(),
                    heard: false,
                    heard_ms_ago: 0,
                    mode: String::new(),
                    fenced: false,
                },
            ],
            aggregates: vec![mc_proto::v1::MediatorAggregateView {
                uuid: vec![0xab; 2],
                epoch: Some(mc_proto::v1::Epoch { number: 3, owner_node: 2 }),
                in_sync: false,
                mirror_intact: true,
            }],
            auso: vec![mc_proto::v1::AusoView {
                site: "B".into(),
                enabled: false,
                reason: "state lost".into(),
            }],
            last_decision: String::new(),
            pending_grants: vec![mc_proto::v1::MediatorGrant {
                to_node: 2,
                from_site: "A".into(),
                epochs: Vec::new(),
                automatic: true,
                nvfail: false,
            }],
        };
        assert_eq!(
            mediator_text(&reply),
            "\
Mediator: site A lost: it does not report and the other site does not hear it
mode: automatic switchover allowed; state version 42; STATE LOST: rebuilding from the controllers' reports (nothing is granted)
NODE  SITE  LAST HEARD  MODE    FENCED
1     A     3.5 s ago   normal  no
2     B     never       -       no
AGGREGATE  EPOCH    IN SYNC  MIRROR INTACT
abab       3@node2  no       yes
AUSO TO SITE  ENABLED  WHY NOT
B             no       state lost
last decision: -
pending grant: site A's aggregates to node 2 (automatic), not confirmed yet
"
        );
        let json = mediator_json(&reply);
        assert_eq!(json["state_lost"], true);
        assert_eq!(json["aggregates"][0]["epoch"], json!({"number": 3, "owner": 2}));
        assert_eq!(json["aggregates"][0]["mirror_intact"], true);
        assert_eq!(json["pending_grants"][0]["from_site"], "A");
    }

    /// Prevents a heal printed without what happened to each aggregate.
    #[test]
    fn heal_shapes() {
        let reply = HealReply {
            operation: None,
            aggregates: vec![
                mc_proto::v1::HealedAggregate {
                    name: "aggr_a".into(),
                    uuid: vec![1; 16],
                    reattached: true,
                    result: "plex 0 reattached".into(),
                    regions_marked: 16,
                },
                mc_proto::v1::HealedAggregate {
                    name: "aggr_c".into(),
                    uuid: vec![2; 16],
                    reattached: false,
                    result: "refused: split brain".into(),
                    regions_marked: 0,
                },
            ],
        };
        assert_eq!(
            heal_text(Some(2), &reply),
            "\
Heal on node 2:
AGGREGATE  REATTACHED  REGIONS MARKED  RESULT
aggr_a     yes         16              plex 0 reattached
aggr_c     no          0               refused: split brain
"
        );
        assert_eq!(
            heal_json(Some(2), &reply),
            json!({
                "node": 2, "operation": null,
                "aggregates": [
                    {"aggregate": "aggr_a", "reattached": true, "regions_marked": 16, "result": "plex 0 reattached"},
                    {"aggregate": "aggr_c", "reattached": false, "regions_marked": 0, "result": "refused: split brain"}
                ]
            })
        );
    }

    /// Prevents a progress line with a wrong percent, bar or ETA, or a division by zero.
    #[test]
    fn progress_lines() {
        assert_eq!(
            progress_line("resync", 1 << 20, 4 << 20, 1 << 20, None),
            "resync:  25% 1 MiB / 4 MiB at 1 MiB/s, eta 3s"
        );
        assert_eq!(
            progress_line("resync", 2 << 20, 4 << 20, 0, Some(10)),
            "resync [#####.....]  50% 2 MiB / 4 MiB at 0 B/s, eta -"
        );
        assert_eq!(progress_line("resync", 0, 0, 0, Some(4)), "resync [####] 100% 0 B / 0 B at 0 B/s, eta -");
    }

    /// Prevents a done switchover printed without its operation, volumes or NVFAILed volumes.
    #[test]
    fn switchover_done() {
        let reply = SwitchoverReply {
            vetoes: Vec::new(),
            operation: Some(operation(4, 1, "successful")),
            nvfailed_volumes: vec!["vol_b".into()],
            volumes: vec!["vol_b".into(), "vol_c".into()],
        };
        let ran = SwitchoverOutcome::Ran(reply.clone());
        assert_eq!(
            switchover_text(Some(1), &ran, false),
            "\
Forced switchover on node 1:
ID  NODE  KIND        STATE       START                     END                       STEP  ERRORS
4   1     switchover  successful  2026-12-01T14:40:40.123Z  2026-12-01T14:40:40.623Z  done  -
volumes now served: vol_b, vol_c
NVFAILed volumes: vol_b
"
        );
        assert_eq!(switchover_exit(&ran, false), EXIT_OK);
        let partial = SwitchoverReply { operation: Some(operation(4, 1, "partially_successful")), ..reply };
        assert_eq!(switchover_exit(&SwitchoverOutcome::Ran(partial), false), EXIT_FAILED);
        assert_eq!(
            switchover_json(Some(1), &ran, false),
            json!({
                "node": 1, "simulate": false, "vetoed": false, "vetoes": [],
                "operation": {
                    "id": 4, "node": 1, "kind": "switchover", "state": "successful",
                    "start": "2026-12-01T14:40:40.123Z", "end": "2026-12-01T14:40:40.623Z",
                    "start_unix_ms": 1_796_136_040_123u64, "end_unix_ms": 1_796_136_040_623u64,
                    "step": "done", "errors": []
                },
                "volumes": ["vol_b", "vol_c"], "nvfailed_volumes": ["vol_b"]
            })
        );
    }

    /// Prevents a change of `node unfence`'s text or JSON.
    #[test]
    fn unfence_shapes() {
        let op = operation(1, 2, "successful");
        assert_eq!(
            unfence_text(2, Some(&op), &[]),
            "\
Forced unfence of node 2:
ID  NODE  KIND     STATE       START                     END                       STEP  ERRORS
1   2     unfence  successful  2026-12-01T14:40:37.123Z  2026-12-01T14:40:37.623Z  done  -
NVFAILed volumes: none
"
        );
        assert_eq!(
            unfence_json(2, None, &["vol_b".to_string()]),
            json!({"node": 2, "operation": null, "nvfailed_volumes": ["vol_b"]})
        );
    }

    /// Prevents sizes shown in the wrong unit or rounded the wrong way.
    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(1_181_116_006), "1.1 GiB");
        assert_eq!(human_size((1 << 30) - 1), "1024 MiB");
        assert_eq!(human_size(u64::MAX), "16384 PiB");
    }

    /// Prevents mirror states shown as raw enum names or numbers.
    #[test]
    fn mirror_names() {
        assert_eq!(mirror_state_name(MirrorState::InSync as i32), "in_sync");
        assert_eq!(mirror_state_name(MirrorState::OutOfSync as i32), "out_of_sync");
        assert_eq!(mirror_state_name(MirrorState::Resyncing as i32), "resyncing");
        assert_eq!(mirror_state_name(MirrorState::Offline as i32), "offline");
        assert_eq!(mirror_state_name(0), "unspecified");
        assert_eq!(mirror_state_name(9), "unknown(9)");
    }

    /// Prevents a cluster id of the wrong length or with non-hex digits being accepted.
    #[test]
    fn cluster_ids() {
        assert_eq!(parse_cluster_id(&"0a".repeat(16)), Ok([10; 16]));
        assert!(parse_cluster_id("0a").is_err());
        assert!(parse_cluster_id(&"zz".repeat(16)).is_err());
    }
}
