//! Inbox agents and their browser sessions (docs/inbox.md).
//!
//! - Passwords are hashed with argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes,
//!   1 lane — OWASP's minimum recommendation) in PHC string form, off the async threads.
//! - A session is a random 256-bit token in an `HttpOnly` cookie; the database keeps only its
//!   SHA-256, so a copy of the database does not sign anyone in. Each session also has a
//!   random CSRF token that the pages send back.
//! - A session ends after `session_idle_hours` without a request, `session_max_hours` after
//!   sign-in, or at sign-out.
//! - Failed sign-ins are counted per email + client address and per client address; over the
//!   limit, attempts are refused without looking at the password until the window ends.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use rand::{Rng, RngCore};
use std::sync::{Arc, OnceLock};

use crate::config::InboxConfig;
use crate::domain::AgentId;
use crate::store::{AgentRecord, AgentRole, NewAgent, NewSession, SessionRecord, Store, StoreError};
use crate::util::{now_ms, sha256_hex};

/// How often (at most) a session's `last_seen_at` is written: once a minute is precise enough
/// for a 12-hour idle limit and spares a write per request.
const TOUCH_EVERY_MS: i64 = 60_000;

/// Shortest and longest accepted password, in characters (NIST SP 800-63B asks for at least 8
/// and for long passphrases to be allowed).
pub const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 8..=256;

/// Why an agent could not be created.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A field is invalid; the text says which and why.
    #[error("{0}")]
    Invalid(String),
    /// The email already belongs to an agent.
    #[error("an agent with email {0} already exists")]
    EmailTaken(String),
    /// The database failed.
    #[error(transparent)]
    Store(StoreError),
}

/// Why a sign-in was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// Unknown email or wrong password (deliberately not told apart).
    #[error("wrong email or password")]
    WrongCredentials,
    /// Too many failures from this client for this email (or from this client at all).
    #[error("too many failed sign-ins; try again in {retry_after_secs} s")]
    Throttled {
        /// When the window ends, in seconds from now (at most).
        retry_after_secs: u64,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A new session: the cookie value (shown once, never stored) and the stored session.
pub struct SignedIn {
    /// The token to put in the session cookie.
    pub token: String,
    /// The session as stored.
    pub session: SessionRecord,
}

/// Trims and lower-cases an email address and checks its shape (`local@domain`, at most 254
/// characters, no spaces or control characters). The error says what is wrong.
pub fn normalize_email(raw: &str) -> Result<String, String> {
    let e = raw.trim().to_lowercase();
    let Some((local, domain)) = e.split_once('@') else {
        return Err(format!("'{}' is not an email address", raw.trim()));
    };
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return Err(format!("'{}' is not an email address", raw.trim()));
    }
    if e.chars().count() > 254 || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an email address has at most 254 characters and no spaces".into());
    }
    Ok(e)
}

/// Checks a new password's length ([`PASSWORD_CHARS`]).
pub fn check_password(p: &str) -> Result<(), String> {
    let n = p.chars().count();
    if !PASSWORD_CHARS.contains(&n) {
        return Err(format!(
            "a password must have {} to {} characters",
            PASSWORD_CHARS.start(),
            PASSWORD_CHARS.end()
        ));
    }
    Ok(())
}

/// A random password of 20 letters and digits (about 119 bits), for the first admin.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::thread_rng();
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Hashes a password with argon2id (PHC string). CPU-heavy: call from a blocking thread.
pub fn hash_password(password: &str) -> Result<String, anyhow::Error> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
}

/// Checks a password against a PHC hash; false for a wrong password or an unreadable hash.
/// CPU-heavy: call from a blocking thread.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// A hash of a random password, checked against when the email is unknown so that a
/// sign-in takes as long whether or not the account exists.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash_password(&generate_password()).expect("argon2 with default parameters"))
}

fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Agents, sessions and the sign-in throttle.
#[derive(Clone)]
pub struct Agents {
    store: Arc<dyn Store>,
    config: InboxConfig,
}

impl Agents {
    /// Agents kept in `store`, with the session and throttle settings of `config`.
    pub fn new(store: Arc<dyn Store>, config: InboxConfig) -> Self {
        Self { store, config }
    }

    /// Creates an agent after checking the email, name (1–100 characters) and password.
    pub async fn create(
        &self,
        email: &str,
        display_name: &str,
        role: AgentRole,
        password: &str,
    ) -> Result<AgentRecord, AgentError> {
        let email = normalize_email(email).map_err(AgentError::Invalid)?;
        let name = display_name.trim();
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(AgentError::Invalid(
                "a display name must have 1 to 100 characters and no control characters".into(),
            ));
        }
        check_password(password).map_err(AgentError::Invalid)?;
        let password = password.to_string();
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| AgentError::Store(StoreError::Other(e.into())))?
            .map_err(|e| AgentError::Store(StoreError::Other(e)))?;
        self.store
            .create_agent(NewAgent {
                id: AgentId::new(),
                email: email.clone(),
                display_name: name.to_string(),
                role,
                password_hash: hash,
                now: now_ms(),
            })
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => AgentError::EmailTaken(email),
                other => AgentError::Store(other),
            })
    }

    /// At the first start (no agent at all): creates the admin `email` with `password`, or
    /// with a generated password, which is returned so that it can be printed once.
    /// Returns `None` when agents exist or the password was given.
    pub async fn ensure_first_admin(&self, email: &str, password: Option<&str>) -> anyhow::Result<Option<String>> {
        if self.store.count_agents().await? > 0 {
            return Ok(None);
        }
        let (password, generated) = match password {
            Some(p) => (p.to_string(), false),
            None => (generate_password(), true),
        };
        match self.create(email, "Admin", AgentRole::Admin, &password).await {
            Ok(_) => Ok(generated.then_some(password)),
            // Another instance created it at the same moment.
            Err(AgentError::EmailTaken(_)) => Ok(None),
            Err(e) => Err(anyhow::anyhow!("creating the first inbox admin: {e}")),
        }
    }

    /// Checks the credentials and starts a session. `client` identifies the client for the
    /// throttle (its IP address).
    pub async fn sign_in(&self, email: &str, password: &str, client: &str) -> Result<SignedIn, SignInError> {
        let now = now_ms();
        let window_ms = i64::try_from(self.config.sign_in_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let email = normalize_email(email).unwrap_or_else(|_| email.trim().to_lowercase());
        let pair_key = format!("email+ip:{email}|{client}");
        let ip_key = format!("ip:{client}");
        let max = i64::from(self.config.sign_in_max_failures);
        if self.store.sign_in_failures(&pair_key, now, window_ms).await? >= max
            || self.store.sign_in_failures(&ip_key, now, window_ms).await? >= max * 10
        {
            return Err(SignInError::Throttled {
                retry_after_secs: self.config.sign_in_window_secs,
            });
        }
        let agent = self.store.find_agent_by_email(&email).await?;
        let hash = agent
            .as_ref()
            .map_or_else(|| decoy_hash().to_string(), |a| a.password_hash.clone());
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .map_err(|e| StoreError::Other(e.into()))?;
        let agent = match (agent, ok) {
            (Some(a), true) => a,
            _ => {
                self.store.record_sign_in_failure(&pair_key, now, window_ms).await?;
                self.store.record_sign_in_failure(&ip_key, now, window_ms).await?;
                return Err(SignInError::WrongCredentials);
            }
        };
        self.store.clear_sign_in_failures(&pair_key).await?;
        let token = random_token(32);
        let new = NewSession {
            token_hash: sha256_hex(token.as_bytes()),
            agent_id: agent.id.clone(),
            csrf_token: random_token(32),
            now,
            expires_at: now + self.max_ms(),
        };
        self.store.create_session(new.clone()).await?;
        Ok(SignedIn {
            token,
            session: SessionRecord {
                token_hash: new.token_hash,
                agent,
                csrf_token: new.csrf_token,
                created_at: now,
                last_seen_at: now,
                expires_at: new.expires_at,
            },
        })
    }

    /// The live session of a cookie token, or `None` (unknown, signed out, idle too long or
    /// past its absolute end; an ended session is deleted). Records the activity.
    pub async fn session(&self, token: &str) -> Result<Option<SessionRecord>, StoreError> {
        if token.is_empty() || token.len() > 128 {
            return Ok(None);
        }
        let hash = sha256_hex(token.as_bytes());
        let Some(s) = self.store.find_session(&hash).await? else {
            return Ok(None);
        };
        let now = now_ms();
        if s.expires_at <= now || s.last_seen_at + self.idle_ms() < now {
            self.store.delete_session(&hash).await?;
            return Ok(None);
        }
        if now - s.last_seen_at >= TOUCH_EVERY_MS {
            self.store.touch_session(&hash, now).await?;
        }
        Ok(Some(s))
    }

    /// Ends the session of a cookie token (sign-out).
    pub async fn sign_out(&self, token: &str) -> Result<(), StoreError> {
        self.store.delete_session(&sha256_hex(token.as_bytes())).await
    }

    /// Deletes ended sessions and old throttle windows; returns how many sessions.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        let now = now_ms();
        self.store.purge_sessions(now - self.idle_ms(), now).await
    }

    /// The store, for the pages that list agents.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// How long a session may stay unused.
    pub fn idle_ms(&self) -> i64 {
        i64::try_from(self.config.session_idle_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX / 4)
    }

    /// How long a session lasts at most.
    pub fn max_ms(&self) -> i64 {
        i64::try_from(self.config.session_max_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX / 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_lowercased_and_checked() {
        assert_eq!(normalize_email("  Ana@Example.COM ").unwrap(), "ana@example.com");
        assert_eq!(normalize_email("admin@localhost").unwrap(), "admin@localhost");
        for bad in ["", "ana", "@example.com", "ana@", "a b@example.com", "a@b@c"] {
            assert!(normalize_email(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsf", &h));
        assert!(!verify_password("correct horse", "not a hash"));
        // Salted: the same password hashes differently.
        assert_ne!(h, hash_password("correct horse").unwrap());
    }

    #[test]
    fn password_length_rules_and_generated_passwords() {
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"x".repeat(257)).is_err());
        let p = generate_password();
        assert_eq!(p.len(), 20);
        assert!(check_password(&p).is_ok());
        assert_ne!(p, generate_password());
    }
}
