//! `mcctl` run as a process, for the tests of the lab and of the admin commands: a small lab's
//! flags, the runners, and a guard that stops a lab's controllers however the test ends.
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
/// of every pid `lab.json` still names, so no controller outlives the test.
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
    }
}

/// Whether `pid` is a live (not zombie) mc-controller.
pub fn running(pid: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != Some("Z") && String::from_utf8_lossy(&cmdline).contains("mc-controller")
}
