//! `mcctl`'s admin commands against a real lab: `node show`, `cluster show`, `operation show`,
//! `aggregate show`, `plex show`, `volume create`, `volume show`, `mirror status` and
//! `check run|show` (a killed site reported as warnings) through `--lab`, a wrong
//! cluster id through `--endpoint` refused with exit code 1, and `--lab` with `--endpoint`, a
//! delete without `--confirm` or a forced switchover with both sites up refused as bad usage
//! (exit code 2). The lab has no mediator (`--no-mediator`): a killed site must stay a broken DR
//! mirror for the checks, not be switched over by the mediator.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod lab_support;

use std::time::{Duration, Instant};

use lab_support::{LabGuard, NO_MEDIATOR, mcctl, mcctl_env, mcctl_json, mcctl_ok, up_args};
use serde_json::Value;

/// The admin commands on a fresh lab: both nodes serving with their DR mirror, both aggregates
/// `mirrored,normal` with two plexes at opposite sites, a created volume found by `volume show`,
/// a wrong cluster id an error (exit 1, with a message) and not a panic or an empty success, and
/// two ways of finding the cluster at once bad usage (exit 2). Prevents commands that drift from
/// what the daemon reports or exit codes scripts cannot rely on.
#[test]
fn show_create_and_refusals() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = temp.path().join("lab");
    let _guard = LabGuard { dir: dir.clone() };
    let d = dir.to_str().unwrap();

    let up = mcctl_json(&up_args(d, NO_MEDIATOR));
    let cluster_id = up["cluster_id"].as_str().unwrap().to_string();
    let admin_a = up["controllers"][0]["admin"].as_str().unwrap().to_string();

    let nodes = mcctl_json(&["node", "show", "--lab", d, "-o", "json"]);
    let nodes = nodes["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:#?}");
    for (node, (id, site, partner)) in nodes.iter().zip([(1, "A", 2), (2, "B", 1)]) {
        assert_eq!(node["reachable"], true, "{node:#}");
        assert_eq!(node["node"], id, "{node:#}");
        assert_eq!(node["site"], site, "{node:#}");
        assert_eq!(node["state"], "serving", "{node:#}");
        assert_eq!(node["dr_mirror"]["partner_node"], partner, "{node:#}");
    }
    let table = mcctl_ok(&["node", "show", "--lab", d]);
    assert!(table.starts_with("NODE  SITE  STATE"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");

    // A fresh lab is in normal mode, every node too, and has run no operation.
    let cluster = mcctl_json(&["cluster", "show", "--lab", d, "-o", "json"]);
    assert_eq!(cluster["cluster"]["mode"], "normal", "{cluster:#}");
    let cluster_nodes = cluster["nodes"].as_array().unwrap();
    assert_eq!(cluster_nodes.len(), 2, "{cluster:#}");
    for node in cluster_nodes {
        assert_eq!(node["mode"], "normal", "{node:#}");
        assert_eq!(node["state"], "serving", "{node:#}");
    }
    let table = mcctl_ok(&["cluster", "show", "--lab", d]);
    assert!(table.starts_with("NODE  SITE  MODE") && table.ends_with("cluster mode: normal\n"), "{table}");
    let operations = mcctl_json(&["operation", "show", "--all", "--lab", d, "-o", "json"]);
    assert_eq!(operations, serde_json::json!({"operations": [], "unreachable": []}));
    assert_eq!(mcctl_ok(&["operation", "show", "--lab", d]), "no operations\n");

    let aggregates = mcctl_json(&["aggregate", "show", "--lab", d, "-o", "json"]);
    let aggregates = aggregates["aggregates"].as_array().unwrap();
    let names: Vec<&str> = aggregates.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["aggr_a", "aggr_b"], "{aggregates:#?}");
    for aggr in aggregates {
        assert_eq!(aggr["state"], "mirrored,normal", "{aggr:#}");
        assert_eq!(aggr["plex_count"], 2, "{aggr:#}");
        assert_eq!(aggr["uuid"].as_str().unwrap().len(), 32, "{aggr:#}");
        assert!(aggr["size_bytes"].as_u64().unwrap() >= 64 << 20, "{aggr:#}");
    }

    let plexes = mcctl_json(&["plex", "show", "aggr_a", "--lab", d, "-o", "json"]);
    let plexes = plexes["plexes"].as_array().unwrap();
    let sites: Vec<(&str, &str)> =
        plexes.iter().map(|p| (p["plex"].as_str().unwrap(), p["site"].as_str().unwrap())).collect();
    assert_eq!(sites, [("plex0", "A"), ("plex1", "B")], "{plexes:#?}");

    let created = mcctl_json(&[
        "volume",
        "create",
        "--lab",
        d,
        "--aggregate",
        "aggr_a",
        "--name",
        "vol_x",
        "--size-mib",
        "16",
        "-o",
        "json",
    ]);
    assert_eq!(created["volumes"][0]["name"], "vol_x", "{created:#}");
    let shown = mcctl_json(&["volume", "show", "vol_x", "--lab", d, "-o", "json"]);
    let volumes = shown["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 1, "{shown:#}");
    assert_eq!(volumes[0]["aggregate"], "aggr_a", "{shown:#}");
    assert_eq!(volumes[0]["node"], 1, "{shown:#}");
    assert_eq!(volumes[0]["size_bytes"], 16 << 20, "{shown:#}");
    assert_eq!(volumes[0]["state"], "online", "{shown:#}");
    let table = mcctl_ok(&["volume", "show", "--lab", d]);
    assert!(table.contains("vol_x") && table.contains("16 MiB"), "{table}");

    // The right address with another cluster's id: refused by the node, reported, exit 1.
    let wrong = if cluster_id.starts_with('0') { "1" } else { "0" }.repeat(32);
    let out = mcctl(&["node", "show", "--endpoint", &admin_a, "--cluster-id", &wrong]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("unreachable"), "{stdout}");
    assert!(stderr.contains("error:"), "{stderr}");
    // The right id through --endpoint works.
    let nodes =
        mcctl_json(&["node", "show", "--endpoint", &admin_a, "--cluster-id", &cluster_id, "-o", "json"]);
    assert_eq!(nodes["nodes"][0]["state"], "serving", "{nodes:#}");

    // Refusals after asking the nodes: bad usage, saying why, and nothing done.
    let out = mcctl(&["volume", "delete", "vol_x", "--lab", d]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("would delete volume \"vol_x\"") && stderr.contains("--confirm"), "{stderr}");
    let out = mcctl(&["switchover", "--forced-on-disaster", "--confirm", "--lab", d]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--site"), "{stderr}");
    let shown = mcctl_json(&["volume", "show", "vol_x", "--lab", d, "-o", "json"]);
    assert_eq!(shown["volumes"].as_array().unwrap().len(), 1, "{shown:#}");

    for bad in [
        vec!["switchover", "--lab", d],
        vec!["node", "unfence", "2", "--force", "--lab", d],
        vec!["volume", "modify", "vol_x", "--lab", d],
        vec!["node", "show", "--lab", d, "--endpoint", &admin_a, "--cluster-id", &cluster_id],
        vec!["node", "show"],
        vec!["node", "show", "--endpoint", &admin_a],
        vec!["node", "show", "--endpoint", &admin_a, "--cluster-id", "xyz"],
    ] {
        let out = mcctl(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Both aggregates' mirrors are normal and synchronous, with the bitmap the controller keeps.
    let mirrors = mcctl_json(&["mirror", "status", "--lab", d, "-o", "json"]);
    let mirrors = mirrors["mirrors"].as_array().unwrap();
    assert_eq!(mirrors.len(), 2, "{mirrors:#?}");
    for mirror in mirrors {
        assert_eq!(mirror["state"], "normal", "{mirror:#}");
        assert_eq!(mirror["mirror_type"], "synchronous", "{mirror:#}");
        assert_eq!(
            (mirror["source_plex"].as_str(), mirror["target_plex"].as_str()),
            (Some("plex0"), Some("plex1"))
        );
        let regions = mirror["bitmap_regions"].as_u64().unwrap();
        let region_bytes = mirror["region_bytes"].as_u64().unwrap();
        assert!(regions > 0 && region_bytes > 0, "{mirror:#}");
        assert!(regions * region_bytes >= 64 << 20, "the bitmap covers the aggregate: {mirror:#}");
        assert_eq!(mirror["resync"], Value::Null, "{mirror:#}");
    }
    let mirror = mcctl_json(&["mirror", "status", "vol_x", "--lab", d, "-o", "json"]);
    assert_eq!(mirror["mirrors"][0]["aggregate"], "aggr_a", "{mirror:#}");
    let table = mcctl_ok(&["mirror", "status", "--lab", d]);
    assert!(
        table.starts_with("AGGREGATE  NODE  VOLUMES") && table.contains("  normal  synchronous  "),
        "{table}"
    );
    assert_eq!(mcctl(&["mirror", "status", "vol_nope", "--lab", d]).status.code(), Some(1));

    // A healthy lab checks ok (once the DR mirrors are in sync); the result is stored for `check show`.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = mcctl(&["check", "run", "--lab", d]);
        if out.status.code() == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a fresh lab never checked ok:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(dir.join("check.json").exists());
    let shown = mcctl_ok(&["check", "show", "--lab", d]);
    assert!(shown.starts_with("last check: ") && shown.contains("checks ok"), "{shown}");

    // Site B killed: the check at A (through --endpoint, stored under XDG_STATE_HOME) warns about
    // the broken DR mirror to node 2, naming it, and exits 1.
    mcctl_ok(&["lab", "kill", "--dir", d, "--site", "B"]);
    let state = temp.path().join("state");
    let env = [("XDG_STATE_HOME", state.as_path())];
    let at_a = ["check", "run", "--endpoint", &admin_a, "--cluster-id", &cluster_id, "-o", "json"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let out = mcctl_env(&at_a, &env);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mirror =
            report["checks"].as_array().unwrap().iter().find(|c| c["component"] == "dr_mirror").cloned();
        if let Some(mirror) = mirror.filter(|m| m["status"] == "warning") {
            assert_eq!(out.status.code(), Some(1), "{report:#}");
            assert_eq!(report["status"], "warning", "{report:#}");
            let reason = mirror["reason"].as_str().unwrap();
            assert!(reason.contains("DR partner node 2") && reason.contains("disconnected"), "{mirror:#}");
            break report;
        }
        assert!(Instant::now() < deadline, "A never reported its broken DR mirror: {report:#}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let stored = state.join("mcctl").join(format!("check-{cluster_id}.json"));
    let stored: Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    assert_eq!(stored, report);
    let out = mcctl_env(&["check", "show", "--endpoint", &admin_a, "--cluster-id", &cluster_id], &env);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(shown.contains("DR partner node 2") && shown.contains("warning"), "{shown}");
    // Through the lab, node 2 itself is reported as not answering.
    let out = mcctl(&["check", "run", "--lab", d, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let node2 = report["checks"].as_array().unwrap().iter().find(|c| c["subject"] == "node 2").unwrap();
    assert_eq!(node2["status"], "warning", "{report:#}");
    assert!(node2["reason"].as_str().unwrap().contains("did not answer"), "{node2:#}");

    let down = mcctl_json(&["lab", "down", "--dir", d, "-o", "json"]);
    assert_eq!(down["controllers"].as_array().unwrap().len(), 2, "{down:#}");
    // With the lab down, nodes are unreachable: printed, never a panic, exit 1.
    let out = mcctl(&["node", "show", "--lab", d, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let nodes: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes["nodes"][1]["state"], "unreachable", "{nodes:#}");
    let out = mcctl(&["cluster", "show", "--lab", d, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let cluster: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cluster["cluster"]["mode"], "unknown", "{cluster:#}");
    let out = mcctl(&["operation", "show", "--lab", d, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let operations: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(operations["unreachable"].as_array().unwrap().len(), 2, "{operations:#}");
}
