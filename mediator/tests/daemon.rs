//! The real `mc-mediator` process (DESIGN §10, §14 level 4): started on 127.0.0.1 ephemeral
//! ports with a temporary state directory and the scaled timers of DESIGN §10.1 (lease 2 s,
//! margin 0.5 s, AUSO window 5 s), driven over gRPC by simulated controllers (node 1 at site
//! A owns one aggregate, node 2 at site B receives its NVLog mirror).
//!
//! Tests never measure time: they poll for a condition with a generous deadline. Every process
//! a test starts is killed when its guard drops (and by the kernel if the test process dies).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mc_proto::v1::mediator_client::MediatorClient;
use mc_proto::v1::{
    AggregateEpoch, ConfirmGrantRequest, Epoch, HeartbeatReply, HeartbeatRequest, Identity,
    MediatorShowReply, MediatorShowRequest, MediatorSwitchoverRequest, MirrorState, OwnedAggregate,
    PartnerAge, ReceivedMirror,
};
use tonic::transport::Channel;

const CLUSTER_HEX: &str = "6d65646961746f72746573746e6f6465";
/// The aggregate node 1 owns.
const AGG: [u8; 16] = [7; 16];
/// How long a liveness condition may take: generous (DESIGN §14), never a performance bound.
const DEADLINE: Duration = Duration::from_secs(30);
/// The scaled heartbeat interval of DESIGN §10.1.
const HEARTBEAT: Duration = Duration::from_millis(200);

fn cluster() -> Vec<u8> {
    (0..16).map(|i| u8::from_str_radix(&CLUSTER_HEX[2 * i..2 * i + 2], 16).unwrap()).collect()
}

/// A running `mc-mediator`: killed (SIGKILL) and reaped when dropped.
struct Daemon {
    child: Option<Child>,
    grpc: String,
    metrics: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts the binary on `config` and waits for its "listening" line.
    fn start(config: &Path) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mc-mediator"));
        command
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
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
        let mut daemon = Daemon { child: Some(child), grpc: String::new(), metrics: String::new(), log };
        let deadline = Instant::now() + DEADLINE;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("mc-mediator listening ") => {
                    for word in line.split_whitespace() {
                        if let Some(address) = word.strip_prefix("grpc=") {
                            daemon.grpc = address.to_string();
                        }
                        if let Some(address) = word.strip_prefix("metrics=") {
                            daemon.metrics = address.to_string();
                        }
                    }
                    return daemon;
                }
                Ok(_) => {}
                Err(_) => {
                    daemon.kill();
                    panic!("mc-mediator did not start listening:\n{}", daemon.log_text());
                }
            }
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    async fn client(&self) -> MediatorClient<Channel> {
        MediatorClient::connect(format!("http://{}", self.grpc)).await.unwrap()
    }

    /// SIGKILL: a crash, nothing flushed on the way out.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status (SIGKILL if it does not exit within the deadline).
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: signalling our own child, not yet reaped, so the pid names no other process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mc-mediator did not stop on SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The child gets SIGKILL if the test process dies, so no mediator outlives its test.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;

    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs the binary on `config`, expecting it to exit by itself: its status and stderr. A
/// mediator still running at the deadline is killed and the test fails.
fn run_to_exit(config: &Path) -> (ExitStatus, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mc-mediator"));
    command
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut command);
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, reader.join().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mc-mediator did not exit:\n{}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes the mediator's configuration in `dir` (state in `dir/state`) and returns its path.
fn write_config(dir: &Path) -> PathBuf {
    let state_dir = dir.join("state");
    let text = format!(
        r#"cluster_id = "{CLUSTER_HEX}"
state_dir = "{}"

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
"#,
        state_dir.display()
    );
    let path = dir.join("mediator.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("state").join("mediator.state")
}

/// A simulated controller: its heartbeat stamps and the state version it last saw.
struct Controller {
    node: u32,
    sequence: u64,
    state_version: u64,
}

impl Controller {
    fn new(node: u32) -> Controller {
        Controller { node, sequence: 0, state_version: 0 }
    }

    fn identity(&self) -> Option<Identity> {
        Some(Identity { cluster_id: cluster(), sender_node: self.node, receiver_node: 0 })
    }

    /// A drop record of `aggregate`, stamped from the heartbeat counter as a controller does.
    fn drop_record(&mut self, aggregate: [u8; 16]) -> mc_proto::v1::RecordDropRequest {
        self.sequence += 1;
        mc_proto::v1::RecordDropRequest {
            identity: self.identity(),
            aggregate_uuid: aggregate.to_vec(),
            log_generation: 1,
            sequence: self.sequence,
            plex_only: false,
        }
    }

    /// The next report: in sync, hearing its partner `heard_age` ago.
    fn report(&mut self, heard_age: Duration) -> HeartbeatRequest {
        self.sequence += 1;
        let partner = 3 - self.node;
        HeartbeatRequest {
            identity: self.identity(),
            log_generation: 1,
            sequence: self.sequence,
            state_version: self.state_version,
            uptime_ms: 600_000,
            mode: "normal".into(),
            fenced: false,
            partners: vec![PartnerAge {
                node: partner,
                heard: true,
                heard_age_ms: u64::try_from(heard_age.as_millis()).unwrap(),
                round_trip: true,
                round_trip_age_ms: u64::try_from(heard_age.as_millis()).unwrap(),
            }],
            owned: if self.node == 1 {
                vec![OwnedAggregate {
                    epoch: Some(AggregateEpoch {
                        aggregate_uuid: AGG.to_vec(),
                        epoch: Some(Epoch { number: 1, owner_node: 1 }),
                    }),
                    mirror: MirrorState::InSync as i32,
                    receiver_generation: 5,
                    plexes_normal: true,
                }]
            } else {
                Vec::new()
            },
            received: if self.node == 2 {
                vec![ReceivedMirror { writer: 1, partition_generation: 5, state: MirrorState::InSync as i32 }]
            } else {
                Vec::new()
            },
            epochs_seen: Vec::new(),
        }
    }

    /// Sends a heartbeat; remembers the state version of the reply, as a controller persists it.
    async fn heartbeat(
        &mut self,
        client: &mut MediatorClient<Channel>,
        heard_age: Duration,
    ) -> Result<HeartbeatReply, tonic::Status> {
        let request = self.report(heard_age);
        let reply = client.heartbeat(request).await?.into_inner();
        self.state_version = self.state_version.max(reply.state_version);
        Ok(reply)
    }
}

async fn show(client: &mut MediatorClient<Channel>) -> MediatorShowReply {
    client.show(MediatorShowRequest { cluster_id: cluster() }).await.unwrap().into_inner()
}

fn epoch_of(epochs: &[AggregateEpoch], aggregate: [u8; 16]) -> Option<(u64, u32)> {
    epochs
        .iter()
        .find(|e| e.aggregate_uuid == aggregate)
        .and_then(|e| e.epoch.as_ref())
        .map(|e| (e.number, e.owner_node))
}

/// Node 1 (site A) has gone silent at `a_last`; node 2 heartbeats every interval, hearing
/// nothing from A since then, until a reply carries a grant (or the deadline passes).
async fn b_heartbeats_until_granted(
    b: &mut Controller,
    client: &mut MediatorClient<Channel>,
    a_last: Instant,
    daemon: &Daemon,
) -> HeartbeatReply {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = b.heartbeat(client, a_last.elapsed()).await.unwrap();
        if reply.grant.is_some() {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "no grant for a lost site A:\n{:#?}\n{}",
            show(client).await,
            daemon.log_text()
        );
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// The raw text of `/metrics`.
async fn scrape(address: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: mediator\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

/// Prevents a mediator that answers without the lease or the state version the controllers
/// need (S6, DESIGN §10), and checks health, metrics and a clean stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_gets_the_lease_and_the_state_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(&write_config(dir.path()));
    let mut client = daemon.client().await;
    let mut a = Controller::new(1);
    let first = a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    assert_eq!(first.lease_ms, 2000);
    assert!(first.state_version >= 1, "{first:?}");
    assert_eq!(epoch_of(&first.epochs, AGG), Some((1, 1)));
    assert!(first.grant.is_none());
    let second = a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    assert!(second.state_version > first.state_version, "{first:?} then {second:?}");
    assert!(state_file(dir.path()).exists());

    let channel = Channel::from_shared(format!("http://{}", daemon.grpc)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "mc.v1.Mediator".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let text = scrape(&daemon.metrics).await;
    assert!(text.contains("mediator_heartbeats_total{node=\"1\"} 2"), "{text}");
    assert!(text.contains("mediator_persist_failures_total 0"), "{text}");
    assert!(text.contains("mediator_node_heard_age_seconds{node=\"1\"}"), "{text}");

    // Closed (by the runtime's other thread while this one waits), so the graceful stop does
    // not wait its drain timeout for them.
    drop((client, health));
    let status = daemon.terminate();
    assert!(status.success(), "{status}:\n{}", daemon.log_text());
}

/// Prevents a delayed old heartbeat from renewing a lease (S6): it is refused, not answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_heartbeat_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path()));
    let mut client = daemon.client().await;
    let mut a = Controller::new(1);
    a.sequence = 4;
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    for sequence in [5, 3] {
        let mut request = a.report(Duration::ZERO);
        request.sequence = sequence;
        let status = client.heartbeat(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("stale report"), "{}", status.message());
    }
    // A newer one is still answered.
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
}

/// Rule 2 and S7 end to end: site A goes silent while B reports not hearing it; after
/// lease + margin B's reply carries a grant of A's aggregate at a higher epoch; the mediator
/// says "site A lost"; the grant is durable before it is sent, so it is re-delivered after a
/// crash of the mediator (which then rebuilds its state, rule 5), until B confirms it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_site_is_switched_over_and_the_grant_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut daemon = Daemon::start(&config);
    let mut client = daemon.client().await;
    let (mut a, mut b) = (Controller::new(1), Controller::new(2));
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    let a_last = Instant::now();
    assert!(!show(&mut client).await.state_lost, "both controllers reported: the state is rebuilt");

    let reply = b_heartbeats_until_granted(&mut b, &mut client, a_last, &daemon).await;
    let grant = reply.grant.clone().unwrap();
    assert_eq!(
        (grant.to_node, grant.from_site.as_str(), grant.automatic, grant.nvfail),
        (2, "A", true, false)
    );
    assert_eq!(epoch_of(&grant.epochs, AGG), Some((2, 2)), "{grant:?}");
    assert_eq!(epoch_of(&reply.epochs, AGG), Some((2, 2)));
    let view = show(&mut client).await;
    assert!(view.diagnosis.starts_with("site A lost"), "{}", view.diagnosis);
    assert_eq!(view.pending_grants, vec![grant.clone()]);
    assert!(
        view.last_decision.contains("automatic switchover of site A to node 2"),
        "{}",
        view.last_decision
    );
    // Re-delivered on every reply until confirmed.
    let again = b.heartbeat(&mut client, a_last.elapsed()).await.unwrap();
    assert_eq!(again.grant.as_ref(), Some(&grant));

    // A crash: nothing is flushed on the way out.
    daemon.kill();
    let daemon = Daemon::start(&config);
    let mut client = daemon.client().await;
    let view = show(&mut client).await;
    // Rule 5: whatever file it read, a restarted mediator rebuilds (it cannot tell its file from
    // an older copy restored over it); a grant it had made is final and still re-delivered.
    assert!(view.state_lost, "a restarted mediator trusted its file:\n{}", daemon.log_text());
    assert_eq!(view.pending_grants, vec![grant.clone()]);
    let after = b.heartbeat(&mut client, a_last.elapsed()).await.unwrap();
    assert_eq!(after.grant.as_ref(), Some(&grant), "the grant did not survive the restart");
    assert!(after.state_version > again.state_version);
    let confirmed =
        client.confirm_grant(ConfirmGrantRequest { identity: b.identity() }).await.unwrap().into_inner();
    assert!(confirmed.grant.is_none());
    let later = b.heartbeat(&mut client, a_last.elapsed()).await.unwrap();
    assert!(later.grant.is_none(), "a confirmed grant was sent again");
    assert!(show(&mut client).await.pending_grants.is_empty());
}

/// Rule 5: a corrupt state file is neither used nor taken for an empty state: the restarted
/// mediator says its state is lost, keeps the damaged file aside, grants nothing (automatic or
/// manual) while only B reports, also across another crash, and grants again once both
/// controllers have reported, with an epoch above the one they report and a state version
/// above the lost one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_means_state_lost_until_both_report() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut daemon = Daemon::start(&config);
    let mut client = daemon.client().await;
    let (mut a, mut b) = (Controller::new(1), Controller::new(2));
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    let before = b.heartbeat(&mut client, Duration::ZERO).await.unwrap().state_version;
    assert!(!show(&mut client).await.state_lost);
    drop(client);
    let status = daemon.terminate();
    assert!(status.success(), "{status}:\n{}", daemon.log_text());

    let mut bytes = std::fs::read(state_file(dir.path())).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(state_file(dir.path()), &bytes).unwrap();

    let daemon = Daemon::start(&config);
    let mut client = daemon.client().await;
    let view = show(&mut client).await;
    assert!(view.state_lost, "a damaged state file was used:\n{}", daemon.log_text());
    let kept = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("mediator.state.damaged-"));
    assert!(kept, "the damaged file was not kept aside");
    assert!(daemon.log_text().contains("STATE IS LOST"), "{}", daemon.log_text());

    // Only B reports, long past lease + margin since A's last sign: nothing is granted.
    let a_last = Instant::now();
    for _ in 0..20 {
        let reply = b.heartbeat(&mut client, a_last.elapsed()).await.unwrap();
        assert!(reply.grant.is_none(), "granted while the state was lost: {reply:?}");
        tokio::time::sleep(HEARTBEAT).await;
    }
    // A crash in the middle of the rebuild does not end it: B's reports are not remembered.
    let mut daemon = daemon;
    daemon.kill();
    let daemon = Daemon::start(&config);
    let mut client = daemon.client().await;
    b.heartbeat(&mut client, a_last.elapsed()).await.unwrap();
    let view = show(&mut client).await;
    assert!(view.state_lost, "a restart ended the rebuild:\n{}", daemon.log_text());
    assert!(view.pending_grants.is_empty());
    let towards_b = view.auso.iter().find(|v| v.site == "B").unwrap();
    assert!(!towards_b.enabled && towards_b.reason.contains("lost"), "{towards_b:?}");
    let refused = client
        .request_switchover(MediatorSwitchoverRequest { identity: b.identity(), override_in_sync: true })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("lost"), "{}", refused.message());

    // A reports: the state is rebuilt, its version above the lost one.
    let rebuilt = a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    let a_last = Instant::now();
    assert!(rebuilt.state_version > before, "the state version went back: {before} then {rebuilt:?}");
    assert_eq!(epoch_of(&rebuilt.epochs, AGG), Some((1, 1)), "the epoch was not learned from A's report");
    assert!(!show(&mut client).await.state_lost);

    // Then A goes silent: the mediator grants again, above the epoch A reported.
    let reply = b_heartbeats_until_granted(&mut b, &mut client, a_last, &daemon).await;
    let grant = reply.grant.unwrap();
    assert_eq!(epoch_of(&grant.epochs, AGG), Some((2, 2)), "{grant:?}");
    let view = show(&mut client).await;
    assert!(view.diagnosis.starts_with("site A lost"), "{}", view.diagnosis);
}

/// Prevents two mediators from writing one state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_mediator_on_the_same_state_directory_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let _first = Daemon::start(&config);
    let (status, stderr) = run_to_exit(&config);
    assert!(!status.success());
    assert!(stderr.contains("another mc-mediator"), "{stderr}");
}

/// Prevents a bad configuration from starting a mediator: the binary fails and names the key.
#[test]
fn a_bad_configuration_is_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap().replace("lease_ms = 2000", "lease_ms = 500");
    let mut file = std::fs::File::create(&config).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let (status, stderr) = run_to_exit(&config);
    assert!(!status.success());
    assert!(stderr.contains("timers:") && stderr.contains("heartbeat"), "{stderr}");
}

/// Issue 10, scenario 10 (rule 3, S3): after A records a drop, nothing but the owner's report at
/// the current epoch makes the aggregate in sync again: not a replayed or older heartbeat of A
/// (refused as stale), not B's receiver saying `in_sync`, not A's report at an epoch the
/// mediator has since raised. The owner's report at the current epoch does (which shows the
/// checks above can see the record come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_drop_only_the_owners_report_at_the_current_epoch_restores_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path()));
    let mut client = daemon.client().await;
    let (mut a, mut b) = (Controller::new(1), Controller::new(2));
    let in_sync =
        |view: &MediatorShowReply| view.aggregates.iter().find(|v| v.uuid == AGG).is_some_and(|v| v.in_sync);
    let older = a.report(Duration::ZERO);
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    let applied = a.report(Duration::ZERO);
    client.heartbeat(applied.clone()).await.unwrap();
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    assert!(in_sync(&show(&mut client).await), "{:#?}", show(&mut client).await);

    let drop = a.drop_record(AGG);
    client.record_drop(drop).await.unwrap();
    assert!(!in_sync(&show(&mut client).await), "a recorded drop left the aggregate in sync");

    // Stale heartbeats of the owner, delivered after the drop: refused, nothing restored.
    for stale in [applied, older] {
        let status = client.heartbeat(stale).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(!in_sync(&show(&mut client).await), "a stale heartbeat made the aggregate in sync again");
    }
    // The receiver alone.
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    assert!(!in_sync(&show(&mut client).await), "the receiver's report made the aggregate in sync again");

    // The epoch moves on (B has seen epoch 2 of node 1, e.g. after a switchback): A's report at
    // epoch 1 is not the owner's at the current epoch.
    let mut raised = b.report(Duration::ZERO);
    raised.epochs_seen = vec![AggregateEpoch {
        aggregate_uuid: AGG.to_vec(),
        epoch: Some(Epoch { number: 2, owner_node: 1 }),
    }];
    let reply = client.heartbeat(raised).await.unwrap().into_inner();
    assert_eq!(epoch_of(&reply.epochs, AGG), Some((2, 1)));
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    assert!(!in_sync(&show(&mut client).await), "a report at an old epoch made the aggregate in sync again");

    // The owner's report at the current epoch, with the receiver's, restores it.
    let mut current = a.report(Duration::ZERO);
    current.owned[0].epoch.as_mut().unwrap().epoch = Some(Epoch { number: 2, owner_node: 1 });
    client.heartbeat(current).await.unwrap();
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    assert!(in_sync(&show(&mut client).await), "{:#?}", show(&mut client).await);
}

/// Issue 10, scenario 10, the race (rule 3, S3): a heartbeat A sent before its drop record
/// (saying `in_sync`, as it was when sent) and delivered after it, while B's receiver has not
/// noticed yet, must not make the aggregate in sync again: A may acknowledge writes alone as
/// soon as the drop is recorded, and an AUSO on that record would lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_sent_before_a_drop_and_delivered_after_it_does_not_restore_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path()));
    let mut client = daemon.client().await;
    let (mut a, mut b) = (Controller::new(1), Controller::new(2));
    let in_sync =
        |view: &MediatorShowReply| view.aggregates.iter().find(|v| v.uuid == AGG).is_some_and(|v| v.in_sync);
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    assert!(in_sync(&show(&mut client).await));
    // Sent before the drop, still on its way.
    let in_flight = a.report(Duration::ZERO);
    let drop = a.drop_record(AGG);
    client.record_drop(drop).await.unwrap();
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    // Delivered now: whether it is refused or applied, it must not undo the drop.
    let _ = client.heartbeat(in_flight).await;
    let view = show(&mut client).await;
    assert!(!in_sync(&view), "a heartbeat sent before the drop made the aggregate in sync again: {view:#?}");
}

/// Prevents a cancelled call from letting two writes of the state file race (S10; the service's
/// invariant that one lock serializes decisions and writes): when a cut mediator link comes
/// back, the heartbeats a controller gave up on arrive in a burst, each followed by its cancel.
/// The mediator must go on answering, and its state file must stay readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_never_make_state_writes_race() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let daemon = Daemon::start(&config);
    let mut client = daemon.client().await;
    let (mut a, mut b) = (Controller::new(1), Controller::new(2));
    a.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    b.heartbeat(&mut client, Duration::ZERO).await.unwrap();
    for round in 0..40u64 {
        let mut calls = Vec::new();
        for i in 0..8u64 {
            let mut request = tonic::Request::new(a.report(Duration::ZERO));
            // Deadlines around the time a state write takes, so some end in the middle of one.
            request.set_timeout(Duration::from_micros(200 + (round * 8 + i) * 37 % 3000));
            let mut client = client.clone();
            calls.push(tokio::spawn(async move { client.heartbeat(request).await }));
        }
        for call in calls {
            let _ = call.await.unwrap();
        }
    }
    let status = a.heartbeat(&mut client, Duration::ZERO).await;
    assert!(status.is_ok(), "the mediator stopped answering: {status:?}\n{}", daemon.log_text());
    drop(client);
    drop(daemon);
    // The file a restart reads is whole.
    let daemon = Daemon::start(&config);
    let mut client = daemon.client().await;
    // (A restarted mediator rebuilds whatever it read, rule 5: the file's version tells it was read.)
    let view = show(&mut client).await;
    assert!(view.state_version > 0, "the state file was not read back: {view:#?}\n{}", daemon.log_text());
    assert!(!daemon.log_text().contains("damaged"), "the state file was damaged:\n{}", daemon.log_text());
}
