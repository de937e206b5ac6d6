//! The mediator daemon's life (DESIGN §10, §13): read the state file, serve the gRPC
//! `Mediator` service (with `grpc.health.v1` and server reflection) and Prometheus `/metrics`,
//! tick the decision core every heartbeat interval, stop on request.
//!
//! Invariants:
//! - one daemon per state directory: an exclusive lock on `<state_dir>/mediator.lock` is held
//!   for the daemon's life, so two mediators never write the same state;
//! - a missing, damaged or unreadable state file never stops the start: the mediator starts
//!   with its state lost (rule 5), says so at ERROR level, and keeps a damaged file aside
//!   (`mediator.state.damaged-<time>`) for an operator instead of overwriting it;
//! - health is `SERVING` once the service is up, and `NOT_SERVING` from the moment a shutdown
//!   begins or a state write fails;
//! - `run` returns only after both servers have stopped, or `DRAIN_TIMEOUT` after the shutdown
//!   began; the bound addresses are printed first, on one line (`mc-mediator listening grpc=…
//!   metrics=…`), so that a test or the lab can find servers bound to port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::decide;
use crate::metrics::Metrics;
use crate::service::{MediatorService, SERVICE_NAME};
use crate::store::{Store, StoreError};

/// How long a shutdown waits for open connections to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The lock file in the state directory.
pub const LOCK_FILE_NAME: &str = "mediator.lock";

/// Why the daemon cannot start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory cannot be created or locked.
    #[error("state directory {path}: {message}")]
    StateDir {
        /// The directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// The decision core refused the configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// A listen address cannot be bound.
    #[error("bind {what} on {address}: {source}")]
    Bind {
        /// `grpc` or `metrics`.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A server failed.
    #[error("{what} server: {message}")]
    Serve {
        /// `grpc` or `metrics`.
        what: &'static str,
        /// What failed.
        message: String,
    },
}

async fn bind(what: &'static str, address: SocketAddr) -> Result<(TcpListener, SocketAddr), DaemonError> {
    let error = |source| DaemonError::Bind { what, address, source };
    let listener = TcpListener::bind(address).await.map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    Ok((listener, local))
}

/// Takes the state directory's lock (held while the returned file lives).
fn lock_state_dir(dir: &Path) -> Result<std::fs::File, DaemonError> {
    let error = |message: String| DaemonError::StateDir { path: dir.display().to_string(), message };
    std::fs::create_dir_all(dir).map_err(|e| error(format!("create: {e}")))?;
    let path = dir.join(LOCK_FILE_NAME);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| error(format!("open {}: {e}", path.display())))?;
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => {
            error("another mc-mediator uses this state directory (its lock is held)".to_string())
        }
        std::fs::TryLockError::Error(e) => error(format!("lock {}: {e}", path.display())),
    })?;
    Ok(file)
}

/// Reads the state file into a decision core; whatever is wrong with the file, the mediator
/// starts (with its state lost, rule 5). Returns the core and what the file records as lost.
fn open_core(config: &Config, store: &Store) -> Result<(decide::Mediator, Option<bool>), DaemonError> {
    let path = store.path().display().to_string();
    let lost_state = |why: &str| {
        tracing::error!(
            path = %path,
            "{why}: THE MEDIATOR STATE IS LOST (rule 5). It grants nothing until every configured \
             controller has reported (or an operator confirms the missing ones down), and learns the \
             epochs from their reports"
        );
        decide::Mediator::new(config.decide.clone(), None).map(|m| (m, None)).map_err(DaemonError::Config)
    };
    match store.load() {
        Ok(Some(stored)) => {
            if stored.lost {
                tracing::error!(
                    path = %path,
                    version = stored.state.version,
                    "the state file says the state was still being rebuilt (rule 5): nothing is granted \
                     until every configured controller has reported again"
                );
            } else {
                tracing::warn!(
                    path = %path,
                    version = stored.state.version,
                    aggregates = stored.state.aggregates.len(),
                    grants = stored.state.grants.len(),
                    "mediator state read; rebuilding it (rule 5): nothing tells this file from an older copy \
                     restored over it, so nothing is granted and no epoch confirmed until every configured \
                     controller has reported (or an operator confirms the missing ones down)"
                );
            }
            let lost = stored.lost;
            decide::Mediator::restart(config.decide.clone(), stored.state)
                .map(|m| (m, Some(lost)))
                .map_err(DaemonError::Config)
        }
        Ok(None) => lost_state("there is no state file (a first start, or the file was removed)"),
        Err(StoreError::Corrupt { reason, .. }) => {
            let aside = keep_aside(store.path());
            lost_state(&format!("the state file is damaged ({reason}); {aside}"))
        }
        Err(e) => lost_state(&format!("the state file cannot be read ({e})")),
    }
}

/// Renames a damaged state file aside so the first write does not destroy the evidence.
fn keep_aside(path: &Path) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
        .unwrap_or_else(|_| "unknown".into());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{stamp}"));
    match std::fs::rename(path, &aside) {
        Ok(()) => format!("it was kept as {}", Path::new(&aside).display()),
        Err(e) => format!("it could not be kept aside ({e}) and will be replaced at the first write"),
    }
}

/// Runs the daemon until `shutdown` completes, then stops the servers and returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let _lock = lock_state_dir(&config.state_dir)?;
    let store = Arc::new(Store::new(&config.state_dir, config.cluster_id));
    let (core, saved_lost) = open_core(&config, &store)?;

    let (grpc_listener, grpc_address) = bind("grpc", config.grpc_listen).await?;
    let (metrics_listener, metrics_address) = bind("metrics", config.metrics_listen).await?;
    // One line that tests and the lab parse; keep its shape.
    println!("mc-mediator listening grpc={grpc_address} metrics={metrics_address}");
    tracing::info!(%grpc_address, %metrics_address, observer = config.decide.observer, "listening");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mc_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| DaemonError::Serve { what: "grpc", message: format!("reflection: {e}") })?;
    let metrics = Arc::new(Metrics::default());
    let service = MediatorService::new(
        config.cluster_id,
        core,
        saved_lost,
        store.clone(),
        metrics.clone(),
        Some(health_reporter.clone()),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let grpc = {
        let mut stop = stop_rx.clone();
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(mc_proto::v1::mediator_server::MediatorServer::new(service.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                },
            )
    };
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => (
                        axum::http::StatusCode::OK,
                        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                        text,
                    ),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [("content-type", "text/plain; charset=utf-8")],
                        format!("encoding the metrics failed: {e}\n"),
                    ),
                }
            }
        }),
    );
    let http = {
        let mut stop = stop_rx.clone();
        axum::serve(metrics_listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
    };
    // Before any call is served, so a failed write's NOT_SERVING is never overwritten.
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    health_reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    let grpc = tokio::spawn(grpc);
    let http = tokio::spawn(async move { http.await });
    let ticks = tokio::spawn(service.clone().run_ticks(config.decide.timers.heartbeat, stop_rx.clone()));

    shutdown.await;
    tracing::info!("shutting down");
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    health_reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    let _ = ticks.await;
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { (grpc.await, http.await) }).await;
    let (grpc, http) = match drained {
        Ok(results) => results,
        Err(_) => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "connections still open at shutdown are cut");
            return Ok(());
        }
    };
    match grpc {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DaemonError::Serve { what: "grpc", message: e.to_string() }),
        Err(e) => return Err(DaemonError::Serve { what: "grpc", message: e.to_string() }),
    }
    match http {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DaemonError::Serve { what: "metrics", message: e.to_string() }),
        Err(e) => return Err(DaemonError::Serve { what: "metrics", message: e.to_string() }),
    }
    tracing::info!("stopped");
    Ok(())
}
