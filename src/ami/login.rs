//! The start of an AMI session: banner, authentication, event mask and filter push-down.
//!
//! Owns: the login exchange on a freshly connected stream (`shared/ami/WIRE.md` §1, §5, §7).
//!
//! Must never: log or format the secret (only the MD5 key, which is useless without the
//! challenge, crosses the wire with `auth = "md5"`); consume bytes it does not need. The read
//! buffer and the codec are the caller's: whatever arrived behind the last login response
//! (events in the same read, a `FullyBooted`) stays in the buffer, and every frame decoded while
//! waiting that is not a login response is returned in [`LoginOk::early`], so the read loop
//! loses nothing.
//!
//! When filters are configured, Login asks for `Events: off`, the filters are added, and only
//! then is the configured mask switched on with `Action: Events`, so no unfiltered event slips
//! through between login and the filters.

use bytes::BytesMut;
use md5::{Digest, Md5};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

use super::action::{Action, EncodeError};
use super::codec::{AmiCodec, Decoded};
use super::frame::{FrameKind, OwnedFrame};
use super::server::{Auth, Filter, ServerConfig};
use crate::secret::Secret;

/// Why a login did not complete.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("i/o error during login: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection during login")]
    Closed,
    #[error("login did not complete in time")]
    Timeout,
    #[error("the server did not start with an `Asterisk Call Manager/` banner")]
    NoBanner,
    #[error("unexpected login response: {0}")]
    Protocol(String),
    /// Wrong user or secret, ACL refusal, or `Login Already In Use`. Asterisk closes the socket.
    #[error("authentication failed: {message}")]
    AuthFailed { message: String },
    /// A configured filter was refused: the configuration must be fixed.
    #[error("filter `{filter}` refused by the server: {message}")]
    FilterRejected { filter: String, message: String },
    #[error("cannot encode a login action: {0}")]
    Encode(#[from] EncodeError),
}

impl LoginError {
    /// Whether reconnecting soon may help (network trouble), as opposed to a refusal that
    /// needs someone to change the configuration or the server.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            LoginError::Io(_)
                | LoginError::Closed
                | LoginError::Timeout
                | LoginError::NoBanner
                | LoginError::Protocol(_)
        )
    }

    pub fn is_auth_failure(&self) -> bool {
        matches!(self, LoginError::AuthFailed { .. })
    }

    /// A short stable label for records and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            LoginError::Io(_) => "io error",
            LoginError::Closed => "eof",
            LoginError::Timeout => "login timeout",
            LoginError::NoBanner | LoginError::Protocol(_) => "protocol error",
            LoginError::AuthFailed { .. } => "auth failure",
            LoginError::FilterRejected { .. } => "filter rejected",
            LoginError::Encode(_) => "config error",
        }
    }
}

/// A completed login.
#[derive(Debug)]
pub struct LoginOk {
    /// From the banner: `11.0.0` for Asterisk 22.
    pub ami_version: String,
    /// Frames decoded while waiting for login responses that were not those responses (events
    /// after the Login response), in wire order. The read loop hands them on first.
    pub early: Vec<Decoded>,
}

/// `lowercase_hex(md5(challenge + secret))`, the `Key:` of an MD5 login.
pub fn md5_key(challenge: &str, secret: &Secret) -> String {
    let mut h = Md5::new();
    h.update(challenge.as_bytes());
    h.update(secret.expose().as_bytes());
    let digest = h.finalize();
    let mut out = String::with_capacity(32);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Run the login exchange on `io`. `buf` and `codec` are the session's read buffer and decoder;
/// they keep whatever follows the last login response. `next_id` makes ActionIDs. The caller
/// bounds the whole exchange with [`ServerConfig::login_timeout`].
///
/// # Errors
/// [`LoginError`]; see [`LoginError::is_retriable`].
pub async fn login<S>(
    io: &mut S,
    buf: &mut BytesMut,
    codec: &mut AmiCodec,
    cfg: &ServerConfig,
    next_id: &mut (dyn FnMut() -> String + Send),
) -> Result<LoginOk, LoginError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut reader = Reader {
        io,
        buf,
        codec,
        early: Vec::new(),
    };
    let banner = reader.next_frame().await?;
    let ami_version = match banner.frame().banner_version() {
        Some(v) if banner.frame().kind() == FrameKind::Banner => {
            String::from_utf8_lossy(v).into_owned()
        }
        _ => return Err(LoginError::NoBanner),
    };

    let events_at_login = if cfg.filters.is_empty() {
        cfg.events.as_str()
    } else {
        "off"
    };
    let login = match cfg.auth {
        Auth::Md5 => {
            let challenge = Action::new("Challenge").header("AuthType", "MD5");
            let resp = reader.request(&challenge, next_id()).await?;
            let f = resp.frame();
            if !is_success(&resp) {
                return Err(LoginError::Protocol(format!(
                    "Challenge refused: {}",
                    message(&resp)
                )));
            }
            let challenge = f
                .get("Challenge")
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    LoginError::Protocol("Challenge response without a challenge".into())
                })?;
            Action::new("Login")
                .header("AuthType", "MD5")
                .header("Username", cfg.username.as_str())
                .header("Key", md5_key(&challenge, &cfg.secret))
                .header("Events", events_at_login)
        }
        Auth::Plain => Action::new("Login")
            .header("Username", cfg.username.as_str())
            .header("Secret", cfg.secret.expose())
            .header("Events", events_at_login),
    };
    let resp = reader.request(&login, next_id()).await?;
    if !is_success(&resp) {
        return Err(LoginError::AuthFailed {
            message: message(&resp),
        });
    }

    for filter in &cfg.filters {
        let action = match filter {
            Filter::Legacy(p) => Action::new("Filter")
                .header("Operation", "Add")
                .header("Filter", p.as_str()),
            Filter::Advanced { criteria, pattern } => {
                let a = Action::new("Filter")
                    .header("Operation", "Add")
                    .header("MatchCriteria", criteria.as_str());
                match pattern {
                    Some(p) => a.header("Filter", p.as_str()),
                    None => a,
                }
            }
        };
        let resp = reader.request(&action, next_id()).await?;
        if !is_success(&resp) {
            return Err(LoginError::FilterRejected {
                filter: filter.to_string(),
                message: message(&resp),
            });
        }
    }
    if !cfg.filters.is_empty() && !cfg.events.eq_ignore_ascii_case("off") {
        let action = Action::new("Events").header("EventMask", cfg.events.as_str());
        let resp = reader.request(&action, next_id()).await?;
        if !is_success(&resp) {
            return Err(LoginError::Protocol(format!(
                "Events refused: {}",
                message(&resp)
            )));
        }
    }
    Ok(LoginOk {
        ami_version,
        early: reader.early,
    })
}

fn is_success(resp: &OwnedFrame) -> bool {
    resp.frame()
        .get("Response")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"Success"))
}

fn message(resp: &OwnedFrame) -> String {
    resp.frame()
        .get("Message")
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

struct Reader<'a, S> {
    io: &'a mut S,
    buf: &'a mut BytesMut,
    codec: &'a mut AmiCodec,
    early: Vec<Decoded>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<'_, S> {
    /// The next frame; parse errors are kept for the read loop.
    async fn next_frame(&mut self) -> Result<OwnedFrame, LoginError> {
        loop {
            match self.codec.decode(self.buf)? {
                Some(Decoded::Frame(f)) => return Ok(f),
                Some(other) => self.early.push(other),
                None => {
                    if self.buf.capacity() - self.buf.len() < 4096 {
                        self.buf.reserve(8192);
                    }
                    if self.io.read_buf(self.buf).await? == 0 {
                        return Err(LoginError::Closed);
                    }
                }
            }
        }
    }

    /// Send `action` with `id` and wait for the response carrying that ActionID. Other frames
    /// are kept for the read loop.
    async fn request(&mut self, action: &Action, id: String) -> Result<OwnedFrame, LoginError> {
        let mut out = BytesMut::new();
        action.encode(Some(&id), &mut out)?;
        self.io.write_all(&out).await?;
        self.io.flush().await?;
        loop {
            let f = self.next_frame().await?;
            let view = f.frame();
            if view.get("Response").is_some() && view.get("ActionID") == Some(id.as_bytes()) {
                return Ok(f);
            }
            self.early.push(Decoded::Frame(f));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_rfc1321() {
        // RFC 1321 test suite: MD5("message digest").
        assert_eq!(
            md5_key("message ", &Secret::new("digest")),
            "f96b697d7cb7938d525a2f31aaf161d0"
        );
        assert_eq!(
            md5_key("", &Secret::new("")),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
    }

    #[test]
    fn retriability() {
        assert!(LoginError::Closed.is_retriable());
        assert!(
            !LoginError::AuthFailed {
                message: "Authentication failed".into()
            }
            .is_retriable()
        );
        assert!(
            !LoginError::FilterRejected {
                filter: "x".into(),
                message: "y".into()
            }
            .is_retriable()
        );
    }
}
