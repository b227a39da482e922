//! Durations, sizes and secrets from the environment: the small parsers every section uses.

#[allow(unused_imports)]
use super::*;

/// `250ms`, `20s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// `4096`, `64KiB`, `64MiB`, `1GiB` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

pub(super) fn size(
    path: &str,
    v: Option<RawSize>,
    default: u64,
    problems: &mut Vec<Problem>,
) -> u64 {
    match v {
        None => default,
        Some(RawSize::Bytes(n)) if n > 0 => n,
        Some(RawSize::Text(t)) => match parse_size(&t) {
            Some(n) if n > 0 => n,
            _ => {
                problems.push(Problem {
                    path: path.into(),
                    message: format!("{t:?} is not a size (e.g. 4096, 64MiB, 1GiB)"),
                    line: None,
                });
                default
            }
        },
        Some(RawSize::Bytes(_)) => {
            problems.push(Problem {
                path: path.into(),
                message: "must be greater than zero".into(),
                line: None,
            });
            default
        }
    }
}

/// Set `target` from an optional count that must not be zero.
pub(super) fn set_positive<T: Copy + PartialEq + Default>(
    path: &str,
    v: Option<T>,
    target: &mut T,
    problems: &mut Vec<Problem>,
) {
    match v {
        Some(n) if n == T::default() => problem(problems, path, "must be greater than zero"),
        Some(n) => *target = n,
        None => {}
    }
}

pub(super) fn problem(problems: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    problems.push(Problem {
        path: path.into(),
        message: message.into(),
        line: None,
    });
}

pub(super) fn env_secret(
    path: &str,
    var: Option<String>,
    env: &dyn Env,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    let var = var?;
    match env.var(&var) {
        Some(v) => Some(Secret::new(v)),
        None => {
            problem(
                problems,
                path,
                format!("environment variable {var} is not set"),
            );
            None
        }
    }
}

pub(super) fn opt_duration(
    path: &str,
    v: Option<String>,
    default: Duration,
    problems: &mut Vec<Problem>,
) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(&s) {
            Some(d) if !d.is_zero() => d,
            _ => {
                problem(
                    problems,
                    path,
                    format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)"),
                );
                default
            }
        },
    }
}
