//! What the connected server supports, for settings that only some supported versions know.

use crate::StoreError;

/// Whether the server knows the setting `name` (18.16 refuses a query naming a setting it does
/// not know, so a setting newer than the oldest supported version is only sent where it exists).
pub async fn has_setting(client: &clickhouse::Client, name: &str) -> Result<bool, StoreError> {
    let found: u64 = client
        .query("SELECT count() FROM system.settings WHERE name = ?")
        .bind(name)
        .fetch_one()
        .await
        .map_err(StoreError::clickhouse(format!(
            "looking up the setting {name}"
        )))?;
    Ok(found > 0)
}
