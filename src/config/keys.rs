//! From the TOML tree to the raw serde structs, reporting every unknown key and every value of
//! the wrong type (not only the first), each with its full key path (`server[0].usernme`) and,
//! when it is in the file, its line.
//!
//! How: the tree is deserialized with unknown keys ignored but recorded (`serde_ignored`) and
//! the path of a failure tracked (`serde_path_to_error`). A value of the wrong type is reported
//! and taken out of the tree, and the tree is deserialized again, until it goes through; every
//! raw field is optional, so a removed value becomes "not set" and the rest is still checked.
//! An array element of a wrong type takes its array with it (removing the element alone would
//! shift the paths of the elements after it); a key inside an element goes alone.
//!
//! Must never: report one key twice, or stop at the first problem.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

use super::Problem;

/// One step of a key path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// `server[0].tls.ca_file`.
pub(super) fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The path of a value `serde_ignored` skipped.
fn ignored_path(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    use serde_ignored::Path as P;
    let (parent, seg) = match path {
        P::Root => return Vec::new(),
        P::Seq { parent, index } => (*parent, Some(Seg::Index(*index))),
        P::Map { parent, key } => (*parent, Some(Seg::Key(key.clone()))),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            (*parent, None)
        }
    };
    let mut out = ignored_path(parent);
    out.extend(seg);
    out
}

/// The path of a failure `serde_path_to_error` tracked.
fn error_path(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment as S;
    path.iter()
        .filter_map(|seg| match seg {
            S::Seq { index } => Some(Seg::Index(*index)),
            S::Map { key } => Some(Seg::Key(key.clone())),
            S::Enum { .. } | S::Unknown => None,
        })
        .collect()
}

/// Deserialize `root` into `T`, adding a [`Problem`] for every unknown key and every value of
/// the wrong type. `None` if the tree could not be made to deserialize at all.
pub(super) fn deserialize<T: DeserializeOwned>(
    mut root: toml::Table,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    let mut reported = BTreeSet::new();
    // Each failed pass removes at least one value, so this ends.
    loop {
        let mut unknown = Vec::new();
        let mut record = |p: serde_ignored::Path| unknown.push(ignored_path(&p));
        let tracked = serde_ignored::Deserializer::new(root.clone(), &mut record);
        let result = serde_path_to_error::deserialize::<_, T>(tracked);
        match result {
            Ok(value) => {
                for path in unknown {
                    if reported.insert(path.clone()) {
                        problems.push(Problem {
                            path: render(&path),
                            message: "unknown key (misspelt, or in the wrong section?)".into(),
                            line: None,
                        });
                    }
                }
                return Some(value);
            }
            Err(e) => {
                let path = error_path(e.path());
                let message = e.into_inner().message().trim().to_owned();
                // An array element of a wrong type is removed with its array; a key inside an
                // element (`server[0].port`) alone.
                let keep = path
                    .iter()
                    .rposition(|s| matches!(s, Seg::Key(_)))
                    .map_or(0, |i| i + 1);
                let cut = &path[..keep];
                if reported.insert(path.clone()) {
                    problems.push(Problem {
                        path: render(&path),
                        message,
                        line: None,
                    });
                }
                if cut.is_empty() || !remove(&mut root, cut) {
                    return None;
                }
            }
        }
    }
}

/// Take the value at `path` out of `root`; false if there is none.
fn remove(root: &mut toml::Table, path: &[Seg]) -> bool {
    let Some((Seg::Key(last), parents)) = path.split_last() else {
        return false;
    };
    let mut table = root;
    let mut parents = parents.iter();
    while let Some(seg) = parents.next() {
        let Seg::Key(k) = seg else { return false };
        let mut node = match table.get_mut(k) {
            Some(v) => v,
            None => return false,
        };
        // Index steps after a key: walk into array elements.
        let mut rest = parents.clone();
        while let Some(Seg::Index(i)) = rest.next() {
            node = match node {
                toml::Value::Array(a) => match a.get_mut(*i) {
                    Some(v) => v,
                    None => return false,
                },
                _ => return false,
            };
            parents.next();
            rest = parents.clone();
        }
        table = match node {
            toml::Value::Table(t) => t,
            _ => return false,
        };
    }
    table.remove(last).is_some()
}

/// Where keys are in the file, for line numbers in problems.
pub(super) struct Lines<'a> {
    text: &'a str,
    doc: Option<toml::Spanned<DeTable<'a>>>,
}

impl<'a> Lines<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Lines {
            text,
            doc: DeTable::parse(text).ok(),
        }
    }

    /// The 1-based line of the key at `path` (`server[1].tls.ca_file`), if the file has it.
    pub(super) fn line(&self, path: &str) -> Option<usize> {
        let segs = parse_path(path)?;
        let (first, rest) = segs.split_first()?;
        let Seg::Key(first) = first else { return None };
        let mut entry = self
            .doc
            .as_ref()?
            .get_ref()
            .iter()
            .find(|(k, _)| k.get_ref() == first)?;
        let mut span = entry.0.span();
        let mut value: &DeValue<'_> = entry.1.get_ref();
        for seg in rest {
            match (seg, value) {
                (Seg::Key(k), DeValue::Table(t)) => {
                    entry = t.iter().find(|(key, _)| key.get_ref() == k)?;
                    span = entry.0.span();
                    value = entry.1.get_ref();
                }
                (Seg::Index(i), DeValue::Array(a)) => {
                    let item = a.get(*i)?;
                    span = item.span();
                    value = item.get_ref();
                }
                _ => return None,
            }
        }
        let before = self.text.get(..span.start)?;
        Some(before.matches('\n').count() + 1)
    }
}

/// `server[1].tls."ca_file"` → keys and indexes; `None` for what is not a key path (an
/// environment variable's name).
fn parse_path(path: &str) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        let key = key.trim_matches('"');
        if key.is_empty() || key.chars().any(|c| c.is_ascii_uppercase()) {
            return None;
        }
        out.push(Seg::Key(key.to_owned()));
        while let Some(rest) = indexes.strip_prefix('[') {
            let end = rest.find(']')?;
            out.push(Seg::Index(rest[..end].parse().ok()?));
            indexes = &rest[end + 1..];
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_and_parse_back() {
        let p = vec![
            Seg::Key("server".into()),
            Seg::Index(1),
            Seg::Key("tls".into()),
            Seg::Key("ca_file".into()),
        ];
        assert_eq!(render(&p), "server[1].tls.ca_file");
        assert_eq!(parse_path("server[1].tls.ca_file"), Some(p));
        assert_eq!(parse_path("AMIBUS__SPOOL__DIR"), None);
    }

    #[test]
    fn lines_point_at_the_key() {
        let text = "[spool]\ndir = \"x\"\n\n[[server]]\nid = \"a\"\n\n[[server]]\nid = \"b\"\ntls = { ca_file = \"c\" }\nfilters = [\"a\", \"b\"]\n";
        let lines = Lines::new(text);
        assert_eq!(lines.line("spool.dir"), Some(2));
        assert_eq!(lines.line("server[0].id"), Some(5));
        assert_eq!(lines.line("server[1].id"), Some(8));
        assert_eq!(lines.line("server[1].tls.ca_file"), Some(9));
        assert_eq!(lines.line("server[1].filters[1]"), Some(10));
        assert_eq!(lines.line("server[2].id"), None);
        assert_eq!(lines.line("metrics.listen"), None);
    }
}
