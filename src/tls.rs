//! HTTPS on the client listener: PEM certificate and key loaded into a rustls config with ALPN
//! (h2, http/1.1), swapped in place on SIGHUP so a renewed certificate needs no restart and no
//! dropped connection (connections keep the config they started with). Loaded by [`crate::app`]
//! with the other parts, used by [`crate::server`] on each accepted connection.

use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::Tls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert: {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("tls.key: {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("tls: the certificate and key do not make a usable TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

pub struct TlsState {
    files: Tls,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsState {
    pub fn load(files: &Tls) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(build(files)?),
            files: files.clone(),
        })
    }

    /// Reads the files again; on error the running configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

fn build(files: &Tls) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_path = files.cert.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|iter| iter.collect())
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path,
            reason: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
