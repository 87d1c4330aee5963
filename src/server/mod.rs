//! The server (feature `ssr`): config → broker → router → serve with graceful shutdown.

pub mod broker;
pub mod config;
mod ws;

use crate::app::{shell, App};
use axum::extract::FromRef;
use axum::routing::get;
use axum::Router;
use broker::DynBroker;
use config::Config;
use leptos::prelude::LeptosOptions;
use leptos_axum::{file_and_error_handler, generate_route_list, LeptosRoutes};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Everything a request handler may need; also provided as Leptos context to server functions.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub broker: DynBroker,
    pub config: Arc<Config>,
    /// Flips to `true` when the server begins shutting down.
    pub shutdown: watch::Receiver<bool>,
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos_options.clone()
    }
}

pub fn router(state: AppState) -> Router {
    let routes = generate_route_list(App);
    Router::new()
        .route("/ws", get(ws::handler))
        .route("/healthz", get(|| async { "ok" }))
        .leptos_routes(&state, routes, {
            let options = state.leptos_options.clone();
            move || shell(options.clone())
        })
        .fallback(file_and_error_handler::<AppState, _>(shell))
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A server running on its own task.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Stops accepting, tells every socket to reconnect elsewhere, and waits for the drain.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Resolves once the shutdown flag is set (never, if its sender is gone without setting it).
pub(crate) async fn stopped(mut flag: watch::Receiver<bool>) {
    loop {
        if *flag.borrow_and_update() {
            return;
        }
        if flag.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Binds `config.listen` (port 0 picks a free port) and serves until [`RunningServer::shutdown`].
pub async fn start(
    config: Config,
    leptos_options: LeptosOptions,
) -> Result<RunningServer, StartError> {
    let broker = broker::from_uri(&config.broker, config.limits.inbox_capacity)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let (stop, shutdown) = watch::channel(false);
    let state = AppState {
        leptos_options,
        broker,
        config: Arc::new(config),
        shutdown: shutdown.clone(),
    };
    let app = router(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped(shutdown))
            .await
    });
    Ok(RunningServer { addr, stop, task })
}
