//! The `mc-controller` process (DESIGN §8, §12, §13): it starts from a config on ephemeral
//! ports, serves `grpc.health.v1` and `/metrics`, refuses a second daemon on its NVLog file,
//! stops cleanly on SIGTERM, recovers its NVLog on restart, and refuses bad configs by key.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("controller.toml");
    let text = format!(
        r#"cluster_id = "00112233445566778899aabbccddeeff"
node_id = 1
site = "A"
shelf_dir = "{dir}/shelf"
{extra}
[dr_partner]
node_id = 2
address = "127.0.0.1:1"

[nvlog]
path = "{dir}/nvlog"
size_mib = 16
durability = "power"

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
"#,
        dir = dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A running daemon, killed if the test fails before stopping it.
struct Daemon {
    child: Child,
    grpc: String,
    metrics: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mc-controller"))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(DEADLINE).expect("the daemon printed its addresses");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
            .to_string()
    };
    Daemon { grpc: field("grpc"), metrics: field("metrics"), child }
}

fn scrape(address: &str) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// `Admin.Status` as the daemon answers it, for the cluster id `cluster`.
async fn status(address: &str, cluster: Vec<u8>) -> Result<mc_proto::v1::StatusReply, tonic::Status> {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = mc_proto::v1::admin_client::AdminClient::new(channel);
    client.status(mc_proto::v1::StatusRequest { cluster_id: cluster }).await.map(tonic::Response::into_inner)
}

async fn health(address: &str) -> i32 {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    client.check(request).await.unwrap().into_inner().status
}

fn terminate(mut daemon: Daemon) -> std::process::ExitStatus {
    let pid = i32::try_from(daemon.child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let started = Instant::now();
    loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < DEADLINE, "the daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Multi-threaded: `terminate` blocks its thread, and the client's connection must still be
// able to answer the daemon's GOAWAY meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_health_and_metrics_and_stops_on_sigterm() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config(dir.path(), "");
    let daemon = start(&config);
    assert_eq!(health(&daemon.grpc).await, 1, "health is SERVING");
    // Admin.Status: both partitions, for our cluster only.
    let cluster: Vec<u8> = (0..16u8).map(|i| i * 0x11).collect();
    let reply = status(&daemon.grpc, cluster.clone()).await.unwrap();
    assert_eq!(reply.site, "A");
    assert_eq!(reply.identity.unwrap().sender_node, 1);
    let kinds: Vec<(String, u32)> =
        reply.partitions.iter().map(|p| (p.kind.clone(), p.writer_node)).collect();
    assert_eq!(kinds, [("local".to_string(), 1), ("dr_partner".to_string(), 2)]);
    let mut other = cluster.clone();
    other[0] ^= 1;
    assert_eq!(status(&daemon.grpc, other).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert_eq!(status(&daemon.grpc, vec![1, 2, 3]).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let metrics = scrape(&daemon.metrics);
    assert!(metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("controller_nvlog_size_bytes{partition=\"dr_partner\",writer=\"2\"}"),
        "{metrics}"
    );
    // A second daemon on the same NVLog file is refused (the file is locked), on other ports.
    let second =
        Command::new(env!("CARGO_BIN_EXE_mc-controller")).arg("--config").arg(&config).output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("NVLog"), "{stderr}");
    let status = terminate(daemon);
    assert!(status.success(), "exit after SIGTERM: {status}");
    // Restarted, it recovers the same NVLog.
    let daemon = start(&config);
    assert_eq!(health(&daemon.grpc).await, 1);
    assert!(terminate(daemon).success());
}

#[test]
fn bad_configs_are_refused_by_key() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (extra, key) in [("colour = \"blue\"", "colour"), ("", "")] {
        let config = config(dir.path(), extra);
        if key.is_empty() {
            // Impossible timers: keepalive timeout + margin not below mirror timeout - margin.
            let text = std::fs::read_to_string(&config)
                .unwrap()
                .replace("keepalive_timeout_ms = 600", "keepalive_timeout_ms = 4500");
            std::fs::write(&config, text).unwrap();
        }
        let output =
            Command::new(env!("CARGO_BIN_EXE_mc-controller")).arg("--config").arg(&config).output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let expected = if key.is_empty() { "timers.keepalive_timeout_ms" } else { key };
        assert!(stderr.contains(expected), "{stderr}");
    }
}
