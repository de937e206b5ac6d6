//! Runs the model check of the safety core with chosen bounds (issue 11): the larger runs
//! behind CI's, and the exploration of how the state count grows.
//!
//! `mc-model-check --horizon 8 --writes 1 --faults 2 [--no-crash ...] [--dfs]`

use std::time::Instant;

use anyhow::bail;
use clap::Parser;
use mc_model::{Bounds, ClusterModel, SAFETY, trace};
use stateright::{Checker, HasDiscoveries, Model};

#[derive(Parser, Debug)]
#[command(about = "Model-check the safety core of the metro cluster (DESIGN §0) within bounds")]
struct Args {
    /// The last second explored.
    #[arg(long, default_value_t = Bounds::CI.horizon)]
    horizon: u8,
    /// Host writes.
    #[arg(long, default_value_t = Bounds::CI.writes)]
    writes: u8,
    /// Faults.
    #[arg(long, default_value_t = Bounds::CI.faults)]
    faults: u8,
    /// No controller crashes.
    #[arg(long)]
    no_crash: bool,
    /// No crash that loses A's NVLog.
    #[arg(long)]
    no_lose_nvlog: bool,
    /// No pauses.
    #[arg(long)]
    no_pause: bool,
    /// No stalled receiver.
    #[arg(long)]
    no_stall: bool,
    /// No inter-site link cuts.
    #[arg(long)]
    no_cut_link: bool,
    /// No mediator link cuts.
    #[arg(long)]
    no_cut_mediator: bool,
    /// Mediator restarts: with its state, without it, from an old snapshot (§10 rule 5).
    #[arg(long)]
    restart_mediator: bool,
    /// Lost, duplicated and delayed mediator messages (all three below).
    #[arg(long)]
    message_faults: bool,
    /// Lost mediator messages.
    #[arg(long)]
    lose: bool,
    /// Duplicated mediator messages.
    #[arg(long)]
    duplicate: bool,
    /// Mediator messages held back into the next second.
    #[arg(long)]
    delay: bool,
    /// One interleaving per second: messages delivered in the order sent (faults, writes and
    /// the operator still at any point); for deeper horizons.
    #[arg(long)]
    fifo: bool,
    /// No mediator: no lease, the DR partner confirms epochs, drops complete after
    /// mirror_timeout of silence, forced switchovers run on the operator's confirmation.
    #[arg(long)]
    no_mediator: bool,
    /// The operator may heal and switch back (DESIGN §11).
    #[arg(long)]
    switchback: bool,
    /// How many forced switchovers the operator runs (at either site).
    #[arg(long, default_value_t = Bounds::CI.switchovers)]
    switchovers: u8,
    /// Depth-first (less memory) instead of breadth-first (shortest counterexamples).
    #[arg(long)]
    dfs: bool,
    /// Stop at the first violation (for breaks; the counts are then partial).
    #[arg(long)]
    first: bool,
    /// Checker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Turn on a deliberate break of the product's code (the checker must then find a
    /// counterexample).
    #[arg(long = "break", value_enum)]
    breaks: Vec<BreakArg>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BreakArg {
    AckBeforePartner,
    DropWithoutMediatorRecord,
    RenewLapsedLease,
    AcceptStaleEpoch,
    ConfirmKeepsFence,
    ReceiverKeepsInSyncThroughSilence,
    AdoptWithoutMediatorIntact,
    GrantWithoutInSync,
    SwitchedOverTarget,
    ReceiverReportRestoresInSync,
    ReplayAcrossGap,
    TrustUnstoredAccount,
    SwitchbackKeepsHeldRecords,
    SwitchbackRollsBackAfterAsking,
    RestartTrustsItsFile,
}

fn set_break(b: BreakArg) {
    use controller::model_breaks::{Break, set};
    match b {
        BreakArg::AckBeforePartner => set(Break::AckBeforePartner, true),
        BreakArg::DropWithoutMediatorRecord => set(Break::DropWithoutMediatorRecord, true),
        BreakArg::RenewLapsedLease => set(Break::RenewLapsedLease, true),
        BreakArg::AcceptStaleEpoch => set(Break::AcceptStaleEpoch, true),
        BreakArg::ConfirmKeepsFence => set(Break::ConfirmKeepsFence, true),
        BreakArg::ReceiverKeepsInSyncThroughSilence => set(Break::ReceiverKeepsInSyncThroughSilence, true),
        BreakArg::AdoptWithoutMediatorIntact => set(Break::AdoptWithoutMediatorIntact, true),
        BreakArg::ReplayAcrossGap => set(Break::ReplayAcrossGap, true),
        BreakArg::TrustUnstoredAccount => set(Break::TrustUnstoredAccount, true),
        BreakArg::SwitchbackKeepsHeldRecords => set(Break::SwitchbackKeepsHeldRecords, true),
        BreakArg::SwitchbackRollsBackAfterAsking => set(Break::SwitchbackRollsBackAfterAsking, true),
        BreakArg::GrantWithoutInSync => {
            mediator::model_breaks::set(mediator::model_breaks::Break::GrantWithoutInSync, true);
        }
        BreakArg::SwitchedOverTarget => {
            mediator::model_breaks::set(mediator::model_breaks::Break::SwitchedOverTarget, true);
        }
        BreakArg::RestartTrustsItsFile => {
            mediator::model_breaks::set(mediator::model_breaks::Break::RestartTrustsItsFile, true);
        }
        BreakArg::ReceiverReportRestoresInSync => {
            mediator::model_breaks::set(mediator::model_breaks::Break::ReceiverReportRestoresInSync, true);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bounds = Bounds {
        horizon: args.horizon,
        writes: args.writes,
        faults: args.faults,
        crash: !args.no_crash,
        lose_nvlog: !args.no_lose_nvlog,
        pause: !args.no_pause,
        stall: !args.no_stall,
        cut_link: !args.no_cut_link,
        cut_mediator: !args.no_cut_mediator,
        restart_mediator: args.restart_mediator,
        lose: args.lose || args.message_faults,
        duplicate: args.duplicate || args.message_faults,
        delay: args.delay || args.message_faults,
        fifo: args.fifo,
        switchovers: args.switchovers,
        mediator: !args.no_mediator,
        switchback: args.switchback,
    };
    for b in &args.breaks {
        set_break(*b);
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let started = Instant::now();
    let mut builder = ClusterModel { bounds }.checker().threads(threads);
    if args.first {
        builder = builder.finish_when(HasDiscoveries::AnyFailures);
    }
    let violated = if args.dfs {
        report(builder.spawn_dfs().join(), bounds, started)
    } else {
        report(builder.spawn_bfs().join(), bounds, started)
    };
    if !violated.is_empty() {
        bail!("{} propert(ies) violated: {violated:?}", violated.len());
    }
    println!("no violation of {SAFETY:?}");
    Ok(())
}

/// Prints the counts and each violation's trace; returns the violated properties.
fn report(checker: impl Checker<ClusterModel>, bounds: Bounds, started: Instant) -> Vec<&'static str> {
    println!(
        "{bounds:?}\n{} states explored, {} unique, max depth {}, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    for p in (ClusterModel { bounds }).properties() {
        if !SAFETY.contains(&p.name) {
            let reached = if checker.discovery(p.name).is_some() { "reached" } else { "NOT reached" };
            println!("{reached}: {}", p.name);
        }
    }
    let mut violated = Vec::new();
    for name in SAFETY {
        if let Some(path) = checker.discovery(name) {
            println!("VIOLATION of \"{name}\":\n{}", trace(path));
            violated.push(name);
        }
    }
    violated
}
