//! The server's runtime config: `Leptos.toml`, then environment variables, then CLI flags.
//! (Build settings live in Cargo.toml's `[package.metadata.leptos]`; cargo-leptos reads only that.)

use crate::protocol::IceServer;
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Broker backend by URI scheme: `memory://` (in-process, the default).
    pub broker: String,
    /// ICE servers handed to browsers; none means host candidates only.
    pub ice_servers: Vec<IceServer>,
    pub limits: Limits,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest WebSocket message accepted from a client, in bytes.
    pub max_frame_bytes: usize,
    /// Messages queued for one peer before publishers get `peer_busy`.
    pub inbox_capacity: usize,
    /// Shares one connection may own at once.
    pub max_shares_per_peer: usize,
    /// Seconds between server pings.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the client before the server closes the socket.
    pub idle_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            broker: "memory://".into(),
            ice_servers: Vec::new(),
            limits: Limits::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            inbox_capacity: 256,
            max_shares_per_peer: 16,
            ping_interval_secs: 20,
            idle_timeout_secs: 60,
        }
    }
}

impl Limits {
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs.max(1))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }
}

/// Command line; every flag also reads an environment variable.
#[derive(Debug, Parser)]
#[command(version, about = "beamdrop: peer-to-peer file sharing server")]
pub struct Cli {
    /// Runtime config file (missing file = defaults).
    #[arg(long, env = "BEAMDROP_CONFIG", default_value = "Leptos.toml")]
    pub config: PathBuf,
    /// Listen address, e.g. 127.0.0.1:3000 (port 0 picks a free port).
    #[arg(long, env = "BEAMDROP_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Broker URI: memory://
    #[arg(long, env = "BEAMDROP_BROKER")]
    pub broker: Option<String>,
    /// ICE server URL (repeatable; comma-separated in the env var). Replaces the file's list.
    #[arg(
        long = "ice-server",
        env = "BEAMDROP_ICE_SERVERS",
        value_delimiter = ','
    )]
    pub ice_servers: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl Config {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The file (if present), then the CLI/env overrides.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let mut config = match std::fs::read_to_string(&cli.config) {
            Ok(text) => Self::from_toml(&text).map_err(|source| ConfigError::Parse {
                path: cli.config.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: cli.config.clone(),
                    source,
                })
            }
        };
        if let Some(listen) = cli.listen {
            config.listen = listen;
        }
        if let Some(broker) = &cli.broker {
            config.broker = broker.clone();
        }
        if !cli.ice_servers.is_empty() {
            config.ice_servers = vec![IceServer {
                urls: cli.ice_servers.clone(),
                ..Default::default()
            }];
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_leptos_toml_parses() {
        let text = include_str!("../../Leptos.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.broker, "memory://");
        assert!(config.ice_servers.is_empty());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::from_toml("lisen = \"127.0.0.1:1\"").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let cli = Cli::parse_from([
            "beamdrop",
            "--config",
            "/nonexistent/Leptos.toml",
            "--listen",
            "127.0.0.1:0",
            "--ice-server",
            "stun:127.0.0.1:3478",
        ]);
        let config = Config::load(&cli).unwrap();
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.ice_servers[0].urls, vec!["stun:127.0.0.1:3478"]);
        assert_eq!(config.limits, Limits::default());
    }
}
