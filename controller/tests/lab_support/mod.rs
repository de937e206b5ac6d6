//! `mcctl` run as a process, for the tests of the lab and of the admin commands: a small lab's
//! flags, the runners, and a guard that stops a lab's controllers and mediator however the test
//! ends.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

pub const MCCTL: &str = env!("CARGO_BIN_EXE_mcctl");
/// A small, fast lab: the mirror timeout's keepalive and margin must fit below it (S11).
pub const SMALL: &[&str] = &[
    "--volume-size-mib",
    "64",
    "--nvlog-size-mib",
    "16",
    "--mirror-timeout-ms",
    "5000",
    "--cp-interval-ms",
    "1000",
    "--keepalive-interval-ms",
    "200",
    "--keepalive-timeout-ms",
    "1500",
];

/// A lab without a mediator: the configuration of the tests that exercise what happens without
/// one (a site lost stays lost until the operator's forced switchover; epochs raised by the
/// controllers).
pub const NO_MEDIATOR: &[&str] = &["--no-mediator"];

/// The mediator's timers that go with `SMALL` (DESIGN §10.1's scaled profile with SMALL's
/// keepalive and margin): heartbeat 200 ms, lease 2 s (above the 1.5 s keepalive timeout), AUSO
/// window 5 s (above lease + margin, at most the mirror timeout).
pub const SMALL_MEDIATOR: &[&str] =
    &["--heartbeat-ms", "200", "--lease-ms", "2000", "--auso-window-ms", "5000"];

/// `lab up --dir DIR --detach -o json` with `SMALL` and `extra`.
pub fn up_args<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["lab", "up", "--dir", dir, "--detach", "-o", "json"];
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    args
}

/// The `mc-mediator` binary next to `mcctl`, where `mcctl lab up` looks for it (the workspace
/// test command builds it; built here when only this crate's tests run).
pub fn ensure_mediator_built() -> PathBuf {
    let binary = std::path::Path::new(MCCTL).with_file_name("mc-mediator");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "mediator", "--bin", "mc-mediator"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building mc-mediator failed");
    }
    binary
}

pub fn mcctl(args: &[&str]) -> Output {
    Command::new(MCCTL).args(args).output().unwrap()
}

/// Runs `mcctl` with extra environment variables (`XDG_STATE_HOME` for `check run`).
pub fn mcctl_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> Output {
    let mut command = Command::new(MCCTL);
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// Runs `mcctl` and fails the test with its output unless it succeeded.
pub fn mcctl_ok(args: &[&str]) -> String {
    let out = mcctl(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mcctl {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn mcctl_json(args: &[&str]) -> Value {
    let stdout = mcctl_ok(args);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("mcctl {args:?}: not one JSON object ({e}):\n{stdout}"))
}

/// Stops the lab in `dir` when the test ends, passed or failed: `mcctl lab down`, then SIGKILL
/// of every pid `lab.json` still names, so no controller or mediator outlives the test.
pub struct LabGuard {
    pub dir: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap().to_string();
        let _ = Command::new(MCCTL).args(["lab", "down", "--dir", &dir]).output();
        let Ok(text) = std::fs::read_to_string(self.dir.join("lab.json")) else { return };
        let Ok(state) = serde_json::from_str::<Value>(&text) else { return };
        for controller in state["controllers"].as_array().into_iter().flatten() {
            if let Some(pid) = controller["pid"].as_u64()
                && running(pid)
            {
                // SAFETY: a pid the lab recorded and `running` just saw as a controller.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if let Some(pid) = state["mediator"]["pid"].as_u64()
            && running_mediator(pid)
        {
            // SAFETY: a pid the lab recorded and `running_mediator` just saw as a mediator.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Whether `pid` is a live (not zombie) process whose command line contains `name`.
fn running_as(pid: u64, name: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != Some("Z") && String::from_utf8_lossy(&cmdline).contains(name)
}

/// Whether `pid` is a live (not zombie) mc-controller.
pub fn running(pid: u64) -> bool {
    running_as(pid, "mc-controller")
}

/// Whether `pid` is a live (not zombie) mc-mediator.
pub fn running_mediator(pid: u64) -> bool {
    running_as(pid, "mc-mediator")
}
