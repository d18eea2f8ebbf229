//! Secret indirection. A secret in the configuration is always a reference: a file, an
//! environment variable, or a systemd credential (a file name under
//! `$CREDENTIALS_DIRECTORY`, see systemd.exec(5) `LoadCredential=`). The resolved value
//! lives in a [`SecretString`], whose `Debug` prints a placeholder, and is read again on
//! every resolve so a rotated file takes effect without a restart.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use secrecy::SecretString;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// Where a secret comes from. Exactly one key is allowed; a literal string is rejected
/// by the parser because this type has no variant that holds one. `Deserialize` is
/// written by hand so that the rejection of a literal never repeats the literal (serde's
/// derived message would quote it as an unknown variant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// Path of a file holding the secret (trailing newline removed); relative to the
    /// configuration file.
    File(PathBuf),
    /// Name of an environment variable.
    Env(String),
    /// Name of a systemd credential.
    Credential(String),
}

const SECRET_KEYS: &[&str] = &["file", "env", "credential"];

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SecretRefVisitor)
    }
}

struct SecretRefVisitor;

impl SecretRefVisitor {
    fn literal<E: de::Error>(self) -> Result<SecretRef, E> {
        Err(E::custom(
            "a secret cannot be written literally; use { file = \"...\" }, { env = \"...\" } \
             or { credential = \"...\" }",
        ))
    }
}

impl<'de> Visitor<'de> for SecretRefVisitor {
    type Value = SecretRef;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a secret reference: { file = ... }, { env = ... } or { credential = ... }")
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretRef, E> {
        self.literal()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretRef, E> {
        self.literal()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretRef, E> {
        self.literal()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretRef, E> {
        self.literal()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretRef, E> {
        self.literal()
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<SecretRef, E> {
        self.literal()
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<SecretRef, A::Error> {
        self.literal()
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<SecretRef, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom(
                "a secret reference needs one of file, env, credential",
            ));
        };
        let secret = match key.as_str() {
            "file" => SecretRef::File(map.next_value()?),
            "env" => SecretRef::Env(map.next_value()?),
            "credential" => SecretRef::Credential(map.next_value()?),
            _ => return Err(de::Error::unknown_field(&key, SECRET_KEYS)),
        };
        if map.next_key::<String>()?.is_some() {
            return Err(de::Error::custom(
                "a secret reference has exactly one of file, env, credential",
            ));
        }
        Ok(secret)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path} cannot be read")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("environment variable {name} is not set or not unicode")]
    Env { name: String },
    #[error("credential {name} requested but CREDENTIALS_DIRECTORY is not set")]
    NoCredentialsDirectory { name: String },
    #[error("secret from {what} is empty")]
    Empty { what: String },
}

impl SecretRef {
    /// Short description for the inventory and errors; never the value.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::File(p) => format!("file {}", p.display()),
            SecretRef::Env(n) => format!("env {n}"),
            SecretRef::Credential(n) => format!("credential {n}"),
        }
    }

    /// Reads the secret now.
    pub fn resolve(&self, base_dir: &Path) -> Result<SecretString, SecretError> {
        let raw = match self {
            SecretRef::File(path) => {
                let path = base_dir.join(path);
                std::fs::read_to_string(&path).map_err(|source| SecretError::File { path, source })?
            }
            SecretRef::Env(name) => std::env::var(name).map_err(|_| SecretError::Env { name: name.clone() })?,
            SecretRef::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentialsDirectory { name: name.clone() })?;
                let path = Path::new(&dir).join(name);
                std::fs::read_to_string(&path).map_err(|source| SecretError::File { path, source })?
            }
        };
        let value = raw.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err(SecretError::Empty { what: self.describe() });
        }
        Ok(SecretString::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn file_secret_is_read_and_trimmed_and_debug_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cr3t-canary\n").unwrap();
        let secret = SecretRef::File("token".into()).resolve(dir.path()).unwrap();
        assert_eq!(secret.expose_secret(), "s3cr3t-canary");
        assert!(!format!("{secret:?}").contains("s3cr3t"));
    }

    #[test]
    fn missing_sources_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = SecretRef::File("nope".into()).resolve(dir.path()).unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
        let err = SecretRef::Env("CONCORD_TEST_SURELY_UNSET".into())
            .resolve(dir.path())
            .unwrap_err();
        assert!(err.to_string().contains("CONCORD_TEST_SURELY_UNSET"), "{err}");
    }

    #[test]
    fn literal_secret_is_rejected_by_the_parser() {
        #[derive(Deserialize)]
        struct Holder {
            key: SecretRef,
        }
        let error = toml::from_str::<Holder>(r#"key = "literal-canary""#)
            .err()
            .expect("literal rejected");
        // The message; the full Display of a toml error also quotes the source line.
        assert!(
            error.message().starts_with("a secret cannot be written literally"),
            "{error}"
        );
        assert!(!error.message().contains("literal-canary"), "{error}");
        assert!(toml::from_str::<Holder>("key = 12345").is_err());
        assert!(toml::from_str::<Holder>(r#"key = { env = "X", file = "f" }"#).is_err());
        assert!(toml::from_str::<Holder>(r#"key = { password = "X" }"#).is_err());
        assert!(toml::from_str::<Holder>("key = {}").is_err());
        assert_eq!(
            toml::from_str::<Holder>(r#"key = { env = "X" }"#).map(|h| h.key).ok(),
            Some(SecretRef::Env("X".into()))
        );
        assert_eq!(
            toml::from_str::<Holder>(r#"key = { file = "/run/t" }"#)
                .map(|h| h.key)
                .ok(),
            Some(SecretRef::File("/run/t".into()))
        );
    }
}
