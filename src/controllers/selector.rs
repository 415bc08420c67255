//! Kubernetes label selectors in their string form (`kubectl -l`): parsed once
//! at start-up, so a typo is a configuration error naming the flag instead of
//! a watch that fails forever, and matched here against namespace labels.
//!
//! Grammar (Kubernetes `labels.Parse`): comma-separated requirements, each
//! `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)` or
//! `key notin (a,b)`. An empty string selects everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kube::core::{Expression, Selector, SelectorExt as _};

/// A parsed label selector; `Display` gives back a canonical string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    text: String,
    selector: Selector,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("empty requirement (two commas, or a trailing comma)")]
    EmptyRequirement,
    #[error("{0:?}: unbalanced parentheses")]
    Parentheses(String),
    #[error("{0:?}: {1}")]
    BadKey(String, &'static str),
    #[error("{0:?}: {1}")]
    BadValue(String, &'static str),
    #[error("{0:?}: expected key, !key, key=value, key!=value, key in (...) or key notin (...)")]
    Syntax(String),
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut selector = Selector::default();
        for requirement in split_requirements(text)? {
            selector.extend(std::iter::once(parse_requirement(&requirement)?));
        }
        Ok(LabelSelector {
            text: text.trim().to_string(),
            selector,
        })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Splits at commas outside parentheses.
fn split_requirements(text: &str) -> Result<Vec<String>, SelectorError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| SelectorError::Parentheses(text.to_string()))?;
            }
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if depth != 0 {
        return Err(SelectorError::Parentheses(text.to_string()));
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| {
            let p = p.trim().to_string();
            if p.is_empty() {
                Err(SelectorError::EmptyRequirement)
            } else {
                Ok(p)
            }
        })
        .collect()
}

fn parse_requirement(req: &str) -> Result<Expression, SelectorError> {
    if let Some(key) = req.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key_of(key.trim())?));
    }
    if let Some((key, value)) = req.split_once("!=") {
        return Ok(Expression::NotEqual(
            key_of(key.trim())?,
            value_of(value.trim())?,
        ));
    }
    if let Some((key, value)) = req.split_once("==").or_else(|| req.split_once('=')) {
        return Ok(Expression::Equal(
            key_of(key.trim())?,
            value_of(value.trim())?,
        ));
    }
    if let Some(open) = req.find('(') {
        let head = req[..open].trim();
        let list = req[open..].trim();
        let inner = list
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or_else(|| SelectorError::Syntax(req.to_string()))?;
        let values = inner
            .split(',')
            .map(|v| value_of(v.trim()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| SelectorError::Syntax(req.to_string()))?;
        let key = key_of(key.trim())?;
        return match op {
            "in" => Ok(Expression::In(key, values)),
            "notin" => Ok(Expression::NotIn(key, values)),
            _ => Err(SelectorError::Syntax(req.to_string())),
        };
    }
    if req.contains(char::is_whitespace) {
        return Err(SelectorError::Syntax(req.to_string()));
    }
    Ok(Expression::Exists(key_of(req)?))
}

/// A label key: optional DNS-subdomain prefix and `/`, then a name of at most
/// 63 characters of `[A-Za-z0-9._-]` that starts and ends alphanumeric.
fn key_of(key: &str) -> Result<String, SelectorError> {
    let bad = |why| SelectorError::BadKey(key.to_string(), why);
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(bad("the prefix must be a DNS subdomain"));
        }
    }
    if name.is_empty() {
        return Err(bad("the key name is empty"));
    }
    if !is_label_name(name) {
        return Err(bad(
            "a key name has at most 63 characters [A-Za-z0-9._-], alphanumeric at both ends",
        ));
    }
    Ok(key.to_string())
}

fn value_of(value: &str) -> Result<String, SelectorError> {
    if value.is_empty() || is_label_name(value) {
        Ok(value.to_string())
    } else {
        Err(SelectorError::BadValue(
            value.to_string(),
            "a value has at most 63 characters [A-Za-z0-9._-], alphanumeric at both ends",
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_empty_selector_selects_every_namespace() {
        let s = LabelSelector::parse("  ").unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn each_operator_selects_like_kubectl() {
        let injected = labels(&[("istio-injection", "enabled"), ("team", "a")]);
        let ambient = labels(&[("istio.io/dataplane-mode", "ambient")]);
        let plain = labels(&[("team", "b")]);
        let table: &[(&str, [bool; 3])] = &[
            ("istio-injection=enabled", [true, false, false]),
            ("istio-injection==enabled", [true, false, false]),
            ("istio-injection!=enabled", [false, true, true]),
            ("istio-injection", [true, false, false]),
            ("!istio-injection", [false, true, true]),
            ("team in (a, b)", [true, false, true]),
            ("team notin (a)", [false, true, true]),
            ("istio.io/dataplane-mode in (ambient)", [false, true, false]),
            ("team,!istio-injection", [false, false, true]),
        ];
        for (text, want) in table {
            let s = LabelSelector::parse(text).unwrap();
            let got = [s.matches(&injected), s.matches(&ambient), s.matches(&plain)];
            assert_eq!(&got, want, "{text}");
        }
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_reason() {
        let table: &[(&str, SelectorError)] = &[
            ("a,,b", SelectorError::EmptyRequirement),
            ("a,", SelectorError::EmptyRequirement),
            (
                "team in (a",
                SelectorError::Parentheses("team in (a".into()),
            ),
            (
                "team in a)",
                SelectorError::Parentheses("team in a)".into()),
            ),
            (
                "team within (a)",
                SelectorError::Syntax("team within (a)".into()),
            ),
            ("team a", SelectorError::Syntax("team a".into())),
            (
                "-bad=x",
                SelectorError::BadKey(
                    "-bad".into(),
                    "a key name has at most 63 characters [A-Za-z0-9._-], alphanumeric at both ends",
                ),
            ),
            (
                "Bad.Prefix/x=y",
                SelectorError::BadKey("Bad.Prefix/x".into(), "the prefix must be a DNS subdomain"),
            ),
            (
                "a=b c",
                SelectorError::BadValue(
                    "b c".into(),
                    "a value has at most 63 characters [A-Za-z0-9._-], alphanumeric at both ends",
                ),
            ),
        ];
        for (text, want) in table {
            assert_eq!(&LabelSelector::parse(text).unwrap_err(), want, "{text}");
        }
    }
}
