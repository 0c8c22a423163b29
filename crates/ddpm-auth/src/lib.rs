//! Who may talk to the coordinator: the bearer token that every RPC carries, and TLS or
//! mutual TLS on the connection.
//!
//! - [`Token`]: the shared secret, read from a file or an environment variable (never from a
//!   config), printed nowhere (`Debug` shows `<redacted>`).
//! - Server: [`BearerCheck`], a tonic interceptor that refuses a request without the token
//!   or with another one (UNAUTHENTICATED) before any handler runs, comparing SHA-256
//!   digests in constant time; [`server_tls`] from `[tls]`.
//! - Clients (workers, the evaluator, `ddpm status`): [`ClientArgs`] (their
//!   `--token-file`, `--tls-*` flags), [`ClientSecurity::endpoint`] (TLS for `https://`
//!   URLs) and [`ClientSecurity::authorize`] (the token header on every call).

use ddpm_config::{AuthConfig, TlsConfig};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

/// The environment variable clients read the token from when no `--token-file` is given;
/// `ddpm launch` hands the token to its workers through it.
pub const TOKEN_ENV: &str = "DDPM_AUTH_TOKEN";

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Errors of reading tokens and certificates and of setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file could not be read.
    #[error("reading the token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The environment variable that should hold the token is not set.
    #[error(
        "the environment variable {var} ({origin}) is not set; it should hold the bearer token"
    )]
    TokenEnvMissing {
        /// The variable.
        var: String,
        /// Who named it (a config key or a flag).
        origin: String,
    },
    /// The token is not usable (empty, too short, characters an HTTP header cannot carry).
    #[error("the token from {origin}: {reason}")]
    BadToken {
        /// Where it came from (file or variable).
        origin: String,
        /// What was expected.
        reason: String,
    },
    /// A certificate or key file is missing or not PEM.
    #[error("{what} {path}: {reason}")]
    Certificate {
        /// The config key or flag that names the file.
        what: String,
        /// The file.
        path: String,
        /// What was expected.
        reason: String,
    },
    /// The coordinator URL does not fit the TLS settings.
    #[error("coordinator URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What was expected.
        reason: String,
    },
    /// tonic refused the TLS or endpoint settings.
    #[error("{what}: {source}")]
    Transport {
        /// What was being set up.
        what: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
}

/// Result with [`AuthError`].
pub type Result<T, E = AuthError> = std::result::Result<T, E>;

/// A bearer token. Cheap to clone; its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Checks `text` (surrounding whitespace removed): at least [`MIN_TOKEN_LEN`] visible
    /// ASCII characters, so that it fits an HTTP header and is not trivially guessed.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let bad = |reason: String| AuthError::BadToken {
            origin: origin.to_string(),
            reason,
        };
        let t = text.trim();
        if let Some(c) = t.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(bad(format!(
                "expected visible ASCII characters only, found {:?}",
                c.escape_default().to_string()
            )));
        }
        if t.len() < MIN_TOKEN_LEN {
            return Err(bad(format!(
                "expected at least {MIN_TOKEN_LEN} characters, got {} (generate one with `openssl rand -hex 32`)",
                t.len()
            )));
        }
        Ok(Self(t.into()))
    }

    /// The token in `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &format!("file {}", path.display()))
    }

    /// The token in the environment variable `var`, which `origin` named.
    pub fn from_env(var: &str, origin: &str) -> Result<Self> {
        let value = std::env::var(var).map_err(|_| AuthError::TokenEnvMissing {
            var: var.to_string(),
            origin: origin.to_string(),
        })?;
        Self::parse(&value, &format!("environment variable {var}"))
    }

    /// The token `[auth]` names (`token_file` or `token_env`); `None` when it names none.
    pub fn from_config(auth: &AuthConfig) -> Result<Option<Self>> {
        if !auth.token_file.is_empty() {
            return Self::from_file(Path::new(&auth.token_file)).map(Some);
        }
        if !auth.token_env.is_empty() {
            return Self::from_env(&auth.token_env, "auth.token_env").map(Some);
        }
        Ok(None)
    }

    /// A client's token: `file`, else [`TOKEN_ENV`] when it is set, else none.
    pub fn for_client(file: Option<&Path>) -> Result<Option<Self>> {
        match file {
            Some(f) => Self::from_file(f).map(Some),
            None if std::env::var_os(TOKEN_ENV).is_some() => {
                Self::from_env(TOKEN_ENV, "default").map(Some)
            }
            None => Ok(None),
        }
    }

    /// The secret itself, for handing it to a child process (`ddpm launch`). Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

/// Server side: lets a request through only when its `authorization` header is
/// `Bearer <token>`. Digests of equal length are compared in constant time, so neither the
/// content nor the length of the token leaks through timing. The header is removed before
/// the handler sees the request. Without a token, every request passes.
#[derive(Clone)]
pub struct BearerCheck {
    expected: Option<[u8; 32]>,
}

impl std::fmt::Debug for BearerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerCheck")
            .field("required", &self.expected.is_some())
            .finish()
    }
}

impl BearerCheck {
    /// Requires `token`, or nothing when `None`.
    pub fn new(token: Option<&Token>) -> Self {
        metrics::describe_counter!(
            "ddpm_rpc_unauthenticated_total",
            "RPCs refused for a missing or wrong bearer token, by reason."
        );
        Self {
            expected: token.map(Token::digest),
        }
    }

    /// Whether a token is required.
    pub fn is_required(&self) -> bool {
        self.expected.is_some()
    }
}

impl Interceptor for BearerCheck {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() });
        let refused = match presented {
            None => Some("missing"),
            Some(d) if !bool::from(d.ct_eq(expected)) => Some("wrong"),
            Some(_) => None,
        };
        if let Some(reason) = refused {
            metrics::counter!("ddpm_rpc_unauthenticated_total", "reason" => reason).increment(1);
            let peer = request
                .remote_addr()
                .map_or_else(|| "unknown".to_string(), |a| a.to_string());
            tracing::warn!(
                peer,
                reason,
                "refused an RPC without the run's bearer token"
            );
            return Err(Status::unauthenticated(format!(
                "{reason} bearer token: every RPC to this coordinator needs the header `authorization: Bearer <token>` with the run's token (clients: --token-file FILE or {TOKEN_ENV})"
            )));
        }
        request.metadata_mut().remove("authorization");
        Ok(request)
    }
}

/// Client side: adds `authorization: Bearer <token>` to every request (nothing without a
/// token).
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel to the coordinator whose every call carries the token.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// Makes aws-lc-rs rustls's process-wide crypto provider. The binaries link rustls with
/// both of its providers (object_store's HTTP client asks for one, tonic for the other), so
/// rustls cannot pick one itself, and a TLS server would panic at its first handshake.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first, which serves as well.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// Reads a PEM file that `what` (a config key or flag) names, checking it holds `kind`
/// ("CERTIFICATE" or "PRIVATE KEY").
fn pem(what: &str, path: &Path, kind: &str) -> Result<Vec<u8>> {
    let bad = |reason: String| AuthError::Certificate {
        what: what.to_string(),
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if !found {
        return Err(bad(format!("expected a PEM file with a {kind}")));
    }
    Ok(bytes)
}

/// The coordinator's TLS from `[tls]` (`cert_file`, `key_file`, and `client_ca_file` for
/// mutual TLS); `None` when no certificate is configured.
pub fn server_tls(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>> {
    if tls.cert_file.is_empty() {
        return Ok(None);
    }
    install_crypto_provider();
    let cert = pem("tls.cert_file", Path::new(&tls.cert_file), "CERTIFICATE")?;
    let key = pem("tls.key_file", Path::new(&tls.key_file), "PRIVATE KEY")?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if !tls.client_ca_file.is_empty() {
        let ca = pem(
            "tls.client_ca_file",
            Path::new(&tls.client_ca_file),
            "CERTIFICATE",
        )?;
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(Some(config))
}

/// The client's side of TLS: files as given on the command line or in `[tls]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates that sign the coordinator's certificate (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// This client's certificate chain (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// Its private key.
    pub key_file: Option<PathBuf>,
    /// The name to verify in the coordinator's certificate (default: the URL's host).
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The client keys of `[tls]` (what `ddpm launch` gives its workers).
    pub fn from_config(tls: &TlsConfig) -> Self {
        let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        Self {
            ca_file: path(&tls.ca_file),
            cert_file: path(&tls.client_cert_file),
            key_file: path(&tls.client_key_file),
            server_name: (!tls.server_name.is_empty()).then(|| tls.server_name.clone()),
        }
    }

    fn is_set(&self) -> bool {
        self != &Self::default()
    }
}

/// How a client reaches the coordinator: its token and its TLS files.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// Sent with every call when set.
    pub token: Option<Token>,
    /// Used for `https://` URLs.
    pub tls: ClientTls,
}

/// The largest message a client accepts from the coordinator (its answers are small; the
/// biggest is the resolved config).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

impl ClientSecurity {
    /// An endpoint for `url` (`http://HOST:PORT`, or `https://HOST:PORT` for TLS, with the
    /// CA, client certificate and server name of [`ClientSecurity::tls`]). TLS files with
    /// an `http://` URL are an error, so that a typo cannot silently turn encryption off.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let bad = |reason: String| AuthError::Url {
            url: url.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| {
            bad(format!(
                "expected http://HOST:PORT or https://HOST:PORT: {e}"
            ))
        })?;
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "https" => {}
            "http" if self.tls.is_set() => {
                return Err(bad(
                    "TLS certificates were given (--tls-* or [tls]) but the URL is http://; use https://".into(),
                ))
            }
            "http" => return Ok(endpoint),
            other => {
                return Err(bad(format!(
                    "expected the scheme http or https, got {other:?}"
                )))
            }
        }
        install_crypto_provider();
        let t = &self.tls;
        let mut config = ClientTlsConfig::new();
        match &t.ca_file {
            Some(ca) => {
                config = config.ca_certificate(Certificate::from_pem(pem(
                    "--tls-ca",
                    ca,
                    "CERTIFICATE",
                )?))
            }
            None => config = config.with_native_roots(),
        }
        match (&t.cert_file, &t.key_file) {
            (Some(c), Some(k)) => {
                config = config.identity(Identity::from_pem(
                    pem("--tls-cert", c, "CERTIFICATE")?,
                    pem("--tls-key", k, "PRIVATE KEY")?,
                ))
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    "a client certificate needs both --tls-cert and --tls-key".into(),
                ))
            }
        }
        if let Some(name) = &t.server_name {
            config = config.domain_name(name.clone());
        }
        endpoint
            .tls_config(config)
            .map_err(|source| AuthError::Transport {
                what: format!("TLS for {url}"),
                source,
            })
    }

    /// `channel` with the token added to every call.
    pub fn authorize(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, BearerToken(self.authorize_header()))
    }

    fn authorize_header(&self) -> Option<MetadataValue<Ascii>> {
        self.token.as_ref().map(|t| {
            format!("Bearer {}", t.expose())
                .parse()
                .expect("a checked token is a valid header value")
        })
    }
}

/// The flags every client of the coordinator takes (`worker`, `evaluator`, `ddpm status`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// File holding the run's bearer token (default: the DDPM_AUTH_TOKEN environment
    /// variable, when set).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the coordinator's certificate, for https:// URLs
    /// (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), when the coordinator requires one (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl ClientArgs {
    /// The token (the file, or DDPM_AUTH_TOKEN) and the TLS files.
    pub fn security(&self) -> Result<ClientSecurity> {
        Ok(ClientSecurity {
            token: Token::for_client(self.token_file.as_deref())?,
            tls: ClientTls {
                ca_file: self.tls_ca.clone(),
                cert_file: self.tls_cert.clone(),
                key_file: self.tls_key.clone(),
                server_name: self.tls_server_name.clone(),
            },
        })
    }
}

#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki;

#[cfg(test)]
mod tests;
