//! HTTPS with rustls: `[gateway] tls_cert` and `tls_key` (PEM). The
//! certificate is reloaded when either file changes (polled every two
//! seconds), so a rotation (certbot, cert-manager) needs no restart; a pair
//! that fails to load keeps the one before and says why in the log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// rustls over *ring*. rustls 0.23.48 deprecates it for offering no
/// post-quantum key exchange; aws-lc-rs, which has one, needs a long C
/// build (and cmake) on every fresh machine. Until that trade changes,
/// the classic groups (X25519, P-256, P-384) it is.
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl TlsFiles {
    fn version(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        (modified(&self.cert), modified(&self.key))
    }

    /// The pair, checked: the chain parses, the key parses, and they match.
    pub fn load(&self) -> Result<CertifiedKey, String> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("tls_cert {}: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("tls_cert {}: no certificate in it", self.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("tls_key {}: {e}", self.key.display()))?;
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("tls_key {}: {e}", self.key.display()))?;
        let ck = CertifiedKey::new(certs, signing);
        ck.keys_match().map_err(|e| {
            format!("tls_key {} does not belong to tls_cert {}: {e}", self.key.display(), self.cert.display())
        })?;
        Ok(ck)
    }
}

/// The certificate a handshake gets: the last pair that loaded.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    version: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner())))
    }
}

impl ReloadingCert {
    pub fn open(files: TlsFiles) -> Result<Arc<Self>, String> {
        let version = files.version();
        let ck = files.load()?;
        Ok(Arc::new(Self { files, current: RwLock::new(Arc::new(ck)), version: Mutex::new(version) }))
    }

    /// Load the pair again if a file changed; answers whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = self.files.version();
        let mut seen = self.version.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return Ok(false);
        }
        // A rotation writes two files: remember this version either way,
        // and try again when the other one changes.
        *seen = now;
        drop(seen);
        let ck = self.files.load()?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        Ok(true)
    }

    /// Poll the files every `every` until dropped by everyone else.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        ember_sys::os::every(self, every, |cert| match cert.reload_if_changed() {
            Ok(true) => tracing::info!(cert = %cert.files.cert.display(), "TLS certificate reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "the TLS files changed but do not load; serving the previous certificate")
            }
        })
    }
}

/// An acceptor over `cert` (HTTP/1.1 only, as the server is).
pub fn acceptor(cert: Arc<ReloadingCert>) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for 127.0.0.1 and localhost, written as
    /// PEM to `dir/<name>.crt` and `.key`.
    pub(crate) fn self_signed(dir: &Path, name: &str) -> TlsFiles {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let files = TlsFiles { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&files.cert, cert.cert.pem()).unwrap();
        std::fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn a_pair_loads_and_a_broken_or_mismatched_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = self_signed(dir.path(), "a");
        let b = self_signed(dir.path(), "b");
        assert!(a.load().is_ok());
        let mixed = TlsFiles { cert: a.cert.clone(), key: b.key.clone() };
        assert!(mixed.load().unwrap_err().contains("does not belong"), "{:?}", mixed.load().err());
        std::fs::write(dir.path().join("junk"), "not pem").unwrap();
        let junk = TlsFiles { cert: dir.path().join("junk"), key: a.key.clone() };
        assert!(junk.load().unwrap_err().contains("tls_cert"));
        let missing = TlsFiles { cert: dir.path().join("none"), key: a.key.clone() };
        assert!(missing.load().is_err());
    }
}
