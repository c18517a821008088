//! A configured secret: a password, a signing key, an encryption key.
//!
//! It is a string everywhere it is read from (TOML, environment), and it
//! never leaves the process by accident: `Debug` and `Serialize` print
//! [`REDACTED`] instead of the value (an empty secret prints as empty, so a
//! missing one is visible), which covers logs, `idlemeter config` and any
//! struct that derives either. The value is read with [`Secret::expose`],
//! which names the one place that uses it.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// What a set secret prints as.
pub const REDACTED: &str = "<redacted>";

/// A string that prints as [`REDACTED`]. The literal [`REDACTED`] is
/// refused when read: a configuration saved from `idlemeter config` must
/// not start services with a publicly known key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        if value == REDACTED {
            return Err(serde::de::Error::custom(format!(
                "{REDACTED} is what `idlemeter config` prints in place of a secret, not a secret: set the real value"
            )));
        }
        Ok(Self(value))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the call that needs it (signing, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str(REDACTED)
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { REDACTED })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding "secrets": a secret printed by Debug or serialised for
    /// `idlemeter config` shows no byte of its value.
    #[test]
    fn secrets_print_redacted_in_debug_and_serialisation() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Settings {
            password: Secret,
            unset: Secret,
        }
        let settings: Settings =
            serde_json::from_str(r#"{"password": "hunter2-s3cr3t", "unset": ""}"#).expect("parses");
        assert_eq!(settings.password.expose(), "hunter2-s3cr3t");
        let debug = format!("{settings:?}");
        let json = serde_json::to_string(&settings).expect("serialises");
        for printed in [&debug, &json] {
            assert!(!printed.contains("hunter2"), "{printed}");
            assert!(printed.contains(REDACTED), "{printed}");
        }
        assert!(json.contains(r#""unset":"""#), "{json}");
        // What was printed does not load back as a secret.
        let reloaded: Result<Settings, _> = serde_json::from_str(&json);
        assert!(reloaded.is_err_and(|error| error.to_string().contains("not a secret")));
    }
}
