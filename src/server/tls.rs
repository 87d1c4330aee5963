//! HTTPS: the pages need a secure context (OPFS, the clipboard, service workers), and a LAN
//! address over plain HTTP is not one. Certificates come from PEM files (`[tls] cert`, `key`) or
//! are made at start for this host's names and addresses (`--self-signed`), whose SHA-256
//! fingerprint is printed so a person can check it against what the browser shows.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate {path}: {source}")]
    Cert {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCert(PathBuf),
    #[error("cannot read the TLS private key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("[tls] needs both cert and key (or --self-signed)")]
    Incomplete,
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What the listener needs to speak TLS.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// SHA-256 of the (leaf) certificate, colon-separated hex, as browsers show it.
    pub fingerprint: String,
    /// The names and addresses a self-signed certificate was made for (empty for loaded ones).
    pub names: Vec<String>,
}

impl Tls {
    /// From a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::Cert {
                path: cert.to_owned(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCert(cert.to_owned()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
            path: key.to_owned(),
            source,
        })?;
        Self::new(chain, key, Vec::new())
    }

    /// A certificate made now for `localhost`, this host's name, loopback and `ips` (the
    /// addresses browsers will use: the listen address, or every interface's for a wildcard one).
    pub fn self_signed(ips: &[IpAddr]) -> Result<Self, TlsError> {
        let mut names = vec!["localhost".to_string()];
        if let Some(host) = gethostname::gethostname()
            .to_str()
            .filter(|h| !h.is_empty())
        {
            names.push(host.to_string());
        }
        let loopback = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        for ip in loopback.iter().chain(ips) {
            let ip = ip.to_string();
            if !names.contains(&ip) {
                names.push(ip);
            }
        }
        // rcgen makes each name that parses as an address an IP SAN, the rest DNS SANs.
        let made = rcgen::generate_simple_self_signed(names.clone())?;
        let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
        Self::new(vec![made.cert.der().clone()], key, names)
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        names: Vec<String>,
    ) -> Result<Self, TlsError> {
        let fingerprint = fingerprint(&chain[0]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // HTTP/1.1 only: WebSockets over HTTP/2 need extended CONNECT, which not every browser
        // speaks; the pages are a handful of requests.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            fingerprint,
            names,
        })
    }
}

/// The addresses a certificate for a server listening on `listen` must name.
pub fn host_addresses(listen: IpAddr) -> Vec<IpAddr> {
    if !listen.is_unspecified() {
        return vec![listen];
    }
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .map(|i| i.ip())
            .filter(|ip| listen.is_ipv6() || ip.is_ipv4())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list network interfaces for the certificate");
            Vec::new()
        }
    }
}

/// SHA-256 of a certificate's DER, as `AB:CD:…`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_names_the_host_and_its_addresses() {
        let lan: IpAddr = "192.168.7.20".parse().unwrap();
        let tls = Tls::self_signed(&[lan]).unwrap();
        for name in ["localhost", "127.0.0.1", "::1", "192.168.7.20"] {
            assert!(
                tls.names.iter().any(|n| n == name),
                "{name} in {:?}",
                tls.names
            );
        }
        assert_eq!(tls.fingerprint.len(), 32 * 3 - 1);
        // Made anew each start: two are never the same certificate.
        assert_ne!(
            Tls::self_signed(&[lan]).unwrap().fingerprint,
            tls.fingerprint
        );
    }

    #[test]
    fn unreadable_or_empty_pem_files_are_typed_errors() {
        let dir = std::env::temp_dir().join(format!("beamdrop-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.join("missing.pem");
        assert!(matches!(
            Tls::from_pem_files(&missing, &missing),
            Err(TlsError::Cert { .. })
        ));
        assert!(matches!(
            Tls::from_pem_files(&empty, &empty),
            Err(TlsError::NoCert(_))
        ));
        // A certificate, but the key file holds no key.
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        assert!(matches!(
            Tls::from_pem_files(&cert, &empty),
            Err(TlsError::Key { .. })
        ));
        let key = dir.join("key.pem");
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let tls = Tls::from_pem_files(&cert, &key).unwrap();
        assert_eq!(tls.fingerprint, fingerprint(made.cert.der()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
