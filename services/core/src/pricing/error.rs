//! Why a price sheet was refused, located at the file, line and field.
//!
//! A finance reviewer fixes a sheet from this message alone, so every refusal
//! names the sheet's path label, the 1-based line, the dotted field
//! (`versions.resources.vcpu.unit_price`) and the reason in plain words.

use std::fmt;
use std::ops::Range;

/// A price sheet that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SheetError {
    /// The label the caller gave the sheet, usually its path.
    pub path: String,
    /// 1-based line of the offending text, when it can be pointed at.
    pub line: Option<usize>,
    /// Dotted name of the offending field.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for SheetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: ", self.path)?,
            None => write!(f, "{}: ", self.path)?,
        }
        write!(f, "field `{}`: {}", self.field, self.reason)
    }
}

/// Builds located [`SheetError`]s from byte spans of the sheet's text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SheetText<'a> {
    pub text: &'a str,
    pub path: &'a str,
}

impl SheetText<'_> {
    /// An error at a known span and field.
    pub fn error_at(
        &self,
        span: Option<Range<usize>>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> SheetError {
        SheetError {
            path: self.path.to_owned(),
            line: span.map(|span| self.line_of(span.start)),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Translates a TOML parse or type error, recovering the field from the
    /// table header and key around the span, since the toml crate keeps its key
    /// path private.
    pub fn locate_toml_error(&self, error: &toml::de::Error) -> SheetError {
        let reason = error.message().trim().to_owned();
        let span = error.span();
        let mut field = span
            .as_ref()
            .map(|span| self.field_around(span.start))
            .unwrap_or_default();
        if let Some(missing) = backquoted(&reason) {
            let named_already = field == missing || field.ends_with(&format!(".{missing}"));
            if (reason.starts_with("missing field") || reason.starts_with("unknown field"))
                && !named_already
            {
                field = join_path(&field, missing);
            }
        }
        if field.is_empty() {
            field = "(sheet)".to_owned();
        }
        self.error_at(span, field, reason)
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|byte| **byte == b'\n')
            .count()
            + 1
    }

    /// `header.key` for the line holding `offset`: the nearest table header at
    /// or above it, and the key on the line itself if it has one.
    fn field_around(&self, offset: usize) -> String {
        let line_index = self.line_of(offset) - 1;
        let lines: Vec<&str> = self.text.lines().collect();
        let Some(own_line) = lines.get(line_index) else {
            return String::new();
        };
        let header = lines[..=line_index]
            .iter()
            .rev()
            .find_map(|line| table_header(line))
            .unwrap_or_default();
        if table_header(own_line).is_some() {
            return header;
        }
        let key = own_line
            .split_once('=')
            .map(|(key, _)| key.trim().trim_matches('"'))
            .unwrap_or_default();
        join_path(&header, key)
    }
}

fn table_header(line: &str) -> Option<String> {
    let trimmed = line.trim();
    let inner = trimmed
        .strip_prefix("[[")
        .and_then(|rest| rest.split_once("]]"))
        .or_else(|| {
            trimmed
                .strip_prefix('[')
                .and_then(|rest| rest.split_once(']'))
        })?
        .0;
    Some(inner.trim().replace('"', ""))
}

fn join_path(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (_, true) => parent.to_owned(),
        (true, false) => child.to_owned(),
        (false, false) => format!("{parent}.{child}"),
    }
}

fn backquoted(text: &str) -> Option<&str> {
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(&text[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[sheet]\nplatform = \"x\"\n\n[[versions]]\n[versions.resources.vcpu]\nunit = \"vcpu-hour\"\n";

    #[test]
    fn field_comes_from_header_and_key() {
        let sheet = SheetText {
            text: TEXT,
            path: "prices/x.toml",
        };
        let offset = TEXT.find("unit =").expect("key present");
        assert_eq!(sheet.field_around(offset), "versions.resources.vcpu.unit");
        assert_eq!(sheet.line_of(offset), 6);
        let error = sheet.error_at(Some(offset..offset + 4), "f", "bad");
        assert_eq!(error.to_string(), "prices/x.toml:6: field `f`: bad");
    }
}
