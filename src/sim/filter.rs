//! Which broadcast events a session gets: the event class mask (`Events:`) and the `Filter`
//! action, with Asterisk 22's semantics (`shared/ami/WIRE.md` §5 and §7).
//!
//! Owns: parsing `Events:` values into a class mask, parsing `Filter`/`MatchCriteria` into a
//! [`Filter`], and `should_send` (Asterisk's `should_send_event()`).
//!
//! Must never: apply filters to responses or to list items (callers only pass broadcast events),
//! or panic on a client's pattern. Legacy filters are POSIX extended regexes in Asterisk; here they
//! are `regex` byte regexes without Unicode (so `.` is one byte, like POSIX in the C locale). The
//! common subset (literals, `.`, `*`, `+`, `?`, `|`, groups, brackets, anchors) behaves the same.

use regex::bytes::{Regex, RegexBuilder};

/// Event class bits, as in Asterisk's `manager.h` (`EVENT_FLAG_*`).
pub mod class {
    pub const SYSTEM: u32 = 1 << 0;
    pub const CALL: u32 = 1 << 1;
    pub const LOG: u32 = 1 << 2;
    pub const VERBOSE: u32 = 1 << 3;
    pub const COMMAND: u32 = 1 << 4;
    pub const AGENT: u32 = 1 << 5;
    pub const USER: u32 = 1 << 6;
    pub const CONFIG: u32 = 1 << 7;
    pub const DTMF: u32 = 1 << 8;
    pub const REPORTING: u32 = 1 << 9;
    pub const CDR: u32 = 1 << 10;
    pub const DIALPLAN: u32 = 1 << 11;
    pub const ORIGINATE: u32 = 1 << 12;
    pub const AGI: u32 = 1 << 13;
    pub const CC: u32 = 1 << 15;
    pub const AOC: u32 = 1 << 16;
    pub const TEST: u32 = 1 << 17;
    pub const SECURITY: u32 = 1 << 18;
    pub const MESSAGE: u32 = 1 << 19;
    /// Every class (`Events: on`).
    pub const ALL: u32 = u32::MAX;

    pub(crate) const NAMES: &[(&str, u32)] = &[
        ("system", SYSTEM),
        ("call", CALL),
        ("log", LOG),
        ("verbose", VERBOSE),
        ("command", COMMAND),
        ("agent", AGENT),
        ("user", USER),
        ("config", CONFIG),
        ("dtmf", DTMF),
        ("reporting", REPORTING),
        ("cdr", CDR),
        ("dialplan", DIALPLAN),
        ("originate", ORIGINATE),
        ("agi", AGI),
        ("cc", CC),
        ("aoc", AOC),
        ("test", TEST),
        ("security", SECURITY),
        ("message", MESSAGE),
    ];

    /// The class bits of a `Privilege:` value such as `call,all` (unknown names are ignored).
    pub fn from_privilege(value: &[u8]) -> u32 {
        let mut mask = 0;
        for part in value.split(|&b| b == b',') {
            let part = part.trim_ascii();
            for (name, bit) in NAMES {
                if part.eq_ignore_ascii_case(name.as_bytes()) {
                    mask |= bit;
                }
            }
        }
        mask
    }
}

/// Parse an `Events:` value like Asterisk's `set_eventmask()`: `on`/`yes`/`true` is every class,
/// `off`/`no`/`false` none, a number is taken as the mask, otherwise a comma-separated class list.
pub fn parse_event_mask(value: &[u8]) -> u32 {
    let v = value.trim_ascii();
    let is = |s: &str| v.eq_ignore_ascii_case(s.as_bytes());
    if is("on") || is("yes") || is("true") || is("y") || is("t") || is("1") {
        return class::ALL;
    }
    if is("off") || is("no") || is("false") || is("n") || is("f") || is("0") {
        return 0;
    }
    if !v.is_empty() && v.iter().all(u8::is_ascii_digit) {
        return std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
    }
    class::from_privilege(v)
}

/// Why a `Filter` action was refused; the `Display` text is the `Message:` Asterisk sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("Filter did not compile.  Check the syntax of the filter given.")]
    Compile,
    #[error("Filter was formatted incorrectly.  Check the syntax of the filter given.")]
    Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    None,
    Regex,
    Exact,
    StartsWith,
    EndsWith,
    Contains,
}

/// One filter of a session.
#[derive(Debug, Clone)]
pub struct Filter {
    include: bool,
    name: Option<Vec<u8>>,
    header: Option<Vec<u8>>,
    method: Method,
    pattern: Vec<u8>,
    regex: Option<Regex>,
}

fn compile(pattern: &[u8]) -> Result<Regex, FilterError> {
    let s = std::str::from_utf8(pattern).map_err(|_| FilterError::Compile)?;
    RegexBuilder::new(s)
        .unicode(false)
        .size_limit(1 << 20)
        .build()
        .map_err(|_| FilterError::Compile)
}

impl Filter {
    /// Parse a `Filter` action's `Filter:` (legacy form, `criteria` absent) or
    /// `MatchCriteria:` + `Filter:` (advanced form, Asterisk 22).
    ///
    /// # Errors
    /// [`FilterError::Compile`] for a bad regex, [`FilterError::Format`] for malformed criteria
    /// (unknown key, a key given twice, a pattern without a method, `method(none)` with a
    /// pattern, an empty legacy pattern).
    pub fn parse(pattern: Option<&[u8]>, criteria: Option<&[u8]>) -> Result<Filter, FilterError> {
        let mut pattern = pattern.unwrap_or_default();
        let mut include = true;
        if let Some(rest) = pattern.strip_prefix(b"!") {
            include = false;
            pattern = rest;
        }
        let Some(criteria) = criteria.filter(|c| !c.trim_ascii().is_empty()) else {
            if pattern.is_empty() {
                return Err(FilterError::Format);
            }
            return Ok(Filter {
                include,
                name: None,
                header: None,
                method: Method::Regex,
                pattern: pattern.to_vec(),
                regex: Some(compile(pattern)?),
            });
        };
        let mut action = None;
        let mut name = None;
        let mut header = None;
        let mut method = None;
        let mut rest = criteria.trim_ascii();
        while !rest.is_empty() {
            let open = rest
                .iter()
                .position(|&b| b == b'(')
                .ok_or(FilterError::Format)?;
            let close = rest
                .iter()
                .position(|&b| b == b')')
                .ok_or(FilterError::Format)?;
            if close < open {
                return Err(FilterError::Format);
            }
            let key = rest[..open].trim_ascii();
            let arg = &rest[open + 1..close];
            let slot = match key {
                b"action" => &mut action,
                b"name" => &mut name,
                b"header" => &mut header,
                b"method" => &mut method,
                _ => return Err(FilterError::Format),
            };
            if slot.is_some() {
                return Err(FilterError::Format);
            }
            *slot = Some(arg.to_vec());
            rest = rest[close + 1..].trim_ascii_start();
            if let Some(r) = rest.strip_prefix(b",") {
                rest = r.trim_ascii_start();
            }
        }
        if let Some(a) = action {
            include = match a.as_slice() {
                b"include" => true,
                b"exclude" => false,
                _ => return Err(FilterError::Format),
            };
        }
        let method = match method.as_deref() {
            None | Some(b"none") => Method::None,
            Some(b"regex") => Method::Regex,
            Some(b"exact") => Method::Exact,
            Some(b"starts_with") => Method::StartsWith,
            Some(b"ends_with") => Method::EndsWith,
            Some(b"contains") => Method::Contains,
            Some(_) => return Err(FilterError::Format),
        };
        if (method == Method::None) != pattern.is_empty() {
            return Err(FilterError::Format);
        }
        let regex = match method {
            Method::Regex => Some(compile(pattern)?),
            _ => None,
        };
        Ok(Filter {
            include,
            name,
            header,
            method,
            pattern: pattern.to_vec(),
            regex,
        })
    }

    pub fn is_include(&self) -> bool {
        self.include
    }

    fn match_data(&self, data: &[u8]) -> bool {
        let p = self.pattern.as_slice();
        match self.method {
            Method::None => true,
            Method::Regex => self.regex.as_ref().is_some_and(|r| r.is_match(data)),
            Method::Exact => data == p,
            Method::StartsWith => data.starts_with(p),
            Method::EndsWith => data.ends_with(p),
            Method::Contains => memchr::memmem::find(data, p).is_some(),
        }
    }

    /// Whether this filter matches the whole event text `event` (CRLFs included).
    pub fn matches(&self, event: &[u8]) -> bool {
        if let Some(name) = &self.name {
            let first = event.split(|&b| b == b'\n').next().unwrap_or_default();
            let ev = first
                .strip_prefix(b"Event:")
                .map(|v| v.trim_ascii())
                .unwrap_or_default();
            if ev != name.as_slice() {
                return false;
            }
        }
        match &self.header {
            None => self.match_data(event),
            Some(h) => event.split(|&b| b == b'\n').any(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                line.strip_prefix(h.as_slice())
                    .and_then(|r| r.strip_prefix(b":"))
                    .is_some_and(|v| self.match_data(v.trim_ascii_start()))
            }),
        }
    }
}

/// Asterisk's `should_send_event()`: no filters → send; only includes → any must match; only
/// excludes → none may match; both → some include matches and no exclude does.
pub fn should_send(filters: &[Filter], event: &[u8]) -> bool {
    if filters.is_empty() {
        return true;
    }
    let mut has_include = false;
    let mut included = false;
    for f in filters {
        if f.include {
            has_include = true;
            if !included && f.matches(event) {
                included = true;
            }
        } else if f.matches(event) {
            return false;
        }
    }
    !has_include || included
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEWCHANNEL: &[u8] =
        b"Event: Newchannel\r\nPrivilege: call,all\r\nChannel: PJSIP/1001-00000001\r\nUniqueid: 1.1\r\n\r\n";
    const VARSET: &[u8] = b"Event: VarSet\r\nPrivilege: dialplan,all\r\nChannel: Local/x@y-00000002;1\r\nVariable: A\r\nValue: 1\r\n\r\n";

    fn f(p: &str, c: Option<&str>) -> Filter {
        Filter::parse(Some(p.as_bytes()), c.map(str::as_bytes)).unwrap()
    }

    #[test]
    fn no_filters_sends_everything() {
        assert!(should_send(&[], VARSET));
    }

    #[test]
    fn legacy_include_matches_whole_text() {
        let fs = [f("Event: Newchannel", None)];
        assert!(should_send(&fs, NEWCHANNEL));
        assert!(!should_send(&fs, VARSET));
        // The Privilege line and CRLFs are part of the text.
        let fs = [f("dialplan,all\r\nChannel", None)];
        assert!(should_send(&fs, VARSET));
    }

    #[test]
    fn legacy_exclude_with_bang() {
        let fs = [f("!Event: VarSet", None)];
        assert!(should_send(&fs, NEWCHANNEL));
        assert!(!should_send(&fs, VARSET));
    }

    #[test]
    fn include_and_exclude_both_must_hold() {
        let fs = [f("Channel: ", None), f("!Local/", None)];
        assert!(should_send(&fs, NEWCHANNEL));
        assert!(!should_send(&fs, VARSET));
    }

    #[test]
    fn advanced_name_only() {
        let fs = [Filter::parse(None, Some(b"action(include),name(VarSet)")).unwrap()];
        assert!(should_send(&fs, VARSET));
        assert!(!should_send(&fs, NEWCHANNEL));
        // name() is exact and case-sensitive.
        let fs = [Filter::parse(None, Some(b"name(varset)")).unwrap()];
        assert!(!should_send(&fs, VARSET));
    }

    #[test]
    fn advanced_header_methods() {
        let fs = [f("PJSIP/", Some("header(Channel),method(starts_with)"))];
        assert!(should_send(&fs, NEWCHANNEL));
        assert!(!should_send(&fs, VARSET));
        let fs = [f(
            ";1",
            Some("action(exclude),header(Channel),method(ends_with)"),
        )];
        assert!(should_send(&fs, NEWCHANNEL));
        assert!(!should_send(&fs, VARSET));
        let fs = [f("1", Some("header(Value),method(exact)"))];
        assert!(should_send(&fs, VARSET));
        let fs = [f("x@y", Some("method(contains)"))];
        assert!(should_send(&fs, VARSET));
        let fs = [f("^Local/.*;1$", Some("header(Channel),method(regex)"))];
        assert!(should_send(&fs, VARSET));
        assert!(!should_send(&fs, NEWCHANNEL));
    }

    #[test]
    fn action_overrides_bang() {
        let fs = [f("!VarSet", Some("action(include),method(contains)"))];
        assert!(fs[0].is_include());
    }

    #[test]
    fn malformed_criteria_are_rejected() {
        assert_eq!(
            Filter::parse(Some(b"x"), Some(b"name(A)")).unwrap_err(),
            FilterError::Format
        );
        assert_eq!(
            Filter::parse(None, Some(b"name(A),name(B)")).unwrap_err(),
            FilterError::Format
        );
        assert_eq!(
            Filter::parse(None, Some(b"colour(red)")).unwrap_err(),
            FilterError::Format
        );
        assert_eq!(
            Filter::parse(Some(b"("), None).unwrap_err(),
            FilterError::Compile
        );
        assert_eq!(
            Filter::parse(Some(b""), None).unwrap_err(),
            FilterError::Format
        );
    }

    #[test]
    fn event_masks() {
        assert_eq!(parse_event_mask(b"on"), class::ALL);
        assert_eq!(parse_event_mask(b"off"), 0);
        assert_eq!(
            parse_event_mask(b"call,dialplan"),
            class::CALL | class::DIALPLAN
        );
        assert_eq!(parse_event_mask(b"1026"), class::CALL | class::CDR);
        assert_eq!(class::from_privilege(b"call,all"), class::CALL);
    }
}
