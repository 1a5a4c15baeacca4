//! Configuration = struct defaults, then an optional TOML file, then environment variables named
//! `<PREFIX>__<SECTION>__<KEY>` (e.g. `AUDIT_INGEST__CLICKHOUSE__URL`).

use std::path::Path;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads `T` from its defaults, `file` (if given) and the environment under `env_prefix`.
/// `list_keys` are dotted keys whose environment value is a comma-separated list.
pub fn load_settings<T: DeserializeOwned>(
    env_prefix: &str,
    file: Option<&Path>,
    list_keys: &[&str],
) -> Result<T, SettingsError> {
    let mut builder = config::Config::builder();
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file).required(true));
    }
    let mut environment = config::Environment::with_prefix(env_prefix)
        .prefix_separator("__")
        .separator("__");
    if !list_keys.is_empty() {
        environment = environment.list_separator(",").try_parsing(true);
        for key in list_keys {
            environment = environment.with_list_parse_key(key);
        }
    }
    Ok(builder.add_source(environment).build()?.try_deserialize()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        port: u16,
        topics: Vec<String>,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                name: "default".to_owned(),
                inner: Inner::default(),
            }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Self {
                port: 1,
                topics: vec!["a".to_owned()],
            }
        }
    }

    #[test]
    fn file_overrides_defaults_and_environment_overrides_file() {
        let dir = std::env::temp_dir().join(format!("audit-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sample.toml");
        std::fs::write(&file, "name = \"from-file\"\n[inner]\nport = 2\n").unwrap();

        let from_file: Sample = load_settings("AUDIT_SETTINGS_TEST_A", Some(&file), &[]).unwrap();
        assert_eq!(from_file.name, "from-file");
        assert_eq!(from_file.inner.port, 2);
        assert_eq!(from_file.inner.topics, vec!["a"]);

        // Unique prefixes keep this test independent of others running in parallel.
        std::env::set_var("AUDIT_SETTINGS_TEST_B__INNER__PORT", "3");
        std::env::set_var("AUDIT_SETTINGS_TEST_B__INNER__TOPICS", "x,y");
        let from_env: Sample =
            load_settings("AUDIT_SETTINGS_TEST_B", Some(&file), &["inner.topics"]).unwrap();
        assert_eq!(from_env.name, "from-file");
        assert_eq!(from_env.inner.port, 3);
        assert_eq!(from_env.inner.topics, vec!["x", "y"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        std::env::set_var("AUDIT_SETTINGS_TEST_C__INNER__PORT", "not-a-port");
        let err = load_settings::<Sample>("AUDIT_SETTINGS_TEST_C", None, &[]).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");

        std::env::set_var("AUDIT_SETTINGS_TEST_D__INNER__PROT", "2");
        let err = load_settings::<Sample>("AUDIT_SETTINGS_TEST_D", None, &[]).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }
}
