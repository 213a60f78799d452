//! Secrets (client secret, tokens, the ingest token) in a type that never prints them.
//!
//! The type lives in [`crate::marketplace::secret`]; this module adds the loader that takes the environment as
//! a map, so configuration and tests never read or mutate the process environment behind the caller's back.

pub use crate::marketplace::secret::{Secret, SecretError};
use std::collections::BTreeMap;
use std::path::Path;

/// Loads a secret from `file` if given, else `$CREDENTIALS_DIRECTORY/<credential>`, else the variable `env_var`
/// of `env`. A trailing newline is trimmed. `Ok(None)` when none of them is set.
pub fn load_secret(
    file: Option<&Path>,
    credential: &str,
    env_var: &str,
    env: &BTreeMap<String, String>,
) -> Result<Option<Secret>, SecretError> {
    crate::marketplace::secret::load_secret_with(file, credential, env_var, |k| env.get(k).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

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
