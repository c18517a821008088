//! Identities of the things idlemeter meters.
//!
//! Ids are parsed at the edge (wire, JSONL, HTTP) into newtypes, so a value that
//! exists is valid: non-empty, at most [`MAX_ID_LEN`] bytes, and made of
//! printable ASCII without spaces or control characters, with no path
//! separator (`/`, `\\`) and not a dot segment (`.`, `..`). That keeps them
//! safe to use as Kafka keys, ClickHouse string keys, URL path segments and
//! file or cgroup names: an id can never name a parent or another directory.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long, the limit is {MAX_ID_LEN}")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} {value:?} contains {bad:?}: only printable ASCII without spaces is allowed")]
    BadCharacter {
        kind: &'static str,
        value: String,
        bad: char,
    },
    #[error(
        "{kind} {value:?} contains a path separator {bad:?}: ids name one thing, never a path"
    )]
    PathSeparator {
        kind: &'static str,
        value: String,
        bad: char,
    },
    #[error("{kind} {value:?} is a dot segment: it would name a directory, not a {kind}")]
    DotSegment { kind: &'static str, value: String },
}

fn validate_id(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
        });
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(IdError::BadCharacter {
            kind,
            value: value.to_owned(),
            bad,
        });
    }
    if let Some(bad) = value.chars().find(|c| matches!(c, '/' | '\\')) {
        return Err(IdError::PathSeparator {
            kind,
            value: value.to_owned(),
            bad,
        });
    }
    if value == "." || value == ".." {
        return Err(IdError::DotSegment {
            kind,
            value: value.to_owned(),
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        ///
        /// Shared (`Arc<str>`): clones are cheap, and equality checks the pointer
        /// before the bytes, so ids interned at the edge compare in one step on
        /// the rating hot path.
        #[derive(Debug, Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses an id, refusing empty, overlong or non-printable values.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate_id($kind, &value)?;
                Ok(Self(Arc::from(value)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
            }
        }

        // By content, consistent with `eq` (equal ids have equal bytes).
        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state);
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// The tenant that pays: every sample, invoice and API key belongs to one.
    CustomerId,
    "customer id"
);
string_id!(
    /// One persistent sandbox (microVM or container), stable across suspends,
    /// resumes and restarts.
    SandboxId,
    "sandbox id"
);
string_id!(
    /// The node (host) whose collector measured a sample; the Kafka key of its batches.
    NodeId,
    "node id"
);

/// One boot or restore of a sandbox. Counters are cumulative within an epoch and
/// start again from zero in the next one, so usage is only ever a difference of
/// two counters of the same epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Sorted `ids` in chunks of at most `size` (at least 1), each with its first
/// and last id: the inclusive range one query reads the chunk's rows with.
pub fn id_ranges<T>(ids: &[T], size: usize) -> impl Iterator<Item = (&[T], &T, &T)> {
    ids.chunks(size.max(1))
        .filter_map(|chunk| Some((chunk, chunk.first()?, chunk.last()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_ranges_cover_every_id_once_in_bounded_chunks() {
        let ids: Vec<u32> = (1..=7).collect();
        let ranges: Vec<(usize, u32, u32)> = id_ranges(&ids, 3)
            .map(|(chunk, first, last)| (chunk.len(), *first, *last))
            .collect();
        assert_eq!(ranges, vec![(3, 1, 3), (3, 4, 6), (1, 7, 7)]);
        assert_eq!(
            id_ranges(&ids, 0).count(),
            7,
            "a size of 0 reads one at a time"
        );
        assert_eq!(id_ranges::<u32>(&[], 3).count(), 0);
    }

    #[test]
    fn ids_refuse_empty_long_and_spaced_values() {
        assert_eq!(
            SandboxId::parse(""),
            Err(IdError::Empty { kind: "sandbox id" })
        );
        assert!(matches!(
            CustomerId::parse("x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        assert!(matches!(
            NodeId::parse("node 1"),
            Err(IdError::BadCharacter { bad: ' ', .. })
        ));
        assert_eq!(
            SandboxId::parse("sbx-01").map(|id| id.to_string()),
            Ok("sbx-01".to_owned())
        );
    }

    /// Finding "forged ids reach the node's filesystem": an id joined into
    /// a cgroup or file path must not leave its directory.
    #[test]
    fn forged_ids_with_separators_or_dot_segments_are_refused() {
        for forged in ["../../system.slice", "a/b", "..", ".", "a\\b", "/"] {
            assert!(
                SandboxId::parse(forged).is_err(),
                "{forged:?} must not be a sandbox id"
            );
            assert!(CustomerId::parse(forged).is_err(), "{forged:?}");
            assert!(NodeId::parse(forged).is_err(), "{forged:?}");
        }
        assert!(matches!(
            SandboxId::parse(".."),
            Err(IdError::DotSegment { .. })
        ));
        assert!(matches!(
            CustomerId::parse("acme/../x"),
            Err(IdError::PathSeparator { bad: '/', .. })
        ));
        // Dots inside a name are fine: only whole dot segments name directories.
        assert!(SandboxId::parse("sbx..1").is_ok());
        assert!(SandboxId::parse(".hidden").is_ok());
    }

    #[test]
    fn ids_deserialize_through_validation() {
        let parsed: Result<CustomerId, _> = serde_json::from_str("\"\"");
        assert!(parsed.is_err());
        let parsed: CustomerId = serde_json::from_str("\"acme\"").expect("valid id");
        assert_eq!(parsed.as_str(), "acme");
    }
}
