//! The `[[server]]` tables: raw form and validation into [`ServerConfig`].

#[allow(unused_imports)]
use super::*;

#[derive(Default, Deserialize)]
pub(super) struct RawServer {
    id: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    username: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    secret_env: Option<String>,
    auth: Option<String>,
    tls: Option<RawTls>,
    events: Option<String>,
    #[serde(default)]
    filters: Vec<RawFilter>,
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    backoff_min: Option<String>,
    backoff_max: Option<String>,
    auth_failure_backoff: Option<String>,
    login_timeout: Option<String>,
    allow_actions: Option<Vec<String>>,
    snapshot: Option<Vec<String>>,
    snapshot_gap_interval: Option<String>,
    snapshot_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct RawTls {
    #[serde(default)]
    enabled: bool,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    #[serde(default)]
    insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawFilter {
    Legacy(String),
    Advanced(RawAdvancedFilter),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdvancedFilter {
    criteria: String,
    pattern: Option<String>,
}

pub(super) struct Checker<'a> {
    path: &'a str,
    problems: &'a mut Vec<Problem>,
    ok: bool,
}

impl Checker<'_> {
    fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.ok = false;
        self.problems.push(Problem {
            path: format!("{}.{key}", self.path),
            message: message.into(),
            line: None,
        });
    }

    fn required(&mut self, key: &str, v: Option<String>) -> String {
        match v {
            Some(v) if !v.is_empty() => {
                self.no_line_breaks(key, &v);
                v
            }
            _ => {
                self.bad(key, "required");
                String::new()
            }
        }
    }

    fn no_line_breaks(&mut self, key: &str, v: &str) {
        if v.contains(['\r', '\n']) {
            self.bad(key, "must not contain CR or LF");
        }
    }

    fn duration(&mut self, key: &str, v: Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(&s) {
                Some(d) if !d.is_zero() => d,
                Some(_) => {
                    self.bad(key, "must be greater than zero");
                    default
                }
                None => {
                    self.bad(
                        key,
                        format!("{s:?} is not a duration (a number followed by ms, s, m or h)"),
                    );
                    default
                }
            },
        }
    }
}

pub(super) fn validate_server(
    path: &str,
    raw: RawServer,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> Option<ServerConfig> {
    let mut c = Checker {
        path,
        problems,
        ok: true,
    };
    let id = c.required("id", raw.id);
    if !id.is_empty()
        && !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        c.bad(
            "id",
            "may hold only ASCII letters, digits, '_' and '-' (it is part of ActionIDs and bus subjects)",
        );
    }
    let host = c.required("host", raw.host);
    let username = c.required("username", raw.username);
    let secret = match (raw.secret, raw.secret_file, raw.secret_env) {
        (Some(s), None, None) => Some(s),
        (None, Some(file), None) => match std::fs::read_to_string(&file) {
            // A trailing newline from `echo secret > file` is not part of the secret.
            Ok(s) => Some(s.trim_end_matches(['\r', '\n']).to_owned()),
            Err(e) => {
                c.bad(
                    "secret_file",
                    format!("cannot read {}: {e}", file.display()),
                );
                None
            }
        },
        (None, None, Some(var)) => match env.var(&var) {
            Some(s) => Some(s),
            None => {
                c.bad(
                    "secret_env",
                    format!("environment variable {var} is not set"),
                );
                None
            }
        },
        (None, None, None) => {
            c.bad(
                "secret",
                "one of secret, secret_file or secret_env is required",
            );
            None
        }
        _ => {
            c.bad(
                "secret",
                "give only one of secret, secret_file or secret_env",
            );
            None
        }
    };
    if let Some(s) = &secret {
        if s.is_empty() {
            c.bad("secret", "is empty");
        }
        // Never echo the secret itself in the message.
        if s.contains(['\r', '\n']) {
            c.bad("secret", "must not contain CR or LF");
        }
    }
    let auth = match raw.auth.as_deref() {
        None | Some("md5") => Auth::Md5,
        Some("plain") => Auth::Plain,
        Some(other) => {
            c.bad("auth", format!("{other:?} is not md5 or plain"));
            Auth::Md5
        }
    };
    let tls = match raw.tls {
        Some(t) if t.enabled => {
            if t.ca_file.is_none() && !t.insecure_skip_verify {
                c.bad(
                    "tls.ca_file",
                    "required when TLS is enabled (or set insecure_skip_verify = true explicitly)",
                );
            }
            if let Some(f) = &t.ca_file
                && let Err(e) = std::fs::metadata(f)
            {
                c.bad("tls.ca_file", format!("cannot read {}: {e}", f.display()));
            }
            Some(TlsConfig {
                ca_file: t.ca_file,
                server_name: t.server_name.unwrap_or_else(|| host.clone()),
                insecure_skip_verify: t.insecure_skip_verify,
            })
        }
        _ => None,
    };
    let port = match raw.port {
        Some(0) => {
            c.bad("port", "must not be 0");
            0
        }
        Some(p) => p,
        None if tls.is_some() => 5039,
        None => 5038,
    };
    let events = raw.events.unwrap_or_else(|| "on".to_owned());
    if events.is_empty() {
        c.bad("events", "is empty (use \"off\" for no events)");
    }
    c.no_line_breaks("events", &events);
    let mut filters = Vec::new();
    for (j, f) in raw.filters.into_iter().enumerate() {
        let key = format!("filters[{j}]");
        match f {
            RawFilter::Legacy(p) => {
                if p.is_empty() || p == "!" {
                    c.bad(&key, "an empty legacy filter matches nothing useful");
                }
                c.no_line_breaks(&key, &p);
                filters.push(Filter::Legacy(p));
            }
            RawFilter::Advanced(a) => {
                c.no_line_breaks(&format!("{key}.criteria"), &a.criteria);
                if let Some(p) = &a.pattern {
                    c.no_line_breaks(&format!("{key}.pattern"), p);
                }
                if let Err(e) = check_criteria(&a.criteria, a.pattern.as_deref()) {
                    c.bad(&format!("{key}.criteria"), e);
                }
                filters.push(Filter::Advanced {
                    criteria: a.criteria,
                    pattern: a.pattern.filter(|p| !p.is_empty()),
                });
            }
        }
    }
    let d = ServerConfig::new("", "", 0, "", Secret::new(""));
    let keepalive_interval = c.duration(
        "keepalive_interval",
        raw.keepalive_interval,
        d.keepalive_interval,
    );
    let keepalive_timeout = c.duration(
        "keepalive_timeout",
        raw.keepalive_timeout,
        d.keepalive_timeout,
    );
    let backoff_min = c.duration("backoff_min", raw.backoff_min, d.backoff_min);
    let backoff_max = c.duration("backoff_max", raw.backoff_max, d.backoff_max);
    if backoff_min > backoff_max {
        c.bad("backoff_min", "is larger than backoff_max");
    }
    let auth_failure_backoff = c.duration(
        "auth_failure_backoff",
        raw.auth_failure_backoff,
        d.auth_failure_backoff,
    );
    let login_timeout = c.duration("login_timeout", raw.login_timeout, d.login_timeout);
    let allow_actions = raw.allow_actions.unwrap_or(d.allow_actions);
    for (j, a) in allow_actions.iter().enumerate() {
        let key = format!("allow_actions[{j}]");
        if a.is_empty() || a.contains([':', ' ', '\r', '\n']) {
            c.bad(&key, format!("{a:?} is not an action name"));
        } else if crate::control::rules::is_never_allowed(a) {
            c.bad(
                &key,
                format!("{a} would change amibus's own AMI session and cannot be allowed"),
            );
        }
    }
    let snapshot = validate_snapshot(
        &mut c,
        raw.snapshot,
        raw.snapshot_gap_interval,
        raw.snapshot_timeout,
        d.snapshot,
    );
    if !c.ok {
        return None;
    }
    Some(ServerConfig {
        id,
        host,
        port,
        username,
        secret: Secret::new(secret.unwrap_or_default()),
        auth,
        tls,
        events,
        filters,
        keepalive_interval,
        keepalive_timeout,
        backoff_min,
        backoff_max,
        auth_failure_backoff,
        login_timeout,
        allow_actions,
        snapshot,
    })
}

/// `snapshot` (list actions, each once, each one [`crate::ami::snapshot::LIST_ACTIONS`] names),
/// `snapshot_gap_interval` and `snapshot_timeout`.
pub(super) fn validate_snapshot(
    c: &mut Checker<'_>,
    lists: Option<Vec<String>>,
    gap_interval: Option<String>,
    timeout: Option<String>,
    d: crate::ami::snapshot::Settings,
) -> crate::ami::snapshot::Settings {
    use crate::ami::snapshot::{LIST_ACTIONS, Settings, list_action};
    let lists = match lists {
        None => d.lists,
        Some(lists) => {
            let mut out: Vec<String> = Vec::with_capacity(lists.len());
            for (j, a) in lists.iter().enumerate() {
                let key = format!("snapshot[{j}]");
                match list_action(a) {
                    None => c.bad(
                        &key,
                        format!(
                            "{a:?} is not a list action a snapshot can ask (one of {})",
                            LIST_ACTIONS.join(", ")
                        ),
                    ),
                    Some(name) if out.iter().any(|o| o == name) => {
                        c.bad(&key, format!("{name} is listed twice"));
                    }
                    Some(name) => out.push(name.to_owned()),
                }
            }
            out
        }
    };
    Settings {
        lists,
        gap_interval: c.duration("snapshot_gap_interval", gap_interval, d.gap_interval),
        timeout: c.duration("snapshot_timeout", timeout, d.timeout),
    }
}

/// Check an Asterisk 22 `MatchCriteria` the way `manager_add_filter()` will: `action()`,
/// `name()`, `header()` and `method()`, comma-separated, each at most once; a non-empty pattern
/// needs a method other than `none`, and `method(none)` (the default) needs no pattern.
pub(super) fn check_criteria(criteria: &str, pattern: Option<&str>) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut method = "none";
    for part in criteria.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((word, rest)) = part.split_once('(') else {
            return Err(format!("{part:?} is not word(value)"));
        };
        let Some(value) = rest.strip_suffix(')') else {
            return Err(format!("{part:?} is missing its ')'"));
        };
        if !seen.insert(word) {
            return Err(format!("{word}() is given twice"));
        }
        match word {
            "action" if value == "include" || value == "exclude" => {}
            "action" => return Err(format!("action({value}) is not include or exclude")),
            "name" | "header" if !value.is_empty() => {}
            "name" | "header" => return Err(format!("{word}() is empty")),
            "method" => match value {
                "regex" | "exact" | "starts_with" | "ends_with" | "contains" | "none" => {
                    method = value
                }
                _ => {
                    return Err(format!(
                        "method({value}) is not regex, exact, starts_with, ends_with, contains or none"
                    ));
                }
            },
            _ => return Err(format!("unknown criterion {word}()")),
        }
    }
    if seen.is_empty() {
        return Err("is empty".to_owned());
    }
    let has_pattern = pattern.is_some_and(|p| !p.is_empty());
    match (method, has_pattern) {
        ("none", true) => Err("a pattern needs an explicit method(...) other than none".to_owned()),
        ("none", false) => Ok(()),
        (_, false) => Err(format!("method({method}) needs a pattern")),
        (_, true) => Ok(()),
    }
}
