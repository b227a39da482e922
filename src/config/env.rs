//! Where secrets and overrides come from: [`Env`] (the process environment, or a fake in
//! tests) and the `AMIBUS__SECTION__KEY` overrides applied to the TOML tree before it is read.

#[allow(unused_imports)]
use super::*;

/// Where a secret comes from; the environment is read through this so tests need not set
/// process-wide variables.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;

    /// `AMIBUS__SECTION__KEY=value` variables that override keys of the file (see
    /// [`apply_overrides`]); none by default.
    fn overrides(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn overrides(&self) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| k.starts_with(OVERRIDE_PREFIX))
            .collect()
    }
}

/// Environment variables with this prefix override configuration keys.
pub const OVERRIDE_PREFIX: &str = "AMIBUS__";

/// Apply `AMIBUS__SECTION__KEY=value` overrides to the parsed file: `AMIBUS__SPOOL__DIR=/data`
/// sets `spool.dir`, `AMIBUS__SERVER__0__HOST=pbx1` the host of the first `[[server]]`,
/// `AMIBUS__SINK__KAFKA__BROKERS=k:9092` `sink.kafka.brokers`. Segments are matched in lower
/// case. The value is read as a TOML value when it is one (`5038`, `true`, `["a", "b"]`) and
/// as a string otherwise (`1GiB`, `/data`). Tables on the way are created; an override that
/// would index into a value that is not a table or array is a problem named after the variable.
pub fn apply_overrides(
    root: &mut toml::Table,
    overrides: &[(String, String)],
    problems: &mut Vec<Problem>,
) {
    let mut sorted: Vec<&(String, String)> = overrides.iter().collect();
    sorted.sort();
    for (name, raw) in sorted {
        let Some(path) = name.strip_prefix(OVERRIDE_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            problems.push(Problem {
                path: name.clone(),
                message: "an override names keys as AMIBUS__SECTION__KEY".into(),
                line: None,
            });
            continue;
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if let Err(message) = set_path(root, &segments, value) {
            problems.push(Problem {
                path: name.clone(),
                message,
                line: None,
            });
        }
    }
}

pub(super) fn set_path(
    table: &mut toml::Table,
    path: &[String],
    value: toml::Value,
) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    let mut node = table
        .entry(parents.first().cloned().unwrap_or_else(|| last.clone()))
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if parents.is_empty() {
        *node = value;
        return Ok(());
    }
    for seg in parents[1..].iter().chain(std::iter::once(last)) {
        let is_last = std::ptr::eq(seg, last);
        node = match node {
            toml::Value::Table(t) => {
                if is_last {
                    t.insert(seg.clone(), value);
                    return Ok(());
                }
                t.entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let i: usize = seg
                    .parse()
                    .map_err(|_| format!("{seg:?} is not an index into the array"))?;
                let len = a.len();
                let slot = a
                    .get_mut(i)
                    .ok_or_else(|| format!("index {i} is past the {len} entries"))?;
                if is_last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => {
                return Err(format!(
                    "cannot set {seg:?} inside a value that is not a table"
                ));
            }
        };
    }
    Ok(())
}
