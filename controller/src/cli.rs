//! What `mcctl`'s admin commands print (DESIGN §11): tables for people and JSON values for
//! scripts, built from the `Admin.Status` answers of every node, so the shapes are tested without
//! processes. The binary (`src/bin/mcctl.rs`) does the calls and picks the format.
//!
//! Invariants:
//! - every function here is pure: the same answers give the same text, with nodes in the order
//!   they were asked and aggregates, plexes and volumes in the order each node reported them;
//! - a node that did not answer is never dropped silently: `node show` lists it as
//!   `unreachable` with the error, the other commands list it under `unreachable`;
//! - JSON field names are snake_case, sizes are raw byte counts (`size_bytes`) and uuids are
//!   lowercase hex; tables show sizes in binary units (`1.1 GiB`).

use mc_proto::v1::{AggregateInfo, MirrorState, StatusReply, VolumeInfo};
use serde::Serialize;
use serde_json::{Value, json};

/// Exit code: the command did what it was asked.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command failed (an RPC error, a node that did not answer, nothing found).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage (clap's own code).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the operation was vetoed (a switchover refused by its checks; a later issue).
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
    /// "online" or "offline".
    pub state: String,
    /// Why it is offline.
    pub reason: String,
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
    let mut table = Table::new(&["VOLUME", "AGGREGATE", "NODE", "SIZE", "STATE", "REASON"]);
    for row in rows {
        table.row(vec![
            row.name.clone(),
            row.aggregate.clone(),
            opt_text(row.node),
            human_size(row.size_bytes),
            row.state.clone(),
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

#[cfg(test)]
mod tests {
    use mc_proto::v1::{CpStats, Identity, PlexInfo, WriterMirror};

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
                }],
                last_cp_id: 12,
                last_cp_lsn: 40,
            }],
            cp: Some(CpStats {
                completed: 12,
                last_id: 12,
                last_lsn: 40 + u64::from(node),
                ..CpStats::default()
            }),
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
VOLUME  AGGREGATE  NODE  SIZE    STATE   REASON
vol_a   aggr_a     1     64 MiB  online  -
vol_b   aggr_b     2     64 MiB  online  -
"
        );
        assert_eq!(
            volumes_table(&b_down(), Some("vol_b")),
            "VOLUME  AGGREGATE  NODE  SIZE  STATE  REASON\nunreachable: node 2 at 127.0.0.1:7002: connect: \
             connection refused\n"
        );
    }

    /// Prevents a change of `volume show -o json`.
    #[test]
    fn volume_json() {
        let expected = json!({
            "volumes": [{
                "name": "vol_b", "id": 1, "aggregate": "aggr_b",
                "aggregate_uuid": "202122232425262728292a2b2c2d2e2f", "node": 2,
                "size_bytes": 67_108_864u64, "state": "online", "reason": ""
            }],
            "unreachable": []
        });
        assert_eq!(volumes_json(&both(), Some("vol_b")), expected);
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
