//! The server (feature `ssr`): config → broker → router → serve with graceful shutdown.

pub mod broker;
pub mod config;
pub mod limits;
pub mod metrics;
mod read_ahead;
mod serve;
pub mod tls;
pub mod turn;
mod ws;

use crate::app::{shell, App};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{FromRef, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use broker::DynBroker;
use config::Config;
use leptos::prelude::LeptosOptions;
use leptos_axum::{file_and_error_handler, generate_route_list, LeptosRoutes};
use metrics::Rejection;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Everything a request handler may need; also provided as Leptos context to server functions.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub broker: DynBroker,
    pub config: Arc<Config>,
    /// Counters and gauges served at `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// Open sockets per client IP, for `limits.max_connections_per_ip`.
    pub ip_connections: Arc<limits::IpConnections>,
    /// TURN credentials for each peer's `welcome`, when `[turn]` is configured.
    pub turn: Option<Arc<turn::credentials::Issuer>>,
    /// `limits.share_creations_per_ip_per_min` and `share_lookups_per_ip_per_min`.
    pub share_creations: Option<Arc<limits::PerIpRate>>,
    pub share_lookups: Option<Arc<limits::PerIpRate>>,
}

impl AppState {
    pub fn new(leptos_options: LeptosOptions, broker: DynBroker, config: Config) -> Self {
        let ip_connections = limits::IpConnections::new(config.limits.max_connections_per_ip);
        let share_creations =
            limits::PerIpRate::per_minute(config.limits.share_creations_per_ip_per_min);
        let share_lookups =
            limits::PerIpRate::per_minute(config.limits.share_lookups_per_ip_per_min);
        Self {
            leptos_options,
            broker,
            config: Arc::new(config),
            metrics: Arc::default(),
            ip_connections,
            turn: None,
            share_creations,
            share_lookups,
        }
    }
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
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .leptos_routes(&state, routes, {
            let options = state.leptos_options.clone();
            move || shell(options.clone())
        })
        .fallback(file_and_error_handler::<AppState, _>(shell))
        .with_state(state)
}

/// Whether `share` is live right now (asked by the receive page's server function while it
/// renders, so the first HTML already says so). A malformed id is simply not live.
/// Each client address may ask `limits.share_lookups_per_ip_per_min` times a minute.
pub async fn share_is_live(share: &str) -> Result<bool, String> {
    use crate::protocol::ShareId;
    let state = leptos::prelude::use_context::<AppState>()
        .ok_or_else(|| "server state missing".to_string())?;
    if let (Some(rate), Some(parts)) = (
        &state.share_lookups,
        leptos::prelude::use_context::<axum::http::request::Parts>(),
    ) {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| {
                limits::request_client_ip(addr.ip(), &parts.headers, &state.config.trusted_proxies)
            });
        if ip.is_some_and(|ip| !rate.check(ip)) {
            state.metrics.reject(Rejection::LookupRate);
            return Err("too many look-ups from this address; try again in a minute".into());
        }
    }
    let Ok(share) = share.parse::<ShareId>() else {
        return Ok(false);
    };
    state
        .broker
        .share_owner(&share)
        .await
        .map(|owner| owner.is_some())
        .map_err(|e| e.to_string())
}

/// Longest a readiness probe waits on the broker backend before answering 503.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// Readiness: 200 "ok" while the broker backend answers, 503 otherwise.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(HEALTH_TIMEOUT, state.broker.health()).await {
        Ok(Ok(())) => (StatusCode::OK, "ok"),
        Ok(Err(e)) => {
            state.metrics.broker_error(&e);
            tracing::warn!(error = %e, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
        }
        Err(_) => {
            state.metrics.broker_error(&broker::BrokerError::Backend(
                "health check timed out".into(),
            ));
            tracing::warn!("health check timed out");
            (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
        }
    }
}

/// OpenMetrics text (Prometheus reads it), for the operator only (see `Config::metrics_token`).
async fn metrics_text(
    State(state): State<AppState>,
    headers: HeaderMap,
    connect_info: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    let local = connect_info.is_some_and(|Extension(ConnectInfo(addr))| addr.ip().is_loopback())
        && !headers.contains_key("x-forwarded-for");
    let token = &state.config.metrics_token;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Digests compared, so the time taken says nothing about how much of a guess was right.
    let token_ok = !token.is_empty()
        && bearer.is_some_and(|b| Sha256::digest(b.as_bytes()) == Sha256::digest(token.as_bytes()));
    if !local && !token_ok {
        state.metrics.reject(Rejection::MetricsRefused);
        return (
            StatusCode::FORBIDDEN,
            "metrics are served to loopback, or with the metrics token",
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state
            .metrics
            .render(state.broker.queued_bytes(), state.broker.share_records()),
    )
        .into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Turn(#[from] turn::TurnError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A server running on its own task.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// The serving certificate's SHA-256 fingerprint when serving HTTPS (None: plain HTTP).
    pub tls_fingerprint: Option<String>,
    /// The built-in STUN/TURN server's address (UDP and TCP), when it runs.
    pub turn_addr: Option<SocketAddr>,
    /// This node's metrics, as `/metrics` shows them (tests wait on them).
    pub metrics: Arc<metrics::Metrics>,
    turn: Option<turn::Turn>,
    broker: DynBroker,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Stops accepting, tells every socket to reconnect elsewhere, and waits for the drain.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        // Every socket task hears it through its inbox.
        self.broker.close();
        let result = match self.task.await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let Some(turn) = &self.turn {
            turn.close().await;
        }
        result
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
    let tls = match &config.tls {
        None => None,
        Some(c) if c.self_signed => Some(tls::Tls::self_signed(&tls::host_addresses(
            config.listen.ip(),
        ))?),
        Some(config::TlsConfig {
            cert: Some(cert),
            key: Some(key),
            ..
        }) => Some(tls::Tls::from_pem_files(cert, key)?),
        Some(_) => return Err(tls::TlsError::Incomplete.into()),
    };
    let broker = broker::from_uri(&config.broker, config.limits.broker()).await?;
    let bind_error = |source| StartError::Bind {
        addr: config.listen,
        source,
    };
    let listener = serve::bind(config.listen, config.limits.listen_backlog).map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let (stop, shutdown) = watch::channel(false);
    let turn_config = config.turn.clone();
    let (header_read_timeout, per_ip, max_connections, trusted_proxies) = (
        config.limits.header_read_timeout(),
        config.limits.max_http_connections_per_ip,
        config.limits.max_connections,
        config.trusted_proxies.clone(),
    );
    let mut state = AppState::new(leptos_options, broker.clone(), config);
    let options = serve::ServeOptions {
        header_read_timeout,
        tls: tls.map(Arc::new),
        admission: serve::Admission {
            max_connections,
            per_ip: limits::IpConnections::new(per_ip),
            trusted_proxies,
            metrics: state.metrics.clone(),
        },
    };
    let turn = match &turn_config {
        Some(c) => Some(turn::Turn::start(c, state.metrics.clone()).await?),
        None => None,
    };
    state.turn = turn.as_ref().map(|t| Arc::new(t.issuer.clone()));
    let tls_fingerprint = options.tls.as_ref().map(|t| t.fingerprint.clone());
    let node_metrics = state.metrics.clone();
    let app = router(state);
    let task = tokio::spawn(serve::serve(listener, app, options, stopped(shutdown)));
    Ok(RunningServer {
        addr,
        tls_fingerprint,
        turn_addr: turn.as_ref().and_then(|t| t.addr),
        metrics: node_metrics,
        turn,
        broker,
        stop,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClaimToken, PeerId, ServerMsg, ShareId};
    use broker::{Broker, BrokerError, MemoryBroker, Registration, ShareLease};

    /// A backend whose backplane is unreachable.
    struct DownBroker;

    fn down<T>() -> Result<T, BrokerError> {
        Err(BrokerError::Backend("connection refused".into()))
    }

    #[async_trait::async_trait]
    impl Broker for DownBroker {
        async fn register(&self, _: PeerId) -> Result<Registration, BrokerError> {
            down()
        }
        async fn publish(&self, _: PeerId, _: ServerMsg) -> Result<(), BrokerError> {
            down()
        }
        async fn create_share(&self, _: PeerId) -> Result<ShareLease, BrokerError> {
            down()
        }
        async fn share_owner(&self, _: &ShareId) -> Result<Option<PeerId>, BrokerError> {
            down()
        }
        async fn reclaim_share(
            &self,
            _: &ShareId,
            _: &ClaimToken,
            _: PeerId,
        ) -> Result<ShareLease, BrokerError> {
            down()
        }
        async fn health(&self) -> Result<(), BrokerError> {
            down()
        }
        fn close(&self) {}
        fn queued_bytes(&self) -> usize {
            0
        }
        fn share_records(&self) -> Option<usize> {
            None
        }
    }

    fn state(broker: DynBroker) -> AppState {
        let options = LeptosOptions::builder().output_name("beamdrop").build();
        AppState::new(options, broker, Config::default())
    }

    async fn body(response: axum::response::Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn healthz_follows_the_broker_backend() {
        let up = state(Arc::new(MemoryBroker::new(broker::BrokerLimits::inbox(8))));
        let response = healthz(State(up)).await.into_response();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "ok");

        let down = state(Arc::new(DownBroker));
        let response = healthz(State(down.clone())).await.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.metrics.backend_errors(), 1);
        let local = Extension(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
        let text = body(metrics_text(State(down), HeaderMap::new(), Some(local)).await).await;
        assert!(
            text.contains("\nbeamdrop_backend_errors_total 1\n"),
            "{text}"
        );
    }
}
