//! API keys: random secrets shown once, stored only as SHA-256 (the secrets are 160 bits
//! of randomness, so a fast hash is enough and keeps each request's check cheap; argon2 is
//! for human passwords). Checked keys are cached briefly.

use rand::RngCore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::domain::ApiKeyId;
use crate::store::{ApiKeyRecord, Store, StoreError, StoreResult};
use crate::util::{now_ms, sha256_hex};

/// How long a verified key is trusted without asking the database again.
const CACHE_TTL: Duration = Duration::from_secs(60);

/// Creates and verifies API keys.
#[derive(Clone)]
pub struct ApiKeys {
    store: Arc<dyn Store>,
    cache: Arc<Mutex<HashMap<String, (ApiKeyRecord, Instant)>>>,
}

impl ApiKeys {
    /// Keys kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            cache: Arc::default(),
        }
    }

    /// Creates a key named `name`; returns the secret (`sb_` + 40 hex), shown only now.
    pub async fn create(&self, name: &str) -> StoreResult<String> {
        let mut bytes = [0u8; 20];
        rand::thread_rng().fill_bytes(&mut bytes);
        let secret = format!("sb_{}", hex::encode(bytes));
        self.store
            .insert_api_key(&ApiKeyId::new(), name, &sha256_hex(secret.as_bytes()), now_ms())
            .await?;
        Ok(secret)
    }

    /// Makes sure `secret` is a valid key (the `SWITCHBOARD_API_KEY` setting).
    pub async fn ensure(&self, secret: &str, name: &str) -> StoreResult<()> {
        let hash = sha256_hex(secret.as_bytes());
        if self.store.find_api_key(&hash).await?.is_some() {
            return Ok(());
        }
        match self.store.insert_api_key(&ApiKeyId::new(), name, &hash, now_ms()).await {
            Ok(()) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The key record for `secret`, or `None` if it is not a key.
    pub async fn verify(&self, secret: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let hash = sha256_hex(secret.as_bytes());
        if let Some((rec, at)) = self.cache.lock().expect("cache lock").get(&hash) {
            if at.elapsed() < CACHE_TTL {
                return Ok(Some(rec.clone()));
            }
        }
        let found = self.store.find_api_key(&hash).await?;
        if let Some(rec) = &found {
            let mut cache = self.cache.lock().expect("cache lock");
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(hash, (rec.clone(), Instant::now()));
        }
        Ok(found)
    }
}
