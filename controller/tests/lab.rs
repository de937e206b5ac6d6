//! `mcctl lab` with the real binaries: a lab without a mediator brought up detached, inspected,
//! one site killed and started again, brought down and up again on the same directory, with data
//! written through the data API surviving each restart; the default lab with its mediator (found
//! by `mediator show --lab`, killed and started, stopped by `lab down` and by Ctrl-C of a
//! foreground `lab up`); and bad usage refused without a panic.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod lab_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lab_support::{
    LabGuard, NO_MEDIATOR, SMALL_MEDIATOR, mcctl, mcctl_json, mcctl_ok, running, running_mediator, up_args,
};
use mc_proto::v1::data_client::DataClient;
use mc_proto::v1::{ReadRequest, StatusRequest, WriteRequest};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

fn lab_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = temp.path().join(name);
    (temp, dir)
}

fn controller<'a>(status: &'a Value, site: &str) -> &'a Value {
    status["controllers"].as_array().unwrap().iter().find(|c| c["site"] == site).unwrap()
}

fn cluster_bytes(hex: &str) -> Vec<u8> {
    (0..16).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect()
}

async fn data_client(admin: &str) -> DataClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{admin}")).unwrap().connect().await.unwrap();
    DataClient::new(channel).max_decoding_message_size(4 << 20)
}

/// A 4 KiB block that names its offset and the round that wrote it.
fn block(offset: u64, round: u8) -> Vec<u8> {
    let mut data = vec![round; 4096];
    data[..8].copy_from_slice(&offset.to_le_bytes());
    data
}

async fn write(admin: &str, cluster: &[u8], offset: u64, data: Vec<u8>) {
    let mut client = data_client(admin).await;
    client
        .write(WriteRequest { cluster_id: cluster.to_vec(), volume: "vol_a".into(), offset, data })
        .await
        .unwrap();
}

async fn read(admin: &str, cluster: &[u8], offset: u64) -> Vec<u8> {
    let mut client = data_client(admin).await;
    client
        .read(ReadRequest { cluster_id: cluster.to_vec(), volume: "vol_a".into(), offset, length: 4096 })
        .await
        .unwrap()
        .into_inner()
        .data
}

/// Runs one qemu-io command on an NBD URI; fails the test unless it succeeded (a pattern that
/// does not match fails qemu-io's `read -P`).
fn qemu_io(uri: &str, command: &str) {
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", command, uri]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {command:?} on {uri}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `mcctl lab status` shows `check`.
fn wait_status(dir: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let status = mcctl_json(&["lab", "status", "--dir", dir, "-o", "json"]);
        if check(&status) {
            return status;
        }
        assert!(started.elapsed() < DEADLINE, "{what} never held: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lab's whole life, without a mediator (a site killed and started again must come back as
/// the owner of its aggregates; with a mediator its partner would switch them over once the
/// lease lapsed): `up` gives two serving controllers and two volumes; a site killed with
/// SIGKILL shows as not running and `start` brings it back to serving with its acknowledged
/// writes; `down` stops every process and a second `up` restarts the same lab (same cluster,
/// volumes and data). Prevents a lab whose pids, state file or restart path drift from what
/// runs, and a `--no-mediator` lab that is not the lab it was before the lab had a mediator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_status_kill_start_down_up() {
    let (_temp, dir) = lab_dir("lab");
    let _guard = LabGuard { dir: dir.clone() };
    let d = dir.to_str().unwrap();

    let up = mcctl_json(&up_args(d, NO_MEDIATOR));
    assert!(up.get("mediator").is_none(), "{up:#}");
    assert!(!dir.join("mediator").exists());
    let lab_json = std::fs::read_to_string(dir.join("lab.json")).unwrap();
    assert!(!lab_json.contains("mediator"), "{lab_json}");
    for site in ["A", "B"] {
        let config = std::fs::read_to_string(dir.join(site).join("controller.toml")).unwrap();
        assert!(!config.contains("[mediator]"), "{config}");
    }
    let volumes = up["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2, "{up:#}");
    for (volume, site) in volumes.iter().zip(["A", "B"]) {
        assert_eq!(volume["site"], site);
        let uri = volume["uri"].as_str().unwrap();
        assert!(
            uri.starts_with("nbd://127.0.0.1:") && uri.ends_with(volume["name"].as_str().unwrap()),
            "{uri}"
        );
    }
    assert_eq!(volumes[0]["name"], "vol_a");
    assert_eq!(volumes[1]["name"], "vol_b");
    let controllers = up["controllers"].as_array().unwrap();
    assert_eq!(controllers.len(), 2, "{up:#}");
    for (c, (node, site)) in controllers.iter().zip([(1, "A"), (2, "B")]) {
        assert_eq!(c["node"], node);
        assert_eq!(c["site"], site);
        assert!(c["admin"].as_str().unwrap().starts_with("127.0.0.1:"), "{c}");
        assert!(running(c["pid"].as_u64().unwrap()), "{c}");
    }
    let cluster_id = up["cluster_id"].as_str().unwrap().to_string();
    assert_eq!(cluster_id.len(), 32);
    let cluster = cluster_bytes(&cluster_id);
    let admin_a = controllers[0]["admin"].as_str().unwrap().to_string();

    let status = mcctl_json(&["lab", "status", "--dir", d, "-o", "json"]);
    for site in ["A", "B"] {
        let c = controller(&status, site);
        assert_eq!(c["running"], true, "{status:#}");
        assert_eq!(c["node_state"], "serving", "{status:#}");
    }
    assert!(status.get("mediator").is_none(), "{status:#}");
    assert!(mcctl_ok(&["lab", "status", "--dir", d]).contains("serving"));
    // A lab without a mediator: `mediator show --lab` and `lab kill --mediator` say so.
    for args in [&["mediator", "show", "--lab", d][..], &["lab", "kill", "--dir", d, "--mediator"]] {
        let out = mcctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("no mediator"), "{args:?}: {out:?}");
    }

    // Acknowledged writes to vol_a before the kill, through the data API and through NBD to
    // both volumes (vol_b's aggregate is B's, with its second plex at A).
    for offset in [0u64, 4096, 1 << 20] {
        write(&admin_a, &cluster, offset, block(offset, 1)).await;
    }
    let uris: Vec<String> = volumes.iter().map(|v| v["uri"].as_str().unwrap().to_string()).collect();
    for (uri, pattern) in uris.iter().zip(["0x61", "0x62"]) {
        qemu_io(uri, &format!("write -P {pattern} 2M 1M"));
    }
    let pid_a = controller(&status, "A")["pid"].as_u64().unwrap();
    mcctl_ok(&["lab", "kill", "--dir", d, "--site", "A"]);
    assert!(!running(pid_a), "pid {pid_a} still runs after lab kill");
    let status = mcctl_json(&["lab", "status", "--dir", d, "-o", "json"]);
    assert_eq!(controller(&status, "A")["running"], false, "{status:#}");
    assert_eq!(controller(&status, "B")["running"], true, "{status:#}");
    // Killing what is not running is refused, not a panic.
    let out = mcctl(&["lab", "kill", "--dir", d, "--site", "A"]);
    assert_eq!(out.status.code(), Some(1));

    let start = mcctl_json(&["lab", "start", "--dir", d, "--site", "A", "-o", "json"]);
    assert_eq!(start["node_state"], "serving", "{start:#}");
    let status = wait_status(d, "both serving after the restart of A", |s| {
        ["A", "B"].iter().all(|site| controller(s, site)["node_state"] == "serving")
    });
    assert_ne!(controller(&status, "A")["pid"].as_u64().unwrap(), pid_a);
    for offset in [0u64, 4096, 1 << 20] {
        assert_eq!(
            read(&admin_a, &cluster, offset).await,
            block(offset, 1),
            "offset {offset} after the restart"
        );
    }
    for (uri, pattern) in uris.iter().zip(["0x61", "0x62"]) {
        qemu_io(uri, &format!("read -P {pattern} 2M 1M"));
    }
    write(&admin_a, &cluster, 8192, block(8192, 2)).await;

    // Down stops both; a second up restarts the same lab.
    let pids: Vec<u64> = ["A", "B"].iter().map(|s| controller(&status, s)["pid"].as_u64().unwrap()).collect();
    mcctl_ok(&["lab", "down", "--dir", d]);
    for pid in &pids {
        assert!(!running(*pid), "pid {pid} still runs after lab down");
    }
    let status = mcctl_json(&["lab", "status", "--dir", d, "-o", "json"]);
    for site in ["A", "B"] {
        assert_eq!(controller(&status, site)["running"], false, "{status:#}");
        assert!(controller(&status, site)["pid"].is_null(), "{status:#}");
    }
    let again = mcctl_json(&["lab", "up", "--dir", d, "--detach", "-o", "json"]);
    assert_eq!(again["cluster_id"], cluster_id.as_str());
    assert_eq!(again["created"], false);
    assert_eq!(again["volumes"], up["volumes"]);
    // Up again while it runs is refused.
    let out = mcctl(&["lab", "up", "--dir", d, "--detach"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("running already"), "{out:?}");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{admin_a}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = mc_proto::v1::admin_client::AdminClient::new(channel);
    let reply = admin.status(StatusRequest { cluster_id: cluster.clone() }).await.unwrap().into_inner();
    let names: Vec<&str> =
        reply.aggregates.iter().flat_map(|a| &a.volumes).map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["vol_a"], "{reply:#?}");
    for (offset, round) in [(0u64, 1), (4096, 1), (1 << 20, 1), (8192, 2)] {
        assert_eq!(
            read(&admin_a, &cluster, offset).await,
            block(offset, round),
            "offset {offset} after down/up"
        );
    }
    for (uri, pattern) in uris.iter().zip(["0x61", "0x62"]) {
        qemu_io(uri, &format!("read -P {pattern} 2M 1M"));
    }
    mcctl_ok(&["lab", "down", "--dir", d]);
}

/// Waits until `mcctl mediator show --lab DIR -o json` shows `check`.
fn wait_mediator(dir: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let out = mcctl(&["mediator", "show", "--lab", dir, "-o", "json"]);
        if out.status.success() {
            let view: Value = serde_json::from_slice(&out.stdout).unwrap();
            if check(&view) {
                return view;
            }
            assert!(started.elapsed() < DEADLINE, "{what} never held: {view:#}");
        } else {
            assert!(
                started.elapsed() < DEADLINE,
                "the mediator never answered: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the mediator has heard both controllers (node 1 at A, node 2 at B) since it started.
fn heard_both(view: &Value) -> bool {
    let nodes = view["nodes"].as_array().unwrap();
    [(1, "A"), (2, "B")].iter().all(|(node, site)| {
        nodes.iter().any(|n| n["node"] == *node && n["site"] == *site && n["heard"] == true)
    })
}

/// The pids `DIR/lab.json` records: both controllers', then the mediator's.
fn lab_pids(dir: &Path) -> (Vec<u64>, u64) {
    let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap();
    let controllers =
        state["controllers"].as_array().unwrap().iter().map(|c| c["pid"].as_u64().unwrap()).collect();
    (controllers, state["mediator"]["pid"].as_u64().unwrap())
}

/// The default lab runs a mediator (DESIGN §12): `up` starts it before the controllers, whose
/// configurations name it, and reports it; `mediator show --lab` finds it through lab.json, and
/// it has heard both controllers and records both aggregates in sync; `lab status` shows it;
/// `lab kill --mediator` kills it while both controllers go on serving (DESIGN §10 rule 4) and
/// `lab start --mediator` brings it back; `lab down` stops it with the controllers; a foreground
/// `lab up` restarts it and its Ctrl-C stops everything. Prevents a lab whose mediator is not
/// started, not found, not reported, or outlives the lab.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_lab_runs_the_mediator() {
    lab_support::ensure_mediator_built();
    let (_temp, dir) = lab_dir("lab");
    let _guard = LabGuard { dir: dir.clone() };
    let d = dir.to_str().unwrap();

    let up = mcctl_json(&up_args(d, SMALL_MEDIATOR));
    let pid = up["mediator"]["pid"].as_u64().unwrap();
    assert!(running_mediator(pid), "{up:#}");
    let grpc = up["mediator"]["grpc"].as_str().unwrap().to_string();
    assert!(grpc.starts_with("127.0.0.1:"), "{up:#}");
    for site in ["A", "B"] {
        let config = std::fs::read_to_string(dir.join(site).join("controller.toml")).unwrap();
        assert!(config.contains("[mediator]") && config.contains(&grpc), "{config}");
    }
    let config = std::fs::read_to_string(dir.join("mediator").join("mediator.toml")).unwrap();
    assert!(config.contains("lease_ms = 2000") && config.contains("mirror_timeout_ms = 5000"), "{config}");

    let view = wait_mediator(d, "both controllers heard, both aggregates in sync", |view| {
        let aggregates = view["aggregates"].as_array().unwrap();
        heard_both(view) && aggregates.len() == 2 && aggregates.iter().all(|a| a["in_sync"] == true)
    });
    assert_eq!(view["state_lost"], false, "{view:#}");
    let table = mcctl_ok(&["mediator", "show", "--lab", d]);
    assert!(table.starts_with("Mediator: "), "{table}");
    let status = mcctl_json(&["lab", "status", "--dir", d, "-o", "json"]);
    assert_eq!(status["mediator"]["running"], true, "{status:#}");
    assert_eq!(status["mediator"]["state"], "answering", "{status:#}");
    assert_eq!(status["mediator"]["grpc"], grpc.as_str(), "{status:#}");
    assert!(mcctl_ok(&["lab", "status", "--dir", d]).contains("answering"));

    // The mediator lost: the controllers serve on, and the operator's tools say it is gone.
    let killed = mcctl_json(&["lab", "kill", "--dir", d, "--mediator", "-o", "json"]);
    assert_eq!(killed["mediator"]["how"], "sigkill", "{killed:#}");
    assert!(!running_mediator(pid), "pid {pid} still runs after lab kill --mediator");
    let status = mcctl_json(&["lab", "status", "--dir", d, "-o", "json"]);
    assert_eq!(status["mediator"]["running"], false, "{status:#}");
    assert_eq!(status["mediator"]["state"], "stopped", "{status:#}");
    let out = mcctl(&["mediator", "show", "--lab", d]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&grpc), "{out:?}");
    assert_eq!(mcctl(&["lab", "kill", "--dir", d, "--mediator"]).status.code(), Some(1));
    // Past the lease (2 s) without the mediator, both still serve: the DR partner's round trips
    // renew the lease (S6).
    std::thread::sleep(Duration::from_millis(2500));
    let status = mcctl_json(&["lab", "status", "--dir", d, "-o", "json"]);
    for site in ["A", "B"] {
        assert_eq!(controller(&status, site)["node_state"], "serving", "{status:#}");
    }
    qemu_io(up["volumes"][0]["uri"].as_str().unwrap(), "write -P 0x71 0 64k");

    let started = mcctl_json(&["lab", "start", "--dir", d, "--mediator", "-o", "json"]);
    let pid = started["mediator"]["pid"].as_u64().unwrap();
    assert!(running_mediator(pid), "{started:#}");
    assert_eq!(started["mediator"]["grpc"], grpc.as_str(), "{started:#}");
    assert_eq!(mcctl(&["lab", "start", "--dir", d, "--mediator"]).status.code(), Some(1));
    wait_mediator(d, "both controllers heard after the mediator's restart", heard_both);

    // Down stops the controllers, then the mediator.
    let (controllers, _) = lab_pids(&dir);
    let down = mcctl_json(&["lab", "down", "--dir", d, "-o", "json"]);
    assert_eq!(down["controllers"].as_array().unwrap().len(), 2, "{down:#}");
    assert_eq!(down["mediator"]["pid"], pid, "{down:#}");
    assert_eq!(down["mediator"]["how"], "sigterm", "{down:#}");
    assert!(!running_mediator(pid), "the mediator (pid {pid}) still runs after lab down");
    for pid in controllers {
        assert!(!running(pid), "pid {pid} still runs after lab down");
    }
    let status = mcctl_json(&["lab", "status", "--dir", d, "-o", "json"]);
    assert!(status["mediator"]["pid"].is_null(), "{status:#}");

    // `lab up` in the foreground restarts the whole lab, mediator included; Ctrl-C stops it all.
    let mut child = Command::new(lab_support::MCCTL)
        .args(["lab", "up", "--dir", d])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut seen = String::new();
    loop {
        let line =
            lines.next().unwrap_or_else(|| panic!("lab up ended before it was ready:\n{seen}")).unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("Ctrl-C") {
            break;
        }
    }
    assert!(seen.contains("mc-mediator") && seen.contains("mediator show --lab"), "{seen}");
    let (controllers, pid) = lab_pids(&dir);
    assert!(running_mediator(pid), "{seen}");
    wait_mediator(d, "both controllers heard after lab up", heard_both);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!running_mediator(pid), "the mediator (pid {pid}) still runs after Ctrl-C");
    for pid in controllers {
        assert!(!running(pid), "pid {pid} still runs after Ctrl-C");
    }
}

/// Bad usage and bad input exit non-zero with a message, never a panic: an unknown site, a
/// missing --dir, a DIR that is a file, a directory with no lab, a corrupt lab.json, a
/// non-empty directory that is not a lab.
#[test]
fn bad_usage_is_refused_with_a_message() {
    let (temp, dir) = lab_dir("none");
    let file = temp.path().join("file");
    std::fs::write(&file, "not a lab").unwrap();
    let f = file.to_str().unwrap();
    let d = dir.to_str().unwrap();
    let corrupt = temp.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("lab.json"), "{\"format\": 1, \"cluster_id\": 7").unwrap();
    let c = corrupt.to_str().unwrap();
    let busy = temp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let b = busy.to_str().unwrap();

    let cases: &[(&[&str], i32, &str)] = &[
        (&["lab", "kill", "--dir", d, "--site", "C"], 2, "unknown site"),
        (&["lab", "start", "--dir", d, "--site", "Z"], 2, "unknown site"),
        (&["lab", "status"], 2, "--dir"),
        (&["lab", "up", "--detach"], 2, "--dir"),
        (&["lab", "frobnicate"], 2, "frobnicate"),
        (&["lab", "up", "--dir", f, "--detach"], 1, "not a directory"),
        (&["lab", "status", "--dir", f], 1, "not a directory"),
        (&["lab", "down", "--dir", f], 1, "not a directory"),
        (&["lab", "status", "--dir", d], 1, "no lab"),
        (&["lab", "down", "--dir", d], 1, "no lab"),
        (&["lab", "kill", "--dir", d, "--site", "A"], 1, "no lab"),
        (&["lab", "status", "--dir", c], 1, "lab.json"),
        (&["lab", "up", "--dir", c, "--detach"], 1, "lab.json"),
        (&["lab", "up", "--dir", b, "--detach"], 1, "not empty"),
        (&["lab", "up", "--dir", d, "--detach", "--mirror-timeout-ms", "5000"], 1, "keepalive_timeout_ms"),
        // The product's lease does not fit a 5 s mirror timeout: the mediator's options are named.
        (
            &[
                "lab",
                "up",
                "--dir",
                d,
                "--detach",
                "--mirror-timeout-ms",
                "5000",
                "--keepalive-timeout-ms",
                "1500",
            ],
            1,
            "--lease-ms",
        ),
        (&["lab", "up", "--dir", d, "--detach", "--no-mediator", "--lease-ms", "2000"], 2, "--no-mediator"),
        (&["lab", "kill", "--dir", d], 2, "--mediator"),
        (&["lab", "start", "--dir", d, "--site", "A", "--mediator"], 2, "--mediator"),
        (&["lab", "kill", "--dir", d, "--mediator"], 1, "no lab"),
        (&["mediator", "show", "--lab", d], 1, "no lab"),
        (&["lab", "up", "--dir", d, "--detach", "--volume-size-mib", "0"], 1, "volume size"),
    ];
    for (args, code, message) in cases {
        let out = mcctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "mcctl {args:?}: {stderr}");
        assert!(stderr.contains(message), "mcctl {args:?}: {stderr:?} does not say {message:?}");
        assert!(!stderr.contains("panicked"), "mcctl {args:?} panicked: {stderr}");
    }
    // The refused attempts left nothing running and the file untouched.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a lab");
    assert!(!Path::new(d).join("lab.json").exists());
}
