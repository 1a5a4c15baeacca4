//! What the operator adds to a Kafka client of either service: extra librdkafka properties
//! (SASL/SSL...) and the SASL password, which comes apart so that it can live in a secret.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use secrecy::{ExposeSecret, SecretString};

/// Sets `properties`, then `sasl.password` when given.
pub fn apply_operator_settings(
    client: &mut ClientConfig,
    properties: &BTreeMap<String, String>,
    sasl_password: Option<&SecretString>,
) {
    for (key, value) in properties {
        client.set(key, value);
    }
    if let Some(password) = sasl_password {
        client.set("sasl.password", password.expose_secret());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_and_the_password_reach_the_client() {
        let mut client = ClientConfig::new();
        let properties = BTreeMap::from([("security.protocol".to_owned(), "SASL_SSL".to_owned())]);
        let password = SecretString::from("s3cret".to_owned());
        apply_operator_settings(&mut client, &properties, Some(&password));
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("sasl.password"), Some("s3cret"));
    }
}
