//! AMI actions as values, and their encoding to wire bytes.
//!
//! Owns: [`Action`] and [`Action::encode`], the only place that writes action bytes.
//!
//! Must never: write a line Asterisk would split or truncate. A CR or LF inside a key or value
//! would let a caller inject a second header or a second action, a NUL ends the value where
//! Asterisk reads it (C strings), other control characters have no meaning on an AMI line
//! (TAB excepted, which Asterisk keeps), and a line longer than
//! [`MAX_LINE`] bytes is discarded by Asterisk (`char inbuf[1025]`), so both are refused before
//! anything is written. `ActionID` is owned by the connection and refused as a caller header.

use bytes::{BufMut, BytesMut};

/// The longest line (without CRLF) Asterisk always accepts.
pub const MAX_LINE: usize = 1022;

/// One action: `Action: <name>` followed by headers in order (duplicates allowed, e.g.
/// `Variable:` in Originate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    pub name: String,
    pub headers: Vec<(String, String)>,
}

/// Why an action cannot be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the action name is empty")]
    EmptyName,
    #[error("header {index}: empty key")]
    EmptyKey { index: usize },
    #[error("header {index}: CR or LF in {what}")]
    LineBreak { index: usize, what: &'static str },
    #[error("header {index}: control character {byte:#04x} in {what}")]
    ControlChar {
        index: usize,
        what: &'static str,
        byte: u8,
    },
    #[error("header {index}: ':' in the key")]
    ColonInKey { index: usize },
    #[error("header {index}: line of {len} bytes is longer than {MAX_LINE}")]
    LineTooLong { index: usize, len: usize },
    #[error("header {index}: ActionID is set by the connection")]
    ActionId { index: usize },
}

impl Action {
    /// A new action without headers.
    ///
    /// ```
    /// use amibus::ami::Action;
    /// let a = Action::new("Getvar").header("Variable", "AMPMGR");
    /// let mut out = bytes::BytesMut::new();
    /// a.encode(Some("x-1"), &mut out).unwrap();
    /// assert_eq!(&out[..], b"Action: Getvar\r\nActionID: x-1\r\nVariable: AMPMGR\r\n\r\n");
    /// ```
    pub fn new(name: impl Into<String>) -> Self {
        Action {
            name: name.into(),
            headers: Vec::new(),
        }
    }

    /// Append a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// The first value of header `key` (ASCII case ignored).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Check the action without writing it.
    ///
    /// # Errors
    /// As [`Action::encode`].
    pub fn validate(&self) -> Result<(), EncodeError> {
        if self.name.is_empty() {
            return Err(EncodeError::EmptyName);
        }
        check_line(0, "Action", &self.name)?;
        for (i, (k, v)) in self.headers.iter().enumerate() {
            let index = i + 1;
            if k.is_empty() {
                return Err(EncodeError::EmptyKey { index });
            }
            if k.contains(':') {
                return Err(EncodeError::ColonInKey { index });
            }
            if k.eq_ignore_ascii_case("ActionID") {
                return Err(EncodeError::ActionId { index });
            }
            check_line(index, k, v)?;
        }
        Ok(())
    }

    /// Append the wire bytes to `out`: `Action:`, then `ActionID:` if given, then the headers,
    /// then the empty line. Nothing is appended on error.
    ///
    /// # Errors
    /// [`EncodeError`] if a key or value holds CR or LF, a key is empty, holds `:` or is
    /// `ActionID`, or a line would be longer than [`MAX_LINE`].
    pub fn encode(&self, action_id: Option<&str>, out: &mut BytesMut) -> Result<(), EncodeError> {
        self.validate()?;
        if let Some(id) = action_id {
            check_line(0, "ActionID", id)?;
        }
        let len = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
            + self.name.len()
            + action_id.map_or(0, |id| id.len() + 12)
            + 12;
        out.reserve(len);
        put_line(out, "Action", &self.name);
        if let Some(id) = action_id {
            put_line(out, "ActionID", id);
        }
        for (k, v) in &self.headers {
            put_line(out, k, v);
        }
        out.put_slice(b"\r\n");
        Ok(())
    }
}

/// A byte AMI cannot carry inside a line: every ASCII control character but TAB (CR and LF
/// are reported as line breaks).
fn is_forbidden(b: u8) -> bool {
    (b.is_ascii_control() && b != b'\t') || b == 0x7f
}

fn check_text(index: usize, what: &'static str, text: &str) -> Result<(), EncodeError> {
    if let Some(&byte) = text.as_bytes().iter().find(|&&b| is_forbidden(b)) {
        return Err(if byte == b'\r' || byte == b'\n' {
            EncodeError::LineBreak { index, what }
        } else {
            EncodeError::ControlChar { index, what, byte }
        });
    }
    Ok(())
}

fn check_line(index: usize, key: &str, value: &str) -> Result<(), EncodeError> {
    check_text(index, "key", key)?;
    check_text(index, "value", value)?;
    let len = key.len() + 2 + value.len();
    if len > MAX_LINE {
        return Err(EncodeError::LineTooLong { index, len });
    }
    Ok(())
}

fn put_line(out: &mut BytesMut, key: &str, value: &str) {
    out.put_slice(key.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(a: &Action) -> Result<Vec<u8>, EncodeError> {
        let mut out = BytesMut::new();
        a.encode(Some("id-1"), &mut out).map(|()| out.to_vec())
    }

    #[test]
    fn encodes_in_order_with_duplicates() {
        let a = Action::new("Originate")
            .header("Channel", "Local/1@ctx")
            .header("Variable", "A=1")
            .header("Variable", "B=")
            .header("Async", "true");
        assert_eq!(
            enc(&a).unwrap(),
            b"Action: Originate\r\nActionID: id-1\r\nChannel: Local/1@ctx\r\nVariable: A=1\r\nVariable: B=\r\nAsync: true\r\n\r\n"
        );
    }

    #[test]
    fn refuses_line_breaks_everywhere() {
        assert_eq!(
            enc(&Action::new("Ping\r\nAction: Logoff")),
            Err(EncodeError::LineBreak {
                index: 0,
                what: "value"
            })
        );
        assert_eq!(
            enc(&Action::new("Setvar").header("Value", "x\n\nAction: Logoff")),
            Err(EncodeError::LineBreak {
                index: 1,
                what: "value"
            })
        );
        assert_eq!(
            enc(&Action::new("Setvar").header("Va\rlue", "x")),
            Err(EncodeError::LineBreak {
                index: 1,
                what: "key"
            })
        );
        let mut out = BytesMut::new();
        assert!(Action::new("Ping").encode(Some("a\nb"), &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn refuses_nul_and_other_control_characters_but_keeps_tab() {
        assert_eq!(
            enc(&Action::new("Originate").header("Channel", "Local/1@a\0b")),
            Err(EncodeError::ControlChar {
                index: 1,
                what: "value",
                byte: 0
            })
        );
        assert_eq!(
            enc(&Action::new("Ping").header("K\x1b", "v")),
            Err(EncodeError::ControlChar {
                index: 1,
                what: "key",
                byte: 0x1b
            })
        );
        assert!(enc(&Action::new("Ping").header("K", "a\x7fb")).is_err());
        assert!(enc(&Action::new("Pi\0ng")).is_err());
        assert!(enc(&Action::new("Setvar").header("Value", "a\tb")).is_ok());
        // Non-ASCII text is fine (Asterisk passes UTF-8 through).
        assert!(enc(&Action::new("Setvar").header("Value", "Zoë")).is_ok());
    }

    #[test]
    fn line_length_limit_is_exact() {
        let ok = "v".repeat(MAX_LINE - "UserEvent: ".len());
        assert!(enc(&Action::new("UserEvent").header("UserEvent", ok.clone())).is_ok());
        let long = format!("{ok}v");
        assert_eq!(
            enc(&Action::new("UserEvent").header("UserEvent", long)),
            Err(EncodeError::LineTooLong {
                index: 1,
                len: MAX_LINE + 1
            })
        );
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(enc(&Action::new("")), Err(EncodeError::EmptyName));
        assert_eq!(
            enc(&Action::new("Ping").header("", "x")),
            Err(EncodeError::EmptyKey { index: 1 })
        );
        assert_eq!(
            enc(&Action::new("Ping").header("A:B", "x")),
            Err(EncodeError::ColonInKey { index: 1 })
        );
        assert_eq!(
            enc(&Action::new("Ping").header("actionid", "x")),
            Err(EncodeError::ActionId { index: 1 })
        );
    }

    #[test]
    fn empty_values_and_no_action_id() {
        let mut out = BytesMut::new();
        Action::new("Getvar")
            .header("Variable", "")
            .encode(None, &mut out)
            .unwrap();
        assert_eq!(&out[..], b"Action: Getvar\r\nVariable: \r\n\r\n");
    }
}
