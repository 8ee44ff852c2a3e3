//! A dotenv (`env_file`) parser.
//!
//! Hand-written rather than `dotenvy` because dotenvy substitutes `$VAR` itself, from the
//! process environment, which would clash with our own `${}` interpolation (SPEC §2: values
//! are expanded against the table and mesh's injected environment, per replica, at start).
//!
//! Syntax: `KEY=VALUE` lines, an optional `export ` prefix, `#` comments and blank lines.
//! Unquoted values are trimmed and end at ` #` (an inline comment). Single-quoted values
//! are literal, and as in compose they are not interpolated either. Double-quoted values
//! understand `\n`, `\r`, `\t`, `\"`, `\\` and `\$`, and may span lines.

/// One `KEY=VALUE` of an env file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) value: String,
    /// 1-based line of the key.
    pub(crate) line: usize,
    /// Single-quoted: taken as written, not interpolated.
    pub(crate) literal: bool,
}

/// Why an env file could not be parsed; every variant carries the 1-based line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EnvFileError {
    #[error("line {line}: expected `KEY=VALUE`")]
    MissingEquals { line: usize },
    #[error("line {line}: invalid variable name `{key}`")]
    InvalidKey { line: usize, key: String },
    #[error("line {line}: missing closing {quote}")]
    Unclosed { line: usize, quote: char },
    #[error("line {line}: unexpected text after the closing quote")]
    TrailingText { line: usize },
}

/// Parses the text of an env file into its entries, in file order.
pub(crate) fn parse(text: &str) -> Result<Vec<Entry>, EnvFileError> {
    let mut entries = Vec::new();
    let mut pos = 0;
    let mut line = 1;
    while pos < text.len() {
        let (this, next) = line_at(text, pos);
        let start_line = line;
        let content = this.trim_start();
        if content.trim_end().is_empty() || content.starts_with('#') {
            pos = next;
            line += 1;
            continue;
        }
        let body = content
            .strip_prefix("export")
            .filter(|r| r.starts_with([' ', '\t']))
            .map_or(content, str::trim_start);
        let Some((key, value)) = body.split_once('=') else {
            return Err(EnvFileError::MissingEquals { line: start_line });
        };
        let key = key.trim();
        if !is_valid_key(key) {
            return Err(EnvFileError::InvalidKey {
                line: start_line,
                key: key.to_owned(),
            });
        }
        // `value` is a suffix of `this`, so its offset in `text` follows from the lengths.
        let value = value.trim_start();
        let (value, literal) = match value.chars().next() {
            Some(quote @ ('\'' | '"')) => {
                // A quoted value may continue on the following lines.
                let open = pos + this.len() - value.len();
                let (parsed, end) = quoted(text, open + 1, quote, start_line)?;
                let last_line = start_line + text[pos..end].matches('\n').count();
                let (tail, after) = line_at(text, end);
                let tail = tail.trim();
                if !tail.is_empty() && !tail.starts_with('#') {
                    return Err(EnvFileError::TrailingText { line: last_line });
                }
                pos = after;
                line = last_line + 1;
                (parsed, quote == '\'')
            }
            _ => {
                pos = next;
                line += 1;
                (unquoted(value), false)
            }
        };
        entries.push(Entry {
            key: key.to_owned(),
            value,
            line: start_line,
            literal,
        });
    }
    Ok(entries)
}

// === helpers ===

/// The line starting at `pos` (without its `\n` or `\r\n`) and where the next one starts.
fn line_at(text: &str, pos: usize) -> (&str, usize) {
    let rest = &text[pos..];
    match rest.find('\n') {
        Some(i) => (
            rest[..i].strip_suffix('\r').unwrap_or(&rest[..i]),
            pos + i + 1,
        ),
        None => (rest, text.len()),
    }
}

fn is_valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// An unquoted value: up to an inline ` #` comment, trimmed.
fn unquoted(value: &str) -> String {
    let end = value
        .char_indices()
        .find(|&(i, c)| c == '#' && value[..i].ends_with([' ', '\t']))
        .map_or(value.len(), |(i, _)| i);
    value[..end].trim().to_owned()
}

/// Parses a quoted value whose content starts at `from` in `text`; returns the value and
/// the index just after the closing quote.
fn quoted(
    text: &str,
    from: usize,
    quote: char,
    line: usize,
) -> Result<(String, usize), EnvFileError> {
    let mut out = String::new();
    let mut chars = text[from..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => return Ok((out, from + i + 1)),
            '\\' if quote == '"' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 'r')) => out.push('\r'),
                Some((_, 't')) => out.push('\t'),
                Some((_, '"')) => out.push('"'),
                Some((_, '\\')) => out.push('\\'),
                // Kept escaped for the interpolation that follows: `\$` means a literal `$`.
                Some((_, '$')) => out.push_str("$$"),
                Some((_, other)) => {
                    out.push('\\');
                    out.push(other);
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    Err(EnvFileError::Unclosed { line, quote })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failing test panics")]
mod tests {
    use super::*;

    fn kv(text: &str) -> Vec<(String, String)> {
        parse(text)
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn simple_lines_comments_and_export() {
        let text = "# comment\n\nA=1\nexport B = two words \n  C=x # note\nD=a#b\nE=\n";
        assert_eq!(
            kv(text),
            [
                pair("A", "1"),
                pair("B", "two words"),
                pair("C", "x"),
                pair("D", "a#b"),
                pair("E", "")
            ]
        );
    }

    #[test]
    fn quoted_values() {
        let text =
            "A='lit $X \\n' # c\nB=\"a\\nb \\\"q\\\" \\\\ \\$HOME\"\nC=\"x # not a comment\"\n";
        let entries = parse(text).unwrap();
        assert_eq!(entries[0].value, "lit $X \\n");
        assert!(entries[0].literal);
        assert_eq!(entries[1].value, "a\nb \"q\" \\ $$HOME");
        assert!(!entries[1].literal);
        assert_eq!(entries[2].value, "x # not a comment");
        assert_eq!(
            entries.iter().map(|e| e.line).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn multi_line_double_quoted() {
        let text = "A=\"one\ntwo\"\nB=3\r\n";
        let entries = parse(text).unwrap();
        assert_eq!(entries[0].value, "one\ntwo");
        assert_eq!(
            (
                entries[1].key.as_str(),
                entries[1].value.as_str(),
                entries[1].line
            ),
            ("B", "3", 3)
        );
    }

    #[test]
    fn export_as_a_key_prefix_only_with_space() {
        assert_eq!(kv("exported=1\n"), [pair("exported", "1")]);
    }

    #[test]
    fn errors_carry_the_line() {
        assert_eq!(
            parse("A=1\nnonsense\n"),
            Err(EnvFileError::MissingEquals { line: 2 })
        );
        assert_eq!(
            parse("A=1\n\n1X=2\n"),
            Err(EnvFileError::InvalidKey {
                line: 3,
                key: "1X".to_owned()
            })
        );
        assert_eq!(
            parse("A=1\nB=\"open\n"),
            Err(EnvFileError::Unclosed {
                line: 2,
                quote: '"'
            })
        );
        assert_eq!(
            parse("A='x' y\n"),
            Err(EnvFileError::TrailingText { line: 1 })
        );
        assert_eq!(
            parse("A=1\nB=\"x\" y\n").unwrap_err().to_string(),
            "line 2: unexpected text after the closing quote"
        );
    }
}
