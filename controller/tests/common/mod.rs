//! A 2-node cluster of real `mc-controller` processes on 127.0.0.1 (sites A and B, DR partners
//! of each other), with the clients and the workload checker the cluster tests share.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mc_proto::v1::admin_client::AdminClient;
use mc_proto::v1::data_client::DataClient;
use mc_proto::v1::{
    CreateAggregateRequest, CreateVolumeRequest, MirrorState, PartitionRecord, PartitionRecordsRequest,
    ReadRequest, StatusReply, StatusRequest, WriteRequest,
};
use mc_tests::proxy::FaultProxy;
use tonic::transport::Channel;

pub const CLUSTER: [u8; 16] =
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
pub const DEADLINE: Duration = Duration::from_secs(60);
pub const BLOCK: u64 = 4096;

/// Timers and NVLog settings of a test cluster.
#[derive(Clone, Debug)]
pub struct Settings {
    pub durability: &'static str,
    pub cp_interval_ms: u64,
    pub mirror_timeout_ms: u64,
    pub nvlog_mib: u64,
    /// 0: unlimited.
    pub resync_bytes_per_second: u64,
    /// The mediator's address as each node (A, B) dials it (DESIGN §10; a proxy in between
    /// cuts one site's mediator link), with heartbeat 200 ms, lease 2 s, AUSO window 5 s.
    pub mediator: Option<[String; 2]>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            durability: "process",
            cp_interval_ms: 1000,
            mirror_timeout_ms: 5000,
            nvlog_mib: 16,
            resync_bytes_per_second: 0,
            mediator: None,
        }
    }
}

/// A free TCP port on 127.0.0.1 (the daemons must know each other's ports before they start),
/// below the ephemeral range, so that no outgoing connection takes it while its daemon restarts.
pub fn free_port() -> u16 {
    controller::lab::reserve_port().unwrap().local_addr().unwrap().port()
}

pub struct NodeSpec {
    pub id: u32,
    pub site: &'static str,
    pub dir: PathBuf,
    pub grpc_port: u16,
    pub config: PathBuf,
}

impl NodeSpec {
    pub fn nvlog(&self) -> PathBuf {
        self.dir.join("nvlog")
    }
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }
}

/// A running daemon, killed if the test ends before stopping it.
pub struct Daemon {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The `/metrics` address.
    pub metrics: String,
    /// The NBD export's address.
    pub nbd: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: [NodeSpec; 2],
    pub procs: [Option<Daemon>; 2],
    /// The fault-injecting proxies of `with_links`.
    pub links: Option<[FaultProxy; 2]>,
    /// Extra environment of each node's process (fault-injection switches).
    pub env: [Vec<(String, String)>; 2],
}

fn write_config(spec: &NodeSpec, partner: &NodeSpec, partner_address: &str, settings: &Settings) {
    std::fs::create_dir_all(&spec.dir).unwrap();
    let text = format!(
        r#"cluster_id = "00112233445566778899aabbccddeeff"
node_id = {id}
site = "{site}"
shelf_dir = "{dir}/shelf"

[dr_partner]
node_id = {partner_id}
address = "{partner_address}"

[nvlog]
path = "{dir}/nvlog"
size_mib = {mib}
durability = "{durability}"

[listen]
grpc = "127.0.0.1:{port}"
metrics = "127.0.0.1:0"
nbd = "127.0.0.1:0"

[timers]
mirror_timeout_ms = {timeout}
cp_interval_ms = {cp}
keepalive_interval_ms = 200
keepalive_timeout_ms = 1500
margin_ms = 1000

[resync]
max_bytes_per_second = {resync}
"#,
        id = spec.id,
        site = spec.site,
        dir = spec.dir.display(),
        partner_id = partner.id,
        partner_address = partner_address,
        mib = settings.nvlog_mib,
        durability = settings.durability,
        port = spec.grpc_port,
        timeout = settings.mirror_timeout_ms,
        cp = settings.cp_interval_ms,
        resync = settings.resync_bytes_per_second,
    );
    let text = match settings.mediator.as_ref().map(|m| &m[usize::from(spec.site == "B")]) {
        Some(address) => format!(
            "{text}\n[mediator]\naddress = \"{address}\"\nheartbeat_ms = 200\nlease_ms = 2000\nauso_window_ms = 5000\n"
        ),
        None => text,
    };
    std::fs::write(&spec.config, text).unwrap();
}

impl Cluster {
    /// Writes the configs of nodes 1 (site A) and 2 (site B); starts nothing.
    pub fn new(settings: &Settings) -> Cluster {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let spec = |id: u32, site: &'static str| {
            let node_dir = dir.path().join(site);
            NodeSpec {
                id,
                site,
                config: node_dir.join("controller.toml"),
                dir: node_dir,
                grpc_port: free_port(),
            }
        };
        let nodes = [spec(1, "A"), spec(2, "B")];
        write_config(&nodes[0], &nodes[1], &nodes[1].address(), settings);
        write_config(&nodes[1], &nodes[0], &nodes[0].address(), settings);
        Cluster { dir, nodes, procs: [None, None], links: None, env: [Vec::new(), Vec::new()] }
    }

    /// As `new`, with every inter-site connection through a fault-injecting proxy:
    /// `links[0]` carries what A dials (its NVLog mirror to B), `links[1]` what B dials.
    pub async fn with_links(settings: &Settings) -> Cluster {
        let mut cluster = Cluster::new(settings);
        let to = |i: usize| cluster.nodes[i].address().parse().unwrap();
        let to_b = FaultProxy::start(to(1)).await.unwrap();
        let to_a = FaultProxy::start(to(0)).await.unwrap();
        write_config(&cluster.nodes[0], &cluster.nodes[1], &to_b.address().to_string(), settings);
        write_config(&cluster.nodes[1], &cluster.nodes[0], &to_a.address().to_string(), settings);
        cluster.links = Some([to_b, to_a]);
        cluster
    }

    /// The proxy of what node `i` dials.
    pub fn link(&self, i: usize) -> &FaultProxy {
        &self.links.as_ref().expect("a cluster started with_links")[i]
    }

    /// As `up`, with the inter-site links through the fault-injecting proxies (`with_links`).
    pub async fn up_with_links(settings: &Settings, volume_bytes: u64) -> Cluster {
        let mut cluster = Cluster::with_links(settings).await;
        cluster.start(0);
        cluster.start(1);
        cluster.wait_state(0, "serving").await;
        cluster.create_volume(0, volume_bytes).await;
        cluster
    }

    /// Waits until A's DR mirror is in sync (in memory and in its persisted account), its
    /// aggregate `mirrored,normal`, and B's receiver in sync.
    pub async fn wait_in_sync(&self) {
        let local_in_sync = |s: &StatusReply| {
            s.partitions.iter().any(|p| p.kind == "local" && p.mirror_state == MirrorState::InSync as i32)
        };
        self.wait_status(0, "A's mirror in sync and its plexes normal", |s| {
            s.dr_mirror.as_ref().is_some_and(|m| m.state == MirrorState::InSync as i32)
                && local_in_sync(s)
                && s.aggregates.first().is_some_and(|a| a.state == "mirrored,normal")
        })
        .await;
        self.wait_status(1, "B's receiver in sync", |s| {
            s.partitions
                .iter()
                .any(|p| p.kind == "dr_partner" && p.mirror_state == MirrorState::InSync as i32)
        })
        .await;
    }

    /// Both nodes started and serving, with aggregate `aggr_a` and volume `vol_a` of
    /// `volume_bytes` at A.
    pub async fn up(settings: &Settings, volume_bytes: u64) -> Cluster {
        let mut cluster = Cluster::new(settings);
        cluster.start_serving(volume_bytes).await;
        cluster
    }

    /// As `up`, with B's NVLog receiver storage stalled (a gray disk: keepalives answered,
    /// records, releases and announcements queued) while the returned file exists.
    pub async fn up_with_receiver_stall_switch(settings: &Settings, volume_bytes: u64) -> (Cluster, PathBuf) {
        let mut cluster = Cluster::new(settings);
        let stall = cluster.dir.path().join("stall-b-receiver");
        cluster.env[1].push(("MC_FAULT_RECEIVER_STALL_FILE".into(), stall.display().to_string()));
        cluster.start_serving(volume_bytes).await;
        (cluster, stall)
    }

    async fn start_serving(&mut self, volume_bytes: u64) {
        self.start(0);
        self.start(1);
        self.wait_state(0, "serving").await;
        self.create_volume(0, volume_bytes).await;
    }

    /// Starts node `i` (0: A, 1: B) and waits until it listens.
    pub fn start(&mut self, i: usize) {
        assert!(self.procs[i].is_none(), "node {i} runs already");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut child = Command::new(env!("CARGO_BIN_EXE_mc-controller"))
                .arg("--config")
                .arg(&self.nodes[i].config)
                .env("RUST_LOG", "info")
                .envs(self.env[i].iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            let (tx, rx) = std::sync::mpsc::channel();
            let stdout = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            let stderr = child.stderr.take().unwrap();
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            if let Ok(line) = rx.recv_timeout(DEADLINE) {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|word| word.strip_prefix(name))
                        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                        .to_string()
                };
                let (metrics, nbd) = (field("metrics="), field("nbd="));
                self.procs[i] = Some(Daemon { child, log, metrics, nbd });
                return;
            }
            // The port may still be held by the killed process for a moment; anything else
            // is a failure at once.
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(50));
            let lines = log.lock().unwrap().join("\n");
            assert!(
                lines.contains("bind grpc") && Instant::now() < deadline,
                "node {i} did not start:\n{lines}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `kill -9` of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut daemon) = self.procs[i].take() {
            daemon.child.kill().unwrap();
            daemon.child.wait().unwrap();
        }
    }

    /// SIGTERM to node `i`, and waits for it to exit; returns whether it exited 0.
    pub fn terminate(&mut self, i: usize) -> bool {
        let Some(mut daemon) = self.procs[i].take() else { return true };
        let pid = i32::try_from(daemon.child.id()).unwrap();
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let started = Instant::now();
        loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(started.elapsed() < DEADLINE, "node {i} did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `i`'s `/metrics` text.
    pub fn scrape(&self, i: usize) -> String {
        use std::io::{Read, Write};
        let address = &self.procs[i].as_ref().unwrap().metrics;
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    /// Node `i`'s log lines so far.
    pub fn log(&self, i: usize) -> String {
        self.procs[i].as_ref().map(|d| d.log.lock().unwrap().join("\n")).unwrap_or_default()
    }

    pub async fn channel(&self, i: usize) -> Channel {
        Channel::from_shared(format!("http://{}", self.nodes[i].address())).unwrap().connect().await.unwrap()
    }

    pub async fn admin(&self, i: usize) -> AdminClient<Channel> {
        AdminClient::new(self.channel(i).await).max_decoding_message_size(64 << 20)
    }

    pub async fn data(&self, i: usize) -> DataClient<Channel> {
        DataClient::new(self.channel(i).await).max_decoding_message_size(4 << 20)
    }

    pub async fn status(&self, i: usize) -> StatusReply {
        let mut admin = self.admin(i).await;
        admin.status(StatusRequest { cluster_id: CLUSTER.to_vec() }).await.unwrap().into_inner()
    }

    /// Waits until node `i` reports `state` (e.g. "serving").
    pub async fn wait_state(&self, i: usize, state: &str) -> StatusReply {
        let started = Instant::now();
        loop {
            let status = self.status(i).await;
            if status.node_state == state {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "node {i} is {} ({}), not {state}\n{}",
                status.node_state,
                status.state_reason,
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `check` holds for node `i`'s status.
    pub async fn wait_status(
        &self,
        i: usize,
        what: &str,
        check: impl Fn(&StatusReply) -> bool,
    ) -> StatusReply {
        let started = Instant::now();
        loop {
            let status = self.status(i).await;
            if check(&status) {
                return status;
            }
            assert!(started.elapsed() < DEADLINE, "node {i}: {what} never held: {status:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates aggregate `aggr_a` (one 64 MiB disk per plex) with volume `vol_a` of `size` at A.
    pub async fn create_volume(&self, i: usize, size: u64) {
        self.create_volume_on(i, 64 << 20, size).await;
    }

    /// Node `i`'s NBD URI of `volume`.
    pub fn nbd_uri(&self, i: usize, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.procs[i].as_ref().unwrap().nbd)
    }

    /// Node `i`'s NBD address.
    pub fn nbd_address(&self, i: usize) -> String {
        self.procs[i].as_ref().unwrap().nbd.clone()
    }

    /// As `create_volume`, with disks of `disk_bytes`.
    pub async fn create_volume_on(&self, i: usize, disk_bytes: u64, size: u64) {
        let mut admin = self.admin(i).await;
        admin
            .create_aggregate(CreateAggregateRequest {
                cluster_id: CLUSTER.to_vec(),
                name: "aggr_a".into(),
                plex0_disks: vec!["d0".into()],
                plex1_disks: vec!["d1".into()],
                disk_size_bytes: disk_bytes,
            })
            .await
            .unwrap();
        admin
            .create_volume(CreateVolumeRequest {
                cluster_id: CLUSTER.to_vec(),
                aggregate: "aggr_a".into(),
                name: "vol_a".into(),
                size_bytes: size,
            })
            .await
            .unwrap();
    }

    /// Every record of `partition` at node `i`, with payloads.
    pub async fn records(&self, i: usize, partition: &str) -> Vec<PartitionRecord> {
        let mut admin = self.admin(i).await;
        let mut out: Vec<PartitionRecord> = Vec::new();
        loop {
            let after = out.last().map_or(0, |r| r.lsn);
            let reply = admin
                .partition_records(PartitionRecordsRequest {
                    cluster_id: CLUSTER.to_vec(),
                    partition: partition.into(),
                    after_lsn: after,
                    max_records: 256,
                    with_payload: true,
                })
                .await
                .unwrap()
                .into_inner();
            out.extend(reply.records);
            if !reply.more {
                return out;
            }
        }
    }
}

impl Cluster {
    /// Waits for a workload task to end after its stop flag was set; a write stuck for
    /// `DEADLINE` fails the test with both daemons' logs.
    pub async fn finish(&self, load: tokio::task::JoinHandle<()>) {
        match tokio::time::timeout(DEADLINE, load).await {
            Ok(result) => result.unwrap(),
            Err(_) => {
                let tail = |i: usize| {
                    let log = self.log(i);
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(400)..].join("\n")
                };
                panic!(
                    "a write is stuck after the workload stopped\n--- A ---\n{}\n--- B ---\n{}",
                    tail(0),
                    tail(1)
                );
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill(0);
        self.kill(1);
    }
}

/// A 4 KiB block that says which block it is and which write put it there.
pub fn block_data(block: u64, write: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    for (i, chunk) in data.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..16].copy_from_slice(&(write ^ (i as u64) << 48).to_le_bytes());
    }
    data
}

/// What the checker knows of each block: the last acknowledged write, and writes that were
/// sent after it without an answer (they may or may not have landed).
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub blocks: HashMap<u64, (Option<u64>, Vec<u64>)>,
    pub acked: u64,
}

/// Waits until `model` counts more than `above` acknowledged writes; fails with `what` after
/// 30 seconds.
pub async fn wait_acked(model: &Arc<Mutex<Model>>, above: u64, what: &str) {
    let started = Instant::now();
    while model.lock().unwrap().acked <= above {
        assert!(started.elapsed() < Duration::from_secs(30), "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Model {
    pub fn sent(&mut self, block: u64, write: u64) {
        self.blocks.entry(block).or_default().1.push(write);
    }
    pub fn acked(&mut self, block: u64, write: u64) {
        let entry = self.blocks.entry(block).or_default();
        // Writes to one block are sent one at a time (the workload keeps one per block), so an
        // ack settles every earlier uncertainty of that block.
        entry.0 = Some(write);
        entry.1.clear();
        self.acked += 1;
    }

    /// Checks every block read back; returns how many were checked.
    pub async fn check(&self, data: &mut DataClient<Channel>, volume: &str) -> usize {
        for (&block, (acked, maybe)) in &self.blocks {
            let read = data
                .read(ReadRequest {
                    cluster_id: CLUSTER.to_vec(),
                    volume: volume.into(),
                    offset: block * BLOCK,
                    length: BLOCK,
                })
                .await
                .unwrap()
                .into_inner()
                .data;
            let mut allowed: Vec<Option<u64>> = maybe.iter().copied().map(Some).collect();
            allowed.push(*acked);
            let ok = allowed.iter().any(|w| match w {
                Some(w) => read == block_data(block, *w),
                None => read.iter().all(|&b| b == 0),
            });
            assert!(
                ok,
                "block {block}: read {:?}…, expected the acknowledged write {acked:?} or one of {maybe:?}",
                &read[..16]
            );
        }
        self.blocks.len()
    }
}

/// Writes unique values to random blocks of `volume` with `depth` writers (one write per block
/// at a time) until `stop` is set or a write fails; records everything in `model`.
pub async fn workload(
    cluster_data: DataClient<Channel>,
    volume: &str,
    blocks: u64,
    depth: usize,
    model: Arc<Mutex<Model>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    first_write: u64,
) {
    workload_in(cluster_data, volume, 0..blocks, depth, model, stop, first_write).await;
}

/// `workload` over the blocks of `range` only.
pub async fn workload_in(
    cluster_data: DataClient<Channel>,
    volume: &str,
    range: std::ops::Range<u64>,
    depth: usize,
    model: Arc<Mutex<Model>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    first_write: u64,
) {
    let busy = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(first_write));
    let mut tasks = Vec::new();
    for worker in 0..depth {
        let (mut data, model, stop, busy, counter) =
            (cluster_data.clone(), model.clone(), stop.clone(), busy.clone(), counter.clone());
        let volume = volume.to_string();
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(rand::random());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let block = loop {
                    let block = rand::Rng::random_range(&mut rng, range.clone());
                    if busy.lock().unwrap().insert(block) {
                        break block;
                    }
                };
                let write = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                model.lock().unwrap().sent(block, write);
                let result = data
                    .write(WriteRequest {
                        cluster_id: CLUSTER.to_vec(),
                        volume: volume.clone(),
                        offset: block * BLOCK,
                        data: block_data(block, write),
                    })
                    .await;
                match result {
                    Ok(_) => model.lock().unwrap().acked(block, write),
                    Err(_) => {
                        busy.lock().unwrap().remove(&block);
                        return;
                    }
                }
                busy.lock().unwrap().remove(&block);
                let _ = worker;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// The path of a node's NVLog.
pub fn nvlog_path(cluster: &Cluster, i: usize) -> &Path {
    &cluster.nodes[i].dir
}

impl Cluster {
    /// Sends `signal` to node `i` (SIGSTOP/SIGCONT to pause and resume it).
    pub fn signal(&self, i: usize, signal: i32) {
        let pid = i32::try_from(self.procs[i].as_ref().unwrap().child.id()).unwrap();
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        if signal == libc::SIGSTOP {
            // Delivery is asynchronous: wait until the process is seen stopped.
            let started = Instant::now();
            loop {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                let state = stat.rsplit(')').next().unwrap_or("").split_whitespace().next().unwrap_or("");
                if state == "T" {
                    return;
                }
                assert!(started.elapsed() < DEADLINE, "node {i} did not stop");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Writes `data` at `offset` of `vol_a` on node `i`; returns the last lsn.
pub async fn write_at(
    data: &mut DataClient<Channel>,
    offset: u64,
    bytes: Vec<u8>,
) -> Result<u64, tonic::Status> {
    data.write(WriteRequest { cluster_id: CLUSTER.to_vec(), volume: "vol_a".into(), offset, data: bytes })
        .await
        .map(|r| r.into_inner().last_lsn)
}

/// Reads `length` bytes at `offset` of `vol_a`.
pub async fn read_at(
    data: &mut DataClient<Channel>,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>, tonic::Status> {
    data.read(ReadRequest { cluster_id: CLUSTER.to_vec(), volume: "vol_a".into(), offset, length })
        .await
        .map(|r| r.into_inner().data)
}

/// Flips bytes in the middle of the first occurrence of `pattern` in `file`; returns whether it
/// was found.
pub fn damage(file: &Path, pattern: &[u8]) -> bool {
    let mut bytes = std::fs::read(file).unwrap();
    let Some(at) = bytes.windows(pattern.len()).position(|w| w == pattern) else { return false };
    for b in &mut bytes[at + pattern.len() / 2..at + pattern.len() / 2 + 64] {
        *b ^= 0xff;
    }
    std::fs::write(file, bytes).unwrap();
    true
}
