//! Secrets (client secret, tokens, the ingest token) in a type that never prints them.

use std::fmt;
use std::path::Path;

/// A secret string. `Debug` and `Display` print `[redacted]`; only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
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

/// Why a secret could not be loaded (never includes the secret).
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read secret file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file or variable is empty.
    #[error("secret from {0} is empty")]
    Empty(String),
}

/// Loads a secret from `file` if given, else `$CREDENTIALS_DIRECTORY/<credential>`, else the environment
/// variable `env_var`. A trailing newline is trimmed. `Ok(None)` when none of them is set.
pub fn load_secret(
    file: Option<&Path>,
    credential: &str,
    env_var: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<Option<Secret>, SecretError> {
    let from_file = |path: &Path| -> Result<Option<Secret>, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let value = text.trim_end_matches(['\n', '\r']).to_string();
        if value.trim().is_empty() {
            return Err(SecretError::Empty(path.display().to_string()));
        }
        Ok(Some(Secret(value)))
    };
    if let Some(f) = file {
        return from_file(f);
    }
    if let Some(dir) = env.get("CREDENTIALS_DIRECTORY") {
        let p = Path::new(dir).join(credential);
        if p.exists() {
            return from_file(&p);
        }
    }
    match env.get(env_var) {
        Some(v) if v.trim().is_empty() => Err(SecretError::Empty(env_var.to_string())),
        Some(v) => Ok(Some(Secret(v.trim_end_matches(['\n', '\r']).to_string()))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_then_credentials_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "from-file\n").unwrap();
        std::fs::write(dir.path().join("client-secret"), "from-creds\n").unwrap();
        let mut env = std::collections::BTreeMap::new();
        env.insert(
            "CREDENTIALS_DIRECTORY".to_string(),
            dir.path().display().to_string(),
        );
        env.insert("X".to_string(), "from-env".to_string());
        let get = |file: Option<&Path>, env: &std::collections::BTreeMap<String, String>| {
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
