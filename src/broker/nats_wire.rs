//! A NATS protocol connection of our own, opened and handshaken here, for the core-NATS event
//! sink ([`crate::sink::nats`]): it writes `HPUB`s straight into a buffer it owns, which the
//! general-purpose client cannot (a header map and a channel message per publish were most of
//! amibus's CPU per event on core NATS, issue #18).
//!
//! Owns: parsing a server URL, the TCP connection, the server's `INFO`, TLS (rustls with
//! `ring`, the system's roots plus a configured CA, an optional client certificate), and the
//! `CONNECT` with every authentication [`NatsConnection`] can name (token, user and password,
//! an nkey seed, a credentials file; user info in the URL), confirmed by a `PING`/`PONG`.
//! What happens after the handshake is the caller's.
//!
//! Must never: log a secret, or accept a server that refuses the credentials or, when TLS is
//! required, one that does not offer it.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::nats::{NatsAuth, NatsConnection, NatsTls, Secret};

/// The longest protocol line accepted from the server (an `INFO` with many cluster URLs).
const MAX_LINE: usize = 1 << 20;

/// Why a connection could not be opened, or broke.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server said `-ERR` (authorization violation, a full server, ...).
    #[error("server refused: {0}")]
    Refused(String),
    #[error("connection closed by the server")]
    Closed,
    /// The server entered lame duck mode (it is shutting down): the client leaves for another
    /// server. `drained`: everything written on the connection was confirmed first.
    #[error("the server entered lame duck mode")]
    LameDuck { drained: bool },
}

impl WireError {
    /// Every [`WireError::kind`] a broken connection can have (not `config`).
    pub const KINDS: [&'static str; 7] = [
        "closed",
        "io",
        "lame_duck",
        "protocol",
        "refused",
        "timeout",
        "tls",
    ];

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::Config(_) => "config",
            WireError::Io(_) => "io",
            WireError::Timeout(_) => "timeout",
            WireError::Tls(_) => "tls",
            WireError::Protocol(_) => "protocol",
            WireError::Refused(_) => "refused",
            WireError::Closed => "closed",
            WireError::LameDuck { .. } => "lame_duck",
        }
    }
}

/// One server URL: `nats://[user:pass@|token@]host[:port]`, `tls://...`, or `host[:port]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    user: Option<Secret>,
    pass: Option<Secret>,
}

impl std::fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// Without the user info.
impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "tls" } else { "nats" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl ServerUrl {
    /// # Errors
    /// An unknown scheme (`ws://` is not supported here), no host, or a bad port.
    pub fn parse(url: &str) -> Result<ServerUrl, WireError> {
        let bad = |why: &str| WireError::Config(format!("server address `{}`: {why}", redact(url)));
        let (tls, rest) = match url.split_once("://") {
            Some(("nats", rest)) => (false, rest),
            Some(("tls", rest)) => (true, rest),
            Some((other, _)) => return Err(bad(&format!("scheme `{other}` is not supported"))),
            None => (false, url),
        };
        let rest = rest.split('/').next().unwrap_or_default();
        let (userinfo, hostport) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            (host, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => 4222,
        };
        let (user, pass) = match userinfo {
            None | Some("") => (None, None),
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (Some(Secret::new(u)), Some(Secret::new(p))),
                None => (Some(Secret::new(info)), None),
            },
        };
        Ok(ServerUrl {
            tls,
            host: host.to_owned(),
            port,
            user,
            pass,
        })
    }
}

/// `nats://user:pass@host` → `nats://***@host`.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_at(url.find("://").map_or(0, |i| i + 3));
    match rest.split('/').next().unwrap_or_default().rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// The fields of the server's `INFO` that matter here.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServerInfo {
    #[serde(default)]
    pub server_id: String,
    #[serde(default)]
    pub max_payload: i64,
    #[serde(default)]
    pub headers: bool,
    #[serde(default)]
    pub tls_required: bool,
    #[serde(default)]
    pub tls_available: bool,
    #[serde(default)]
    pub nonce: Option<String>,
    /// The cluster's other servers, as `host:port`.
    #[serde(default)]
    pub connect_urls: Vec<String>,
    /// Lame duck mode: the server is shutting down and will close its clients' connections.
    #[serde(default)]
    pub ldm: bool,
}

impl ServerInfo {
    pub fn parse(json: &[u8]) -> Result<ServerInfo, WireError> {
        serde_json::from_slice(json).map_err(|e| WireError::Protocol(format!("bad INFO: {e}")))
    }

    /// The largest message (headers and payload) the server takes.
    pub fn max_payload(&self) -> usize {
        usize::try_from(self.max_payload)
            .ok()
            .filter(|&m| m > 0)
            .unwrap_or(1 << 20)
    }
}

/// A byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A handshaken connection.
pub struct Conn {
    pub io: Box<dyn Io>,
    pub info: ServerInfo,
    /// Bytes the server sent after the handshake's `PONG`.
    pub read: BytesMut,
    pub url: ServerUrl,
}

/// What is prepared once and used for every (re)connect: the TLS configuration (reading the
/// system's roots takes a while) and the credentials.
pub struct Dialer {
    /// The configured servers, then the ones their cluster advertised.
    urls: std::sync::Mutex<Vec<ServerUrl>>,
    configured: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
    tls_error: Option<String>,
    require_tls: bool,
    /// TLS before the server's `INFO` (its `handshake_first`).
    tls_first: bool,
    auth: Auth,
    name: Option<String>,
    timeout: Duration,
}

enum Auth {
    None,
    Token(Secret),
    User(String, Secret),
    Nkey(nkeys::KeyPair),
    Jwt(Secret, nkeys::KeyPair),
}

impl Dialer {
    /// # Errors
    /// No server, a bad URL, an unreadable credentials file or CA, a bad seed.
    pub fn new(cfg: &NatsConnection) -> Result<Dialer, WireError> {
        if cfg.servers.is_empty() {
            return Err(WireError::Config("no servers given".into()));
        }
        let urls = cfg
            .servers
            .iter()
            .map(|s| ServerUrl::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let seed = |s: &str, what: &str| {
            nkeys::KeyPair::from_seed(s.trim())
                .map_err(|e| WireError::Config(format!("{what}: not a valid nkey seed: {e}")))
        };
        let auth = match &cfg.auth {
            NatsAuth::None => Auth::None,
            NatsAuth::Token(t) => Auth::Token(t.clone()),
            NatsAuth::UserPassword { user, password } => Auth::User(user.clone(), password.clone()),
            NatsAuth::NkeySeed(s) => Auth::Nkey(seed(s.expose(), "nkey")?),
            NatsAuth::CredentialsFile(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    WireError::Config(format!(
                        "cannot read credentials file {}: {e}",
                        path.display()
                    ))
                })?;
                let (jwt, s) = parse_credentials(&text).ok_or_else(|| {
                    WireError::Config(format!(
                        "credentials file {} holds no user JWT and nkey seed",
                        path.display()
                    ))
                })?;
                Auth::Jwt(Secret::new(jwt), seed(&s, "credentials file")?)
            }
        };
        // Built only when some server may need it; a configuration error surfaces at the first
        // server that does (a plain server needs no CA).
        let wants_tls = cfg.tls != NatsTls::default() || urls.iter().any(|u| u.tls);
        let (tls, tls_error) = match tls_config(&cfg.tls) {
            Ok(c) => (Some(c), None),
            Err(e) if wants_tls => return Err(WireError::Tls(e)),
            Err(e) => (None, Some(e)),
        };
        Ok(Dialer {
            configured: urls.len(),
            urls: std::sync::Mutex::new(urls),
            tls,
            tls_error,
            require_tls: cfg.tls.require,
            tls_first: cfg.tls.handshake_first,
            auth,
            name: cfg.name.clone(),
            timeout: cfg.connect_timeout,
        })
    }

    /// How many servers are known: the configured ones first (`0..configured()`), then those
    /// their cluster advertised.
    pub fn count(&self) -> usize {
        self.urls.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn configured(&self) -> usize {
        self.configured
    }

    /// Server `index` (wrapping around).
    pub fn url(&self, index: usize) -> ServerUrl {
        let urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        urls[index % urls.len()].clone()
    }

    /// Add the servers a cluster advertises (`connect_urls` of an `INFO`) that are not known
    /// yet, with the scheme and the URL credentials of the first configured server, so a
    /// configuration naming one seed server fails over to the rest of its cluster. At most 64
    /// are kept.
    pub fn learn(&self, info: &ServerInfo) {
        let mut urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        for advertised in &info.connect_urls {
            if urls.len() >= self.configured + 64 {
                break;
            }
            let Ok(mut url) = ServerUrl::parse(advertised) else {
                tracing::debug!(url = %advertised, "nats: an advertised server URL that does not parse");
                continue;
            };
            let seed = &urls[0];
            url.tls = seed.tls;
            url.user = seed.user.clone();
            url.pass = seed.pass.clone();
            if !urls
                .iter()
                .any(|u| u.host == url.host && u.port == url.port)
            {
                tracing::info!(server = %url, "nats: the cluster advertised a server");
                urls.push(url);
            }
        }
    }

    /// Open and handshake server `index` (see [`Dialer::count`]), within the connect timeout,
    /// and learn the servers it advertises.
    ///
    /// # Errors
    /// See [`WireError`].
    pub async fn dial(&self, index: usize) -> Result<Conn, WireError> {
        let url = self.url(index);
        let conn = tokio::time::timeout(self.timeout, self.handshake(&url))
            .await
            .map_err(|_| WireError::Timeout(self.timeout))??;
        self.learn(&conn.info);
        Ok(conn)
    }

    async fn handshake(&self, url: &ServerUrl) -> Result<Conn, WireError> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
        tcp.set_nodelay(true)?;
        let mut read = BytesMut::with_capacity(4096);
        let (mut io, info, tls): (Box<dyn Io>, _, _) = if self.tls_first {
            let mut io = self.start_tls(url, tcp).await?;
            let info = read_info(&mut io, &mut read).await?;
            (Box::new(io), info, true)
        } else {
            let mut tcp = tcp;
            let info = read_info(&mut tcp, &mut read).await.map_err(|e| match e {
                // A `handshake_first` server waits for a TLS hello and says nothing.
                WireError::Timeout(_) | WireError::Closed => WireError::Protocol(format!(
                    "no INFO from the server ({e}); if it is configured with TLS \
                     handshake_first, set tls.handshake_first"
                )),
                e => e,
            })?;
            let tls = url.tls || self.require_tls || info.tls_required;
            if tls && !info.tls_required && !info.tls_available {
                return Err(WireError::Tls("the server does not offer TLS".into()));
            }
            let io: Box<dyn Io> = if tls {
                if !read.is_empty() {
                    return Err(WireError::Protocol("data before the TLS handshake".into()));
                }
                Box::new(self.start_tls(url, tcp).await?)
            } else {
                Box::new(tcp)
            };
            (io, info, tls)
        };
        if !info.headers {
            return Err(WireError::Protocol(
                "the server does not support headers (nats-server 2.2 or later does)".into(),
            ));
        }
        let mut hello = b"CONNECT ".to_vec();
        hello.extend(self.connect_json(url, &info, tls)?.as_bytes());
        hello.extend(b"\r\nPING\r\n");
        io.write_all(&hello).await?;
        io.flush().await?;
        loop {
            let line = read_line(&mut io, &mut read).await?;
            match line.as_slice() {
                b"PONG" => break,
                b"+OK" => {}
                b"PING" => io.write_all(b"PONG\r\n").await?,
                l if l.starts_with(b"-ERR") => return Err(refusal(l)),
                l if l.starts_with(b"INFO ") => {}
                l => {
                    return Err(WireError::Protocol(format!(
                        "unexpected `{}` during the handshake",
                        String::from_utf8_lossy(&l[..l.len().min(80)])
                    )));
                }
            }
        }
        Ok(Conn {
            io,
            info,
            read,
            url: url.clone(),
        })
    }

    async fn start_tls(
        &self,
        url: &ServerUrl,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, WireError> {
        let config = self
            .tls
            .clone()
            .ok_or_else(|| WireError::Tls(self.tls_error.clone().unwrap_or_default()))?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| WireError::Tls(format!("bad server name `{}`: {e}", url.host)))?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| WireError::Tls(e.to_string()))
    }

    fn connect_json(
        &self,
        url: &ServerUrl,
        info: &ServerInfo,
        tls: bool,
    ) -> Result<String, WireError> {
        let mut o = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "tls_required": tls,
            "lang": "rust-amibus",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "headers": true,
            "no_responders": true,
            "echo": false,
        });
        if let Some(name) = &self.name {
            o["name"] = name.as_str().into();
        }
        let sign = |kp: &nkeys::KeyPair| -> Result<String, WireError> {
            let nonce = info.nonce.as_deref().ok_or_else(|| {
                WireError::Protocol("the server sent no nonce to sign; is nkey auth on?".into())
            })?;
            let sig = kp
                .sign(nonce.as_bytes())
                .map_err(|e| WireError::Config(format!("cannot sign the nonce: {e}")))?;
            use base64::Engine as _;
            Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig))
        };
        match (&self.auth, &url.user, &url.pass) {
            (Auth::None, Some(user), Some(pass)) => {
                o["user"] = user.expose().into();
                o["pass"] = pass.expose().into();
            }
            (Auth::None, Some(token), None) => o["auth_token"] = token.expose().into(),
            (Auth::None, None, _) => {}
            (Auth::Token(t), ..) => o["auth_token"] = t.expose().into(),
            (Auth::User(u, p), ..) => {
                o["user"] = u.as_str().into();
                o["pass"] = p.expose().into();
            }
            (Auth::Nkey(kp), ..) => {
                o["nkey"] = kp.public_key().into();
                o["sig"] = sign(kp)?.into();
            }
            (Auth::Jwt(jwt, kp), ..) => {
                o["jwt"] = jwt.expose().into();
                o["sig"] = sign(kp)?.into();
            }
        }
        Ok(o.to_string())
    }
}

/// `-ERR 'Authorization Violation'` → the text in the quotes.
pub fn refusal(line: &[u8]) -> WireError {
    let text = String::from_utf8_lossy(line.strip_prefix(b"-ERR").unwrap_or(line));
    WireError::Refused(text.trim().trim_matches('\'').to_owned())
}

/// The user JWT and the nkey seed of a `.creds` file: the first line after each of its first
/// two `-----BEGIN ...-----` lines.
fn parse_credentials(text: &str) -> Option<(String, String)> {
    let mut items = Vec::with_capacity(2);
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if line.starts_with("---") && line.contains("BEGIN") {
            let item = lines.by_ref().map(str::trim).find(|l| !l.is_empty())?;
            items.push(item.to_owned());
            if items.len() == 2 {
                break;
            }
        }
    }
    let seed = items.pop()?;
    let jwt = items.pop()?;
    Some((jwt, seed))
}

/// Read one CRLF-terminated line (without its CRLF), keeping what follows in `buf`.
/// The server's first line, which must be its `INFO`.
async fn read_info<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<ServerInfo, WireError> {
    let line = read_line(r, buf).await?;
    match line.strip_prefix(b"INFO ") {
        Some(json) => ServerInfo::parse(json),
        None => Err(WireError::Protocol(format!(
            "expected INFO, got `{}`",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        ))),
    }
}

async fn read_line<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Vec<u8>, WireError> {
    loop {
        if let Some(end) = memchr::memmem::find(buf, b"\r\n") {
            let line = buf.split_to(end + 2);
            return Ok(line[..end].to_vec());
        }
        if buf.len() > MAX_LINE {
            return Err(WireError::Protocol("a line longer than 1 MiB".into()));
        }
        if r.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// The rustls client configuration: the system's roots and the configured CA, and the client
/// certificate if one is configured.
fn tls_config(tls: &NatsTls) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &tls.ca_file {
        crate::tls::add_ca_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        return Err("no trusted roots: the system has none and no ca_file is set".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("tls client_cert and client_key go together".into()),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_scheme_port_and_user_info() {
        let u = ServerUrl::parse("nats://alice:pw@10.0.0.1:4333").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "10.0.0.1", 4333));
        assert_eq!(u.user.as_ref().map(Secret::expose), Some("alice"));
        assert_eq!(u.pass.as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(u.to_string(), "nats://10.0.0.1:4333");
        assert!(!format!("{u:?}").contains("pw"));

        let u = ServerUrl::parse("tls://tok@nats.example").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "nats.example", 4222)
        );
        assert_eq!(u.user.as_ref().map(Secret::expose), Some("tok"));
        assert!(u.pass.is_none());

        let u = ServerUrl::parse("[::1]:5000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 5000));
        assert_eq!(u.to_string(), "nats://[::1]:5000");

        for bad in [
            "ws://h:1",
            "nats://:4222",
            "nats://h:port",
            "nats://u:secret@h:x",
        ] {
            let e = ServerUrl::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn advertised_servers_are_learned_once_with_the_seeds_scheme_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["a.example".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let dialer = Dialer::new(&NatsConnection {
            servers: vec!["tls://u:p@a.example:1".into()],
            tls: NatsTls {
                ca_file: Some(ca),
                ..NatsTls::default()
            },
            ..NatsConnection::default()
        })
        .unwrap();
        let info = ServerInfo::parse(
            br#"{"connect_urls":["b.example:2","a.example:1","[::1]:3","b.example:2","bad:port"]}"#,
        )
        .unwrap();
        dialer.learn(&info);
        assert_eq!((dialer.configured(), dialer.count()), (1, 3));
        let b = dialer.url(1);
        assert_eq!((b.tls, b.host.as_str(), b.port), (true, "b.example", 2));
        assert_eq!(b.user.as_ref().map(Secret::expose), Some("u"));
        assert_eq!(b.pass.as_ref().map(Secret::expose), Some("p"));
        assert_eq!(dialer.url(2).to_string(), "tls://[::1]:3");
        assert_eq!(
            dialer.url(3).to_string(),
            "tls://a.example:1",
            "wraps around"
        );
    }

    #[test]
    fn credentials_files_give_the_jwt_and_the_seed() {
        let creds = "-----BEGIN NATS USER JWT-----\neyJhbGc.payload.sig\n------END NATS USER JWT------\n\n\
                     ************************* IMPORTANT *************************\n\
                     NKEY Seed printed below can be used to sign and prove identity.\n\n\
                     -----BEGIN USER NKEY SEED-----\nSUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4\n\
                     ------END USER NKEY SEED------\n";
        assert_eq!(
            parse_credentials(creds),
            Some((
                "eyJhbGc.payload.sig".into(),
                "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4".into()
            ))
        );
        assert_eq!(
            parse_credentials("-----BEGIN NATS USER JWT-----\nabc\n"),
            None
        );
        assert_eq!(parse_credentials(""), None);
    }

    #[test]
    fn refusals_keep_the_server_text() {
        assert_eq!(
            refusal(b"-ERR 'Authorization Violation'").to_string(),
            "server refused: Authorization Violation"
        );
    }
}
