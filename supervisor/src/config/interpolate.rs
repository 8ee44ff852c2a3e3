//! `${NAME}` interpolation, as in docker compose (SPEC §2).
//!
//! Supported forms: `$NAME`, `${NAME}`, `${NAME:-default}` / `${NAME-default}` (default
//! when unset or empty / only when unset), `${NAME:?message}` / `${NAME?message}` (error
//! when unset or empty / only when unset), `${NAME:+alt}` / `${NAME+alt}` (alt when set and
//! non-empty / when set), and `$$` for a literal `$`. Defaults, alternatives and messages
//! are interpolated themselves. Unlike compose, a name that is unset and has no default is
//! an error rather than an empty string, and so is a `$` that starts none of the forms
//! above (compose rejects those too), so that a typo never silently becomes "".

use std::collections::BTreeSet;

/// Why a string could not be interpolated. `offset` is the byte offset of the `$` at fault
/// in the input, so that callers can point at it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    /// `${NAME}` or `$NAME` with NAME unknown and no default.
    #[error("unknown variable `{name}`")]
    Unset { name: String, offset: usize },
    /// `${NAME:?message}` with NAME unset (or empty).
    #[error("`{name}` is not set: {message}")]
    Required {
        name: String,
        message: String,
        offset: usize,
    },
    /// `${` without its `}`.
    #[error("unclosed `${{`")]
    Unclosed { offset: usize },
    /// `${…}` whose content is not a name followed by an operator.
    #[error("invalid interpolation `{text}`")]
    Invalid { text: String, offset: usize },
    /// A `$` followed by something that is neither `$`, `{` nor a name.
    #[error("`$` must start `${{NAME}}` or `$NAME` (write `$$` for a literal `$`)")]
    StrayDollar { offset: usize },
}

// === impl InterpolateError ===

impl InterpolateError {
    /// Byte offset in the input of the `$` at fault.
    pub fn offset(&self) -> usize {
        match self {
            InterpolateError::Unset { offset, .. }
            | InterpolateError::Required { offset, .. }
            | InterpolateError::Unclosed { offset }
            | InterpolateError::Invalid { offset, .. }
            | InterpolateError::StrayDollar { offset } => *offset,
        }
    }
}

/// Expands `input`, looking names up with `lookup`.
///
/// ```
/// use mesh_supervisor::config::interpolate::expand;
/// let lookup = |name: &str| (name == "PORT").then(|| "8080".to_owned());
/// assert_eq!(expand("--port ${PORT} $$HOME ${X:-x}", &lookup).unwrap(), "--port 8080 $HOME x");
/// ```
pub fn expand(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolateError> {
    let segments = parse(input)?;
    let mut out = String::with_capacity(input.len());
    expand_segments(&segments, lookup, &mut out)?;
    Ok(out)
}

/// Every name `input` refers to, defaults and messages included, or the syntax error.
///
/// ```
/// use mesh_supervisor::config::interpolate::names;
/// let found = names("$A ${B:-${C}} $$D").unwrap();
/// assert_eq!(found.into_iter().collect::<Vec<_>>(), ["A", "B", "C"]);
/// ```
pub fn names(input: &str) -> Result<BTreeSet<String>, InterpolateError> {
    fn walk(segments: &[Segment], out: &mut BTreeSet<String>) {
        for segment in segments {
            if let Segment::Var { name, op, .. } = segment {
                out.insert(name.clone());
                if let Some((_, word)) = op {
                    walk(word, out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&parse(input)?, &mut out);
    Ok(out)
}

/// Parsed form of an interpolated string.
#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `offset`: of the `$` in the outermost input.
    Var {
        name: String,
        offset: usize,
        op: Option<(Op, Vec<Segment>)>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `-` (`colon`: also when empty).
    Default { colon: bool },
    /// `?`.
    Required { colon: bool },
    /// `+`.
    Alternative { colon: bool },
}

// === parsing ===

fn parse(input: &str) -> Result<Vec<Segment>, InterpolateError> {
    parse_at(input, 0)
}

/// Parses `input`, which starts at `base` in the outermost string (for error offsets).
fn parse_at(input: &str, base: usize) -> Result<Vec<Segment>, InterpolateError> {
    let bytes = input.as_bytes();
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let Some(rel) = input[i..].find('$') else {
            literal.push_str(&input[i..]);
            break;
        };
        literal.push_str(&input[i..i + rel]);
        let at = i + rel;
        match bytes.get(at + 1) {
            Some(b'$') => {
                literal.push('$');
                i = at + 2;
            }
            Some(b'{') => {
                let end = closing_brace(input, at + 2)
                    .ok_or(InterpolateError::Unclosed { offset: base + at })?;
                flush(&mut literal, &mut segments);
                segments.push(parse_braced(&input[at..=end], base + at)?);
                i = end + 1;
            }
            Some(&c) if is_name_start(c) => {
                let len = name_len(&input[at + 1..]);
                flush(&mut literal, &mut segments);
                let name = input[at + 1..at + 1 + len].to_owned();
                segments.push(Segment::Var {
                    name,
                    offset: base + at,
                    op: None,
                });
                i = at + 1 + len;
            }
            _ => return Err(InterpolateError::StrayDollar { offset: base + at }),
        }
    }
    flush(&mut literal, &mut segments);
    Ok(segments)
}

/// `whole` is `${…}`, at `offset` in the outermost input: a name, optionally followed by
/// an operator and its word.
fn parse_braced(whole: &str, offset: usize) -> Result<Segment, InterpolateError> {
    let inner = &whole[2..whole.len() - 1];
    let base = offset + 2;
    let invalid = || InterpolateError::Invalid {
        text: whole.to_owned(),
        offset,
    };
    let len = name_len(inner);
    if len == 0 || !is_name_start(inner.as_bytes()[0]) {
        return Err(invalid());
    }
    let name = inner[..len].to_owned();
    let rest = &inner[len..];
    if rest.is_empty() {
        return Ok(Segment::Var {
            name,
            offset,
            op: None,
        });
    }
    let (colon, rest_after_colon) = match rest.strip_prefix(':') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let op = match rest_after_colon.as_bytes().first() {
        Some(b'-') => Op::Default { colon },
        Some(b'?') => Op::Required { colon },
        Some(b'+') => Op::Alternative { colon },
        _ => return Err(invalid()),
    };
    let word_start = len + usize::from(colon) + 1;
    let word = parse_at(&inner[word_start..], base + word_start)?;
    Ok(Segment::Var {
        name,
        offset,
        op: Some((op, word)),
    })
}

/// Index of the `}` closing a `${` whose content starts at `from`, skipping nested `${…}`
/// and `$$`.
fn closing_brace(input: &str, from: usize) -> Option<usize> {
    let bytes = input.as_bytes();
    let mut depth = 1usize;
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if matches!(bytes.get(i + 1), Some(b'$')) => i += 1,
            b'$' if matches!(bytes.get(i + 1), Some(b'{')) => {
                depth += 1;
                i += 1;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn flush(literal: &mut String, segments: &mut Vec<Segment>) {
    if !literal.is_empty() {
        segments.push(Segment::Literal(std::mem::take(literal)));
    }
}

fn is_name_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn name_len(s: &str) -> usize {
    s.bytes()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
        .count()
}

// === expansion ===

fn expand_segments(
    segments: &[Segment],
    lookup: &dyn Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), InterpolateError> {
    for segment in segments {
        match segment {
            Segment::Literal(text) => out.push_str(text),
            Segment::Var {
                name,
                offset,
                op: None,
            } => match lookup(name) {
                Some(value) => out.push_str(&value),
                None => {
                    return Err(InterpolateError::Unset {
                        name: name.clone(),
                        offset: *offset,
                    });
                }
            },
            Segment::Var {
                name,
                offset,
                op: Some((op, word)),
            } => {
                let value = lookup(name);
                // "Set" in the sense of the operator: with a colon, empty counts as unset.
                let colon = match op {
                    Op::Default { colon } | Op::Required { colon } | Op::Alternative { colon } => {
                        *colon
                    }
                };
                let set = value.as_deref().is_some_and(|v| !(colon && v.is_empty()));
                match (op, value) {
                    (Op::Default { .. }, Some(value)) if set => out.push_str(&value),
                    (Op::Default { .. }, _) => expand_segments(word, lookup, out)?,
                    (Op::Required { .. }, Some(value)) if set => out.push_str(&value),
                    (Op::Required { .. }, _) => {
                        let mut message = String::new();
                        expand_segments(word, lookup, &mut message)?;
                        if message.is_empty() {
                            message = "required".to_owned();
                        }
                        let offset = *offset;
                        return Err(InterpolateError::Required {
                            name: name.clone(),
                            message,
                            offset,
                        });
                    }
                    (Op::Alternative { .. }, _) if set => expand_segments(word, lookup, out)?,
                    (Op::Alternative { .. }, _) => {}
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("8080".to_owned()),
            "EMPTY" => Some(String::new()),
            "HOST" => Some("db".to_owned()),
            _ => None,
        }
    }

    fn ex(input: &str) -> Result<String, InterpolateError> {
        expand(input, &env)
    }

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(
            ex("redis-server --save ''").unwrap(),
            "redis-server --save ''"
        );
        assert_eq!(ex("").unwrap(), "");
    }

    #[test]
    fn braced_and_bare_names() {
        assert_eq!(ex("--port ${PORT}").unwrap(), "--port 8080");
        assert_eq!(ex("$HOST:$PORT/x").unwrap(), "db:8080/x");
        assert_eq!(ex("${HOST}${PORT}").unwrap(), "db8080");
        assert_eq!(ex("$PORT-$HOST").unwrap(), "8080-db");
    }

    #[test]
    fn double_dollar_is_literal() {
        assert_eq!(ex("$$PORT $${PORT} $$").unwrap(), "$PORT ${PORT} $");
    }

    #[test]
    fn defaults() {
        assert_eq!(ex("${NOPE:-x}").unwrap(), "x");
        assert_eq!(ex("${NOPE-x}").unwrap(), "x");
        assert_eq!(ex("${EMPTY:-x}").unwrap(), "x");
        assert_eq!(ex("${EMPTY-x}").unwrap(), "");
        assert_eq!(ex("${PORT:-x}").unwrap(), "8080");
        assert_eq!(ex("${NOPE:-}").unwrap(), "");
        assert_eq!(ex("${NOPE:-${HOST}:${PORT}}").unwrap(), "db:8080");
        assert_eq!(ex("${NOPE:-a b}").unwrap(), "a b");
    }

    #[test]
    fn required() {
        assert_eq!(ex("${PORT:?must be set}").unwrap(), "8080");
        assert_eq!(
            ex("${NOPE:?set NOPE to the db url}"),
            Err(InterpolateError::Required {
                name: "NOPE".to_owned(),
                message: "set NOPE to the db url".to_owned(),
                offset: 0
            })
        );
        assert!(ex("${EMPTY:?x}").is_err());
        assert_eq!(ex("${EMPTY?x}").unwrap(), "");
        assert_eq!(
            ex("${NOPE:?}").unwrap_err().to_string(),
            "`NOPE` is not set: required"
        );
    }

    #[test]
    fn alternatives() {
        assert_eq!(ex("${PORT:+set}").unwrap(), "set");
        assert_eq!(ex("${NOPE:+set}").unwrap(), "");
        assert_eq!(ex("${EMPTY:+set}").unwrap(), "");
        assert_eq!(ex("${EMPTY+set}").unwrap(), "set");
    }

    #[test]
    fn unknown_name_is_an_error() {
        assert_eq!(
            ex("${NOPE}"),
            Err(InterpolateError::Unset {
                name: "NOPE".to_owned(),
                offset: 0
            })
        );
        assert_eq!(
            ex("x $NOPE"),
            Err(InterpolateError::Unset {
                name: "NOPE".to_owned(),
                offset: 2
            })
        );
        assert_eq!(ex("${X:-${NOPE}}").unwrap_err().offset(), 5);
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            ex("a ${PORT"),
            Err(InterpolateError::Unclosed { offset: 2 })
        );
        assert_eq!(
            ex("${}"),
            Err(InterpolateError::Invalid {
                text: "${}".to_owned(),
                offset: 0
            })
        );
        assert_eq!(
            ex("a${1X}"),
            Err(InterpolateError::Invalid {
                text: "${1X}".to_owned(),
                offset: 1
            })
        );
        assert_eq!(
            ex("${PORT%x}"),
            Err(InterpolateError::Invalid {
                text: "${PORT%x}".to_owned(),
                offset: 0
            })
        );
        assert_eq!(
            ex("cost: 5$"),
            Err(InterpolateError::StrayDollar { offset: 7 })
        );
        assert_eq!(
            ex("awk '{print $1}'"),
            Err(InterpolateError::StrayDollar { offset: 12 })
        );
        assert_eq!(
            ex("${X:-$}"),
            Err(InterpolateError::StrayDollar { offset: 5 })
        );
    }

    #[test]
    fn names_lists_every_reference() {
        let found = names("$A ${B:-${C}} ${D:?$E} $$F ${G:+x}").unwrap();
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["A", "B", "C", "D", "E", "G"]
        );
        assert!(names("${").is_err());
    }

    #[test]
    fn non_ascii_text_is_kept() {
        assert_eq!(ex("héllo ${HOST} ✓").unwrap(), "héllo db ✓");
    }
}
