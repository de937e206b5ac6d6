//! The disaster drill of issue 8 through the operator's tool, on the lab: a host writes to
//! vol_a at site A; `mcctl lab kill --site A`; `mcctl switchover --forced-on-disaster` at B.
//! Checks the exit codes (vetoed while A is up, success after), the JSON of `switchover`,
//! `cluster show`, `operation show` and `volume show`, and that every acknowledged write is
//! served by B over NBD. The labs have no mediator (`--no-mediator`): these are the operator's
//! switchovers without one (with a mediator, B would switch A over by itself once A's lease
//! lapsed, and the epochs of a negotiated switchover are not raised by the mediator yet).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod host;
mod lab_support;

use host::{Host, Workload};
use lab_support::{LabGuard, NO_MEDIATOR, mcctl, mcctl_json, mcctl_ok, up_args};
use serde_json::Value;

fn json_of(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// Prevents a switchover command that reports success without serving the volume, loses
/// acknowledged writes, or exits with a code scripts cannot tell from a veto.
#[test]
fn forced_switchover_drill_through_mcctl() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = temp.path().join("lab");
    let _guard = LabGuard { dir: dir.clone() };
    let d = dir.to_str().unwrap();
    let up = mcctl_json(&up_args(d, NO_MEDIATOR));
    let nbd = |site: &str| {
        up["controllers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["site"] == site)
            .and_then(|c| c["nbd"].as_str())
            .unwrap_or_else(|| panic!("no nbd address for site {site}: {up:#}"))
            .to_string()
    };
    let (nbd_a, nbd_b) = (nbd("A"), nbd("B"));

    // A is up: vetoed (exit 3), with the reason.
    let vetoed =
        mcctl(&["switchover", "--forced-on-disaster", "--confirm", "--site", "B", "--lab", d, "-o", "json"]);
    assert_eq!(vetoed.status.code(), Some(3), "{vetoed:?}");
    let vetoed = json_of(&vetoed);
    assert_eq!(vetoed["vetoed"], true, "{vetoed:#}");
    assert!(
        vetoed["vetoes"].as_array().unwrap().iter().any(|v| v["code"] == "partner_reachable"),
        "{vetoed:#}"
    );

    let load = Workload::start(&nbd_a, "vol_a", 256);
    load.wait_count(300);
    mcctl_ok(&["lab", "kill", "--site", "A", "--dir", d]);
    let ledger = load.stop();

    let started = std::time::Instant::now();
    let done = mcctl_json(&[
        "switchover",
        "--forced-on-disaster",
        "--confirm",
        "--site",
        "B",
        "--lab",
        d,
        "-o",
        "json",
    ]);
    eprintln!("mcctl switchover took {:?}", started.elapsed());
    assert_eq!(done["vetoed"], false, "{done:#}");
    assert_eq!(done["operation"]["state"], "successful", "{done:#}");
    assert!(done["volumes"].as_array().unwrap().iter().any(|v| v == "vol_a"), "{done:#}");
    assert!(done["nvfailed_volumes"].as_array().unwrap().is_empty(), "{done:#}");

    let mut host = Host::connect(&nbd_b, "vol_a").unwrap();
    let wrong = host::missing(&mut host, &ledger);
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
    host.close();

    // A does not answer: cluster show exits 1 but says switchover.
    let cluster = mcctl(&["cluster", "show", "--lab", d, "-o", "json"]);
    let cluster = json_of(&cluster);
    assert_eq!(cluster["cluster"]["mode"], "switchover", "{cluster:#}");
    let operations = json_of(&mcctl(&["operation", "show", "--lab", d, "-o", "json"]));
    let ops = operations["operations"].as_array().unwrap();
    assert!(ops.iter().any(|o| o["kind"] == "switchover" && o["state"] == "successful"), "{operations:#}");
    let volumes = json_of(&mcctl(&["volume", "show", "vol_a", "--lab", d, "-o", "json"]));
    let vol_a = &volumes["volumes"][0];
    assert_eq!(vol_a["in_nvfailed_state"], false, "{volumes:#}");
}

/// Planned maintenance through `mcctl` on the lab: a negotiated switchover (no
/// `--forced-on-disaster`) moves vol_a to B while both sites run; without `--site` it is bad
/// usage; every write acknowledged at A is served by B, and nothing is NVFAILed. Then the way
/// home: switchback vetoed before heal, `heal` (waiting for the resync), `switchback --simulate`,
/// `switchback` with every write B acknowledged at A, the cluster normal again and the three
/// operations in `operation history`; last, `mirror pause` makes `check run` warn and
/// `mirror resume` clears it.
#[test]
fn negotiated_switchover_through_mcctl() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = temp.path().join("lab");
    let _guard = LabGuard { dir: dir.clone() };
    let d = dir.to_str().unwrap();
    let up = mcctl_json(&up_args(d, NO_MEDIATOR));
    let nbd = |site: &str| {
        up["controllers"].as_array().unwrap().iter().find(|c| c["site"] == site).unwrap()["nbd"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(mcctl(&["switchover", "--lab", d]).status.code(), Some(2));
    let load = Workload::start(&nbd("A"), "vol_a", 256);
    load.wait_count(300);
    let done = mcctl_json(&["switchover", "--site", "B", "--lab", d, "-o", "json"]);
    assert_eq!(done["operation"]["state"], "successful", "{done:#}");
    assert!(done["volumes"].as_array().unwrap().iter().any(|v| v == "vol_a"), "{done:#}");
    assert!(done["nvfailed_volumes"].as_array().unwrap().is_empty(), "{done:#}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while load.ledger.lock().unwrap().ended.is_none() {
        assert!(std::time::Instant::now() < deadline, "A went on acknowledging after the release");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ledger = load.stop();
    let mut host = Host::connect(&nbd("B"), "vol_a").unwrap();
    let wrong = host::missing(&mut host, &ledger);
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
    let cluster = json_of(&mcctl(&["cluster", "show", "--lab", d, "-o", "json"]));
    assert_eq!(cluster["cluster"]["mode"], "switchover", "{cluster:#}");

    // Switchback before heal: vetoed (exit 3), nothing changes.
    let early = mcctl(&["switchback", "--lab", d, "-o", "json"]);
    assert_eq!(early.status.code(), Some(3), "{}", String::from_utf8_lossy(&early.stderr));
    let early = json_of(&early);
    assert!(early["vetoes"].as_array().unwrap().iter().any(|v| v["code"] == "not_healed"), "{early:#}");
    // Heal waits for the resync and says so.
    let healed = mcctl(&["heal", "--lab", d, "-o", "json"]);
    let stderr = String::from_utf8_lossy(&healed.stderr).to_string();
    assert_eq!(healed.status.code(), Some(0), "{stderr}");
    let healed = json_of(&healed);
    assert_eq!(healed["operation"]["kind"], "heal", "{healed:#}");
    assert_eq!(healed["aggregates"][0]["reattached"], true, "{healed:#}");
    assert!(stderr.contains("resync complete"), "{stderr}");
    let simulated = mcctl_json(&["switchback", "--simulate", "--lab", d, "-o", "json"]);
    assert_eq!(simulated["vetoed"], false, "{simulated:#}");
    // Switchback: vol_a home at A with every write B acknowledged.
    let load = Workload::start(&nbd("B"), "vol_a", 256);
    load.wait_count(200);
    let back = mcctl_json(&["switchback", "--lab", d, "-o", "json"]);
    assert_eq!(back["operation"]["state"], "successful", "{back:#}");
    assert!(back["volumes"].as_array().unwrap().iter().any(|v| v == "vol_a"), "{back:#}");
    assert!(
        load.wait_ended(std::time::Duration::from_secs(30)),
        "B went on acknowledging after the switchback"
    );
    let ledger = load.stop();
    let mut host = Host::connect(&nbd("A"), "vol_a").unwrap();
    let wrong = host::missing(&mut host, &ledger);
    assert!(wrong.is_empty(), "acknowledged writes lost: {wrong:?}");
    host.close();
    let cluster = json_of(&mcctl(&["cluster", "show", "--lab", d, "-o", "json"]));
    assert_eq!(cluster["cluster"]["mode"], "normal", "{cluster:#}");
    let history = mcctl_json(&["operation", "history", "--lab", d, "-o", "json"]);
    let kinds: Vec<&str> =
        history["operations"].as_array().unwrap().iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in ["switchover", "heal", "switchback"] {
        assert!(kinds.contains(&kind), "{kind} missing from the history: {history:#}");
    }

    // Mirror pause: `check run` warns about the degraded aggregate; resume clears it.
    let paused = mcctl_json(&["mirror", "pause", "vol_a", "--lab", d, "-o", "json"]);
    assert_eq!(paused["aggregate"], "aggr_a", "{paused:#}");
    let check = mcctl(&["check", "run", "--lab", d, "-o", "json"]);
    assert_eq!(check.status.code(), Some(1), "{}", String::from_utf8_lossy(&check.stdout));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("aggr_a"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let resumed = mcctl(&["mirror", "resume", "vol_a", "--lab", d]);
    assert_eq!(resumed.status.code(), Some(0), "{}", String::from_utf8_lossy(&resumed.stderr));
    let check = mcctl(&["check", "run", "--lab", d]);
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stdout));
}
