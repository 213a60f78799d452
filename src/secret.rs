//! Secrets that cannot leak through formatting, and where they are loaded from (rules layer: the one place).
//!
//! A client secret or access token printed once into a log is a credential incident. [`Secret`] therefore prints
//! `[redacted]` through both `Debug` and `Display`, so a `?config` in a log line or an `{error}` that happens to
//! hold one is safe; the value is only reachable through [`Secret::expose`], which is easy to grep for.
//!
//! Secrets are read, in order, from an explicit file, from systemd's `$CREDENTIALS_DIRECTORY` (`LoadCredential=`),
//! or from an environment variable; errors name the file, never its contents. The environment is passed in as a
//! map, so configuration and tests never read or mutate the process environment behind the caller's back.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A secret string (client secret, access token, identity header) that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself; only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Why a secret could not be loaded. Names the file; never includes what was read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read secret file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error (kind and OS message only).
        source: std::io::Error,
    },
    /// The file exists but holds nothing (after trimming the trailing newline).
    #[error("secret file {} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is not UTF-8.
    #[error("secret file {} is not valid UTF-8", path.display())]
    NotUtf8 {
        /// The file.
        path: PathBuf,
    },
}

/// Loads a secret from `file` if given, else `$CREDENTIALS_DIRECTORY/<credential_name>` if that file exists, else
/// the environment variable `env_var` as `env` answers it. `Ok(None)` when none of them provides one (an empty
/// variable counts as unset). A trailing newline (`\n` or `\r\n`) is trimmed, since editors and `echo` add one.
pub fn load_secret_with(
    file: Option<&Path>,
    credential_name: &str,
    env_var: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, SecretError> {
    if let Some(path) = file {
        return read_secret_file(path).map(Some);
    }
    if let Some(dir) = env("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        let path = Path::new(&dir).join(credential_name);
        match read_secret_file(&path) {
            Ok(secret) => return Ok(Some(secret)),
            // systemd may pass other credentials but not this one: fall through to the environment.
            Err(SecretError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(other) => return Err(other),
        }
    }
    Ok(env(env_var)
        .map(|v| trim_newline(&v).to_owned())
        .filter(|v| !v.is_empty())
        .map(Secret))
}

/// Loads a secret from `file` if given, else `$CREDENTIALS_DIRECTORY/<credential>`, else the variable `env_var`
/// of `env`. A trailing newline is trimmed. `Ok(None)` when none of them is set.
pub fn load_secret(
    file: Option<&Path>,
    credential: &str,
    env_var: &str,
    env: &BTreeMap<String, String>,
) -> Result<Option<Secret>, SecretError> {
    load_secret_with(file, credential, env_var, |k| env.get(k).cloned())
}

fn read_secret_file(path: &Path) -> Result<Secret, SecretError> {
    let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| SecretError::NotUtf8 {
        path: path.to_owned(),
    })?;
    let trimmed = trim_newline(&text);
    if trimmed.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Secret(trimmed.to_owned()))
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\n', '\r'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let secret = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some([redacted])");
        assert_eq!(secret.expose(), "hunter2-very-secret");
    }

    #[test]
    fn file_first_and_trailing_newline_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t\r\n").expect("write");
        let got = load_secret_with(Some(&path), "client-secret", "X", |_| {
            Some("from-env".into())
        })
        .expect("loads");
        assert_eq!(got.expect("some").expose(), "s3cr3t");
    }

    #[test]
    fn credentials_directory_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("client-secret"), "from-creds\n").expect("write");
        let dir_str = dir.path().to_str().expect("utf8").to_owned();
        let env = |key: &str| match key {
            "CREDENTIALS_DIRECTORY" => Some(dir_str.clone()),
            "MY_SECRET" => Some("from-env".to_owned()),
            _ => None,
        };
        let got = load_secret_with(None, "client-secret", "MY_SECRET", env).expect("loads");
        assert_eq!(got.expect("some").expose(), "from-creds");

        // The credential is not in the directory: the environment variable is used.
        let got = load_secret_with(None, "other-name", "MY_SECRET", env).expect("loads");
        assert_eq!(got.expect("some").expose(), "from-env");

        let got = load_secret_with(None, "other-name", "UNSET", env).expect("loads");
        assert!(got.is_none());
    }

    #[test]
    fn errors_name_the_file_but_not_the_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        let err = load_secret_with(Some(&missing), "c", "E", |_| None).expect_err("missing");
        assert!(err.to_string().contains("nope"), "{err}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let err = load_secret_with(Some(&empty), "c", "E", |_| None).expect_err("empty");
        assert!(err.to_string().contains("empty"), "{err}");

        let bad = dir.path().join("bad");
        std::fs::write(&bad, [0xff, 0xfe, b'Q', b'Z', b'X', b'9']).expect("write");
        let err = load_secret_with(Some(&bad), "c", "E", |_| None).expect_err("not utf8");
        assert!(!format!("{err:?}").contains("QZX9"), "{err:?}");
    }

    #[test]
    fn file_then_credentials_then_env_map() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "from-file\n").unwrap();
        std::fs::write(dir.path().join("client-secret"), "from-creds\n").unwrap();
        let mut env = BTreeMap::new();
        env.insert(
            "CREDENTIALS_DIRECTORY".to_string(),
            dir.path().display().to_string(),
        );
        env.insert("X".to_string(), "from-env".to_string());
        let get = |file: Option<&Path>, env: &BTreeMap<String, String>| {
            load_secret(file, "client-secret", "X", env)
                .unwrap()
                .unwrap()
                .expose()
                .to_string()
        };
        assert_eq!(get(Some(&f), &env), "from-file");
        assert_eq!(get(None, &env), "from-creds");
        env.remove("CREDENTIALS_DIRECTORY");
        assert_eq!(get(None, &env), "from-env");
        env.remove("X");
        assert!(
            load_secret(None, "client-secret", "X", &env)
                .unwrap()
                .is_none()
        );
        let err = load_secret(Some(Path::new("/nonexistent/x")), "c", "X", &env).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"));
    }
}
