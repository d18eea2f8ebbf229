//! Who may use the admin API and over what: bearer tokens compared in constant time,
//! the rule that a listener beyond loopback needs tokens, and the TLS server
//! configuration. Token secrets and the certificate are read at construction and again
//! on [`AdminAuth::reload`], so a rotation (SIGHUP) takes effect without a restart.
//!
//! Only SHA-256 digests of the secrets are kept; a presented token is hashed and
//! compared with every configured digest, without early exit, so the time taken says
//! nothing about how much of a secret matched or which token did.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::secret::SecretError;
use crate::config::{AdminConfig, SecretRef};

/// The principal recorded in the audit log when no tokens are configured.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("admin token {name}: cannot read its secret")]
    Secret {
        name: String,
        #[source]
        source: SecretError,
    },
    #[error("admin.listen: a non-loopback listener needs admin.tokens")]
    PublicWithoutTokens,
    #[error("admin.listen: a non-loopback listener needs admin.allow_public = true")]
    PublicNotAllowed,
    #[error("admin tls: cannot read {what} from {path}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("admin tls: {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("admin tls: certificate and key are not usable")]
    Tls(#[source] rustls::Error),
}

struct Token {
    name: String,
    digest: [u8; 32],
}

struct Loaded {
    tokens: Vec<Token>,
    tls: Option<Arc<ServerConfig>>,
}

struct Inner {
    refs: Vec<(String, SecretRef)>,
    tls_files: Option<(PathBuf, PathBuf)>,
    allow_public: bool,
    /// What relative secret and TLS paths are relative to.
    base_dir: PathBuf,
    loaded: RwLock<Loaded>,
}

/// Admin API access control. Cheap to clone; clones share the loaded secrets.
#[derive(Clone)]
pub struct AdminAuth {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("tokens", &self.inner.refs.iter().map(|(n, _)| n).collect::<Vec<_>>())
            .field("tls", &self.inner.tls_files.is_some())
            .finish()
    }
}

impl AdminAuth {
    /// No tokens, plain HTTP, loopback only: the default.
    pub fn open() -> AdminAuth {
        AdminAuth {
            inner: Arc::new(Inner {
                refs: Vec::new(),
                tls_files: None,
                allow_public: false,
                base_dir: PathBuf::new(),
                loaded: RwLock::new(Loaded {
                    tokens: Vec::new(),
                    tls: None,
                }),
            }),
        }
    }

    /// Reads every token secret and the TLS files now. Refuses a non-loopback
    /// `listen` without tokens or without `allow_public`.
    pub fn from_config(config: &AdminConfig, base_dir: &Path) -> Result<AdminAuth, AuthError> {
        let inner = Inner {
            refs: config
                .tokens
                .iter()
                .map(|t| (t.name.clone(), t.secret.clone()))
                .collect(),
            tls_files: config
                .tls
                .as_ref()
                .map(|t| (base_dir.join(&t.cert), base_dir.join(&t.key))),
            allow_public: config.allow_public,
            base_dir: base_dir.to_path_buf(),
            loaded: RwLock::new(Loaded {
                tokens: Vec::new(),
                tls: None,
            }),
        };
        let auth = AdminAuth { inner: Arc::new(inner) };
        auth.reload()?;
        if let Ok(addr) = config.listen.parse::<SocketAddr>() {
            auth.check_listener(addr)?;
        }
        Ok(auth)
    }

    /// Whether requests need a bearer token.
    pub fn requires_token(&self) -> bool {
        !self.inner.refs.is_empty()
    }

    /// Whether the listener serves HTTPS.
    pub fn tls_enabled(&self) -> bool {
        self.inner.tls_files.is_some()
    }

    /// Names of the configured tokens (never their secrets).
    pub fn token_names(&self) -> Vec<String> {
        self.inner.refs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Refuses to serve on `addr` when it is not loopback and the API is not protected
    /// and explicitly opened.
    pub fn check_listener(&self, addr: SocketAddr) -> Result<(), AuthError> {
        if addr.ip().is_loopback() {
            return Ok(());
        }
        if !self.requires_token() {
            return Err(AuthError::PublicWithoutTokens);
        }
        if !self.inner.allow_public {
            return Err(AuthError::PublicNotAllowed);
        }
        Ok(())
    }

    /// Reads every token secret and the TLS files again. All or nothing: on an error
    /// the previous secrets and certificate stay in force.
    pub fn reload(&self) -> Result<(), AuthError> {
        let base_dir = &self.inner.base_dir;
        let mut tokens = Vec::with_capacity(self.inner.refs.len());
        for (name, secret) in &self.inner.refs {
            let value = secret.resolve(base_dir).map_err(|source| AuthError::Secret {
                name: name.clone(),
                source,
            })?;
            tokens.push(Token {
                name: name.clone(),
                digest: digest(value.expose_secret().as_bytes()),
            });
        }
        let tls = match &self.inner.tls_files {
            Some((cert, key)) => Some(load_tls(cert, key)?),
            None => None,
        };
        let mut loaded = self
            .inner
            .loaded
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *loaded = Loaded { tokens, tls };
        Ok(())
    }

    /// Checks a presented `Authorization` header value. Returns the principal for the
    /// audit log: the token's name, or [`ANONYMOUS`] when no tokens are configured.
    /// `None` means refused.
    pub(crate) fn authenticate(&self, authorization: Option<&[u8]>) -> Option<String> {
        let loaded = self
            .inner
            .loaded
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !self.requires_token() {
            return Some(ANONYMOUS.to_string());
        }
        let presented = authorization.and_then(bearer)?;
        let presented = digest(presented);
        let mut found: Option<&str> = None;
        // Every token is compared; none ends the loop early.
        for token in &loaded.tokens {
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(&token.name);
            }
        }
        found.map(str::to_string)
    }

    /// The TLS configuration in force, when TLS is configured.
    pub(crate) fn tls_config(&self) -> Option<Arc<ServerConfig>> {
        let loaded = self
            .inner
            .loaded
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loaded.tls.clone()
    }
}

/// The token of a `Bearer <token>` header value; the scheme is case-insensitive
/// (RFC 9110 section 11.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn pem(what: &'static str, path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> AuthError {
    let path = path.to_path_buf();
    move |source| AuthError::Pem { what, path, source }
}

fn load_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, AuthError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem("certificates", cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("certificates", cert))?;
    if chain.is_empty() {
        return Err(AuthError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem("the private key", key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(AuthError::Tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(AuthError::Tls)?;
    // The admin API speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminToken;

    fn config(dir: &Path, tokens: &[(&str, &str)]) -> AdminConfig {
        let mut config = AdminConfig::default();
        for (name, secret) in tokens {
            let file = format!("{name}.token");
            std::fs::write(dir.join(&file), format!("{secret}\n")).unwrap();
            config.tokens.push(AdminToken {
                name: name.to_string(),
                secret: SecretRef::File(file.into()),
            });
        }
        config
    }

    #[test]
    fn no_tokens_means_anonymous() {
        let auth = AdminAuth::open();
        assert_eq!(auth.authenticate(None).as_deref(), Some(ANONYMOUS));
        assert_eq!(auth.authenticate(Some(b"Bearer x")).as_deref(), Some(ANONYMOUS));
    }

    #[test]
    fn each_token_names_its_holder_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let auth =
            AdminAuth::from_config(&config(dir.path(), &[("ops", "alpha"), ("ci", "beta")]), dir.path()).unwrap();
        assert_eq!(auth.authenticate(Some(b"Bearer alpha")).as_deref(), Some("ops"));
        assert_eq!(auth.authenticate(Some(b"bearer beta")).as_deref(), Some("ci"));
        for bad in [
            &b"Bearer alph"[..],
            b"Bearer alphaa",
            b"Basic alpha",
            b"alpha",
            b"Bearer ",
            b"",
        ] {
            assert_eq!(auth.authenticate(Some(bad)), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(auth.authenticate(None), None);
    }

    #[test]
    fn reload_rotates_and_a_failed_reload_keeps_the_old_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let auth = AdminAuth::from_config(&config(dir.path(), &[("ops", "old")]), dir.path()).unwrap();
        std::fs::write(dir.path().join("ops.token"), "new\n").unwrap();
        auth.reload().unwrap();
        assert_eq!(auth.authenticate(Some(b"Bearer old")), None);
        assert_eq!(auth.authenticate(Some(b"Bearer new")).as_deref(), Some("ops"));
        std::fs::remove_file(dir.path().join("ops.token")).unwrap();
        let error = auth.reload().unwrap_err();
        assert!(!error.to_string().contains("new"), "{error}");
        assert_eq!(auth.authenticate(Some(b"Bearer new")).as_deref(), Some("ops"));
    }

    #[test]
    fn public_listeners_need_tokens_and_consent() {
        let dir = tempfile::tempdir().unwrap();
        let open = AdminConfig {
            listen: "0.0.0.0:9464".into(),
            ..AdminConfig::default()
        };
        assert!(matches!(
            AdminAuth::from_config(&open, dir.path()),
            Err(AuthError::PublicWithoutTokens)
        ));
        let mut tokens = config(dir.path(), &[("ops", "alpha")]);
        tokens.listen = "0.0.0.0:9464".into();
        assert!(matches!(
            AdminAuth::from_config(&tokens, dir.path()),
            Err(AuthError::PublicNotAllowed)
        ));
        tokens.allow_public = true;
        assert!(AdminAuth::from_config(&tokens, dir.path()).is_ok());
        let loopback: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(AdminAuth::open().check_listener(loopback).is_ok());
    }
}
