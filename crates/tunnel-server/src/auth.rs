//! Bearer tokens and roles.
//!
//! A token is `tnl_<id>_<secret>`. The id is public and finds the row; only the SHA-256 of the
//! secret is stored, and it is compared in constant time. `WORKER_TOKEN` (the original
//! project's single shared token) works as an admin token, compared the same way.
//!
//! Handlers declare what they need with an extractor — [`ClientAuth`], [`RunnerAuth`] or
//! [`AdminAuth`] — so a route cannot forget to check.
//!
//! A token verified once is remembered ([`Verified`]) until the token table changes, so the
//! requests after the first skip the SHA-256.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, RwLock};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tunnel_protocol::{CreatedToken, Role, TokenInfo};
use tunnel_store::{Scope, Store, StoreError};

use crate::AppState;
use crate::error::ApiError;

/// The id under which tasks submitted with `WORKER_TOKEN` are owned.
pub(crate) const WORKER_TOKEN_ID: &str = "worker-token";
/// Shortest `WORKER_TOKEN` accepted.
pub const WORKER_TOKEN_MIN_LEN: usize = 16;
const TOKEN_PREFIX: &str = "tnl_";

/// Who is calling.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub token_id: String,
    pub role: Role,
}

impl Caller {
    /// Admins see every task; a client sees the tasks it submitted.
    pub(crate) fn scope(&self) -> Scope {
        match self.role {
            Role::Admin => Scope::All,
            _ => Scope::Owner(self.token_id.clone()),
        }
    }
}

struct KnownToken {
    role: Role,
    secret_sha256: [u8; 32],
    revoked: bool,
}

/// Verifies tokens against an in-memory copy of the token table, refreshed on every change
/// made through this server.
pub(crate) struct Authenticator {
    worker_token_sha256: Option<[u8; 32]>,
    tokens: RwLock<HashMap<String, KnownToken>>,
    /// Tokens that live only as long as this process (the runner inside `tunnel up`).
    ephemeral: RwLock<HashMap<String, KnownToken>>,
    verified: Verified,
}

/// Most tokens remembered as verified: at most this many valid tokens' bytes are held.
const VERIFIED_MAX: usize = 1024;
/// Longer tokens are verified every time (no token this server makes is near it).
const VERIFIED_MAX_LEN: usize = 256;

/// Tokens that verified, each with who holds it, so the next request with the same token
/// skips the SHA-256 (most of what verifying a token costs). Only tokens that verified go in,
/// so an attacker cannot fill it with guesses; at [`VERIFIED_MAX`] it is emptied. Every change
/// of the token table empties it (a revoked token stops working at once), and an entry
/// found is used only if the whole token is equal, compared in constant time: the keyed hash
/// only picks the entry (its key is random per process, so which guesses share a slot with a
/// real token cannot be chosen).
struct Verified {
    hasher: std::hash::RandomState,
    entries: Mutex<VerifiedEntries>,
}

#[derive(Default)]
struct VerifiedEntries {
    /// Bumped by every change of the token table: a verification that started before the
    /// change may not remember what it found.
    generation: u64,
    by_hash: HashMap<u64, (Box<[u8]>, Caller)>,
}

impl Verified {
    fn new() -> Self {
        Verified {
            hasher: std::hash::RandomState::new(),
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VerifiedEntries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who holds `token` if it verified since the last change, and the generation to
    /// remember a new verification under.
    fn get(&self, token: &[u8]) -> (Option<Caller>, u64) {
        let hash = self.hasher.hash_one(token);
        let entries = self.lock();
        let hit = entries
            .by_hash
            .get(&hash)
            .filter(|(known, _)| bool::from(known.ct_eq(token)))
            .map(|(_, caller)| caller.clone());
        (hit, entries.generation)
    }

    fn remember(&self, token: &[u8], caller: &Caller, generation: u64) {
        if token.len() > VERIFIED_MAX_LEN {
            return;
        }
        let hash = self.hasher.hash_one(token);
        let mut entries = self.lock();
        if entries.generation != generation {
            return;
        }
        if entries.by_hash.len() >= VERIFIED_MAX {
            entries.by_hash.clear();
        }
        entries.by_hash.insert(hash, (token.into(), caller.clone()));
    }

    /// The token table changed: nothing verified before counts.
    fn forget(&self) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.by_hash = HashMap::new();
    }
}

/// Why a configured `WORKER_TOKEN` is refused.
pub fn check_worker_token(token: &str) -> Result<(), String> {
    const KNOWN_DEFAULTS: [&str; 3] =
        ["change-me-to-a-secure-token", "changeme", "your-token-here"];
    if token.len() < WORKER_TOKEN_MIN_LEN {
        return Err(format!(
            "WORKER_TOKEN is too short ({} characters); use at least {WORKER_TOKEN_MIN_LEN}, e.g. `openssl rand -hex 32`",
            token.len()
        ));
    }
    if KNOWN_DEFAULTS.contains(&token) {
        return Err(
            "WORKER_TOKEN is a published default; generate your own, e.g. `openssl rand -hex 32`"
                .into(),
        );
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("WORKER_TOKEN must not contain whitespace".into());
    }
    let distinct: std::collections::HashSet<char> = token.chars().collect();
    if distinct.len() < 6 {
        return Err("WORKER_TOKEN is too repetitive to be secret".into());
    }
    Ok(())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Authenticator {
    pub(crate) async fn load(
        store: &Store,
        worker_token: Option<&str>,
    ) -> Result<Self, StoreError> {
        let auth = Authenticator {
            worker_token_sha256: worker_token.map(|t| sha256(t.as_bytes())),
            tokens: RwLock::new(HashMap::new()),
            ephemeral: RwLock::new(HashMap::new()),
            verified: Verified::new(),
        };
        auth.reload(store).await?;
        Ok(auth)
    }

    /// Re-reads the token table.
    pub(crate) async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let rows = store.tokens().await?;
        let map = rows
            .into_iter()
            .map(|t| {
                let known = KnownToken {
                    role: t.info.role,
                    secret_sha256: t.secret_sha256,
                    revoked: t.info.revoked_at.is_some(),
                };
                (t.info.id, known)
            })
            .collect();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = map;
        // After the swap: a verification against the old table started before this.
        self.verified.forget();
        Ok(())
    }

    /// Whether a `WORKER_TOKEN` is configured.
    pub(crate) fn has_credentials(&self) -> bool {
        self.worker_token_sha256.is_some()
    }

    /// Who holds this token, if anyone.
    pub(crate) fn verify(&self, presented: &str) -> Option<Caller> {
        let (known, generation) = self.verified.get(presented.as_bytes());
        if known.is_some() {
            return known;
        }
        let caller = self.verify_hashed(presented)?;
        self.verified
            .remember(presented.as_bytes(), &caller, generation);
        Some(caller)
    }

    /// [`Authenticator::verify`] against the table, hashing the token.
    fn verify_hashed(&self, presented: &str) -> Option<Caller> {
        let digest = sha256(presented.as_bytes());
        if let Some(worker) = &self.worker_token_sha256
            && bool::from(worker.ct_eq(&digest))
        {
            return Some(Caller {
                token_id: WORKER_TOKEN_ID.into(),
                role: Role::Admin,
            });
        }
        let (id, secret) = presented.strip_prefix(TOKEN_PREFIX)?.split_once('_')?;
        let check = |known: &KnownToken| {
            let matches: bool = known.secret_sha256.ct_eq(&sha256(secret.as_bytes())).into();
            (matches && !known.revoked).then(|| Caller {
                token_id: id.to_owned(),
                role: known.role,
            })
        };
        if let Some(known) = self
            .tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return check(known);
        }
        self.ephemeral
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(check)
    }

    /// The role of a token that is still valid (not revoked), by id: a dashboard session lives
    /// only as long as the token it was exchanged for.
    pub(crate) fn role_of(&self, token_id: &str) -> Option<Role> {
        if token_id == WORKER_TOKEN_ID {
            return self.worker_token_sha256.map(|_| Role::Admin);
        }
        let live = |k: &KnownToken| (!k.revoked).then_some(k.role);
        if let Some(k) = self
            .tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token_id)
        {
            return live(k);
        }
        self.ephemeral
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token_id)
            .and_then(live)
    }

    /// Creates a token; the secret is returned once and only its hash is kept.
    pub(crate) async fn create(
        &self,
        store: &Store,
        name: String,
        role: Role,
    ) -> Result<CreatedToken, StoreError> {
        let created = mint_token(store, name, role).await?;
        self.reload(store).await?;
        Ok(created)
    }

    /// A token kept in memory only, valid until this process ends.
    pub(crate) fn ephemeral(&self, name: &str, role: Role) -> String {
        let id = format!("{name}{}", tunnel_store::random_hex(3));
        let secret = tunnel_store::random_hex(24);
        let known = KnownToken {
            role,
            secret_sha256: sha256(secret.as_bytes()),
            revoked: false,
        };
        self.ephemeral
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), known);
        self.verified.forget();
        format!("{TOKEN_PREFIX}{id}_{secret}")
    }

    pub(crate) async fn revoke(&self, store: &Store, id: &str) -> Result<TokenInfo, StoreError> {
        let info = store.revoke_token(id).await?;
        self.reload(store).await?;
        Ok(info)
    }
}

/// Creates a token in the store: a public id, a random secret of which only the SHA-256 is
/// kept, and the whole token (`tnl_<id>_<secret>`) returned once. `tunnel init` uses it before
/// any server runs.
pub async fn mint_token(
    store: &Store,
    name: String,
    role: Role,
) -> Result<CreatedToken, StoreError> {
    let id = tunnel_store::random_hex(6);
    let secret = tunnel_store::random_hex(24);
    let info: TokenInfo = store
        .create_token(id.clone(), name, role, sha256(secret.as_bytes()))
        .await?;
    Ok(CreatedToken {
        info,
        token: format!("{TOKEN_PREFIX}{id}_{secret}"),
    })
}

pub(crate) fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <token>` header"))?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
    // Any whitespace after the scheme, as the original accepted (`^Bearer\s+(.+)$`, any case).
    let (scheme, token) = value
        .trim_start()
        .split_once(char::is_whitespace)
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
        })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::unauthorized(
            "the Authorization header must be `Bearer <token>`",
        ));
    }
    Ok(token.trim())
}

pub(crate) fn authorize(
    parts: &Parts,
    state: &AppState,
    allowed: &[Role],
) -> Result<Caller, ApiError> {
    let token = bearer(parts)?;
    let caller = state
        .auth
        .verify(token)
        .ok_or_else(|| ApiError::unauthorized("the token is not valid or has been revoked"))?;
    if caller.role == Role::Admin || allowed.contains(&caller.role) {
        Ok(caller)
    } else {
        let need: Vec<&str> = allowed
            .iter()
            .map(|r| r.as_str())
            .chain(["admin"])
            .collect();
        Err(ApiError::forbidden(format!(
            "this route needs an {} token; this one is a {} token",
            need.join(" or "),
            caller.role
        )))
    }
}

macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, [$($role:expr),*]) => {
        $(#[$doc])*
        pub(crate) struct $name(pub Caller);

        impl FromRequestParts<AppState> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
                authorize(parts, state, &[$($role),*]).map($name)
            }
        }
    };
}

role_extractor!(
    /// A client (or admin) token: submit and read tasks.
    ClientAuth,
    [Role::Client]
);
role_extractor!(
    /// A runner (or admin) token: claim and run tasks.
    RunnerAuth,
    [Role::Runner]
);
role_extractor!(
    /// An admin token: manage tokens.
    AdminAuth,
    []
);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::RwLock;

    use tunnel_protocol::Role;

    use super::{
        Authenticator, KnownToken, TOKEN_PREFIX, VERIFIED_MAX, Verified, check_worker_token, sha256,
    };

    const WORKER: &str = "3f9c1d7e8a2b4c6d0e1f-worker";
    const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";

    fn known(secret: &str, revoked: bool) -> KnownToken {
        KnownToken {
            role: Role::Runner,
            secret_sha256: sha256(secret.as_bytes()),
            revoked,
        }
    }

    fn authenticator() -> Authenticator {
        let mut tokens = HashMap::new();
        tokens.insert("a1b2c3".to_owned(), known(SECRET, false));
        Authenticator {
            worker_token_sha256: Some(sha256(WORKER.as_bytes())),
            tokens: RwLock::new(tokens),
            ephemeral: RwLock::new(HashMap::new()),
            verified: Verified::new(),
        }
    }

    fn remembered(auth: &Authenticator) -> usize {
        auth.verified.lock().by_hash.len()
    }

    /// What `reload` does with a new table, without a store.
    fn replace_tokens(auth: &Authenticator, tokens: HashMap<String, KnownToken>) {
        *auth.tokens.write().unwrap() = tokens;
        auth.verified.forget();
    }

    #[test]
    fn a_verified_token_is_remembered_and_only_the_same_bytes_match() {
        let auth = authenticator();
        let token = format!("{TOKEN_PREFIX}a1b2c3_{SECRET}");
        let caller = auth.verify(&token).expect("valid");
        assert_eq!(
            (caller.token_id.as_str(), caller.role),
            ("a1b2c3", Role::Runner)
        );
        assert_eq!(remembered(&auth), 1);
        // Served from memory now, the same answer.
        let again = auth.verify(&token).expect("still valid");
        assert_eq!(
            (again.token_id.as_str(), again.role),
            ("a1b2c3", Role::Runner)
        );
        // One byte off, shorter, longer: refused and never remembered.
        let mut wrong = token.clone().into_bytes();
        *wrong.last_mut().unwrap() ^= 1;
        for bad in [
            String::from_utf8(wrong).unwrap(),
            token[..token.len() - 1].to_owned(),
            format!("{token}0"),
        ] {
            assert!(auth.verify(&bad).is_none(), "{bad}");
        }
        assert_eq!(remembered(&auth), 1);
        let worker = auth.verify(WORKER).expect("worker token");
        assert_eq!(worker.role, Role::Admin);
        assert_eq!(remembered(&auth), 2);
    }

    #[test]
    fn a_change_of_the_token_table_forgets_every_verified_token() {
        let auth = authenticator();
        let token = format!("{TOKEN_PREFIX}a1b2c3_{SECRET}");
        assert!(auth.verify(&token).is_some());
        // Revoked: refused at once although it was remembered.
        let mut tokens = HashMap::new();
        tokens.insert("a1b2c3".to_owned(), known(SECRET, true));
        replace_tokens(&auth, tokens);
        assert_eq!(remembered(&auth), 0);
        assert!(auth.verify(&token).is_none());
        // An ephemeral token made meanwhile forgets too.
        assert!(auth.verify(WORKER).is_some());
        let local = auth.ephemeral("local", Role::Runner);
        assert_eq!(remembered(&auth), 0);
        assert!(auth.verify(&local).is_some());
    }

    #[test]
    fn a_verification_that_started_before_a_change_is_not_remembered() {
        let auth = authenticator();
        let token = format!("{TOKEN_PREFIX}a1b2c3_{SECRET}");
        // As `verify` does, with the table changed between the lookup and the remembering.
        let (hit, generation) = auth.verified.get(token.as_bytes());
        assert!(hit.is_none());
        let caller = auth.verify_hashed(&token).expect("valid before the change");
        replace_tokens(&auth, HashMap::new());
        auth.verified
            .remember(token.as_bytes(), &caller, generation);
        assert_eq!(remembered(&auth), 0);
        assert!(auth.verify(&token).is_none());
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let auth = authenticator();
        let mut tokens = HashMap::new();
        for i in 0..VERIFIED_MAX + 10 {
            tokens.insert(format!("t{i}"), known(SECRET, false));
        }
        replace_tokens(&auth, tokens);
        for i in 0..VERIFIED_MAX + 10 {
            assert!(
                auth.verify(&format!("{TOKEN_PREFIX}t{i}_{SECRET}"))
                    .is_some()
            );
            assert!(remembered(&auth) <= VERIFIED_MAX);
        }
        // Too long to remember: verified each time.
        let long = format!("{}{}", WORKER, "x".repeat(300));
        assert!(auth.verify(&long).is_none());
        assert!(auth.verify(WORKER).is_some());
    }

    #[test]
    fn weak_worker_tokens_are_refused() {
        assert!(check_worker_token("short").is_err());
        assert!(check_worker_token("change-me-to-a-secure-token").is_err());
        assert!(check_worker_token("aaaaaaaaaaaaaaaaaaaa").is_err());
        assert!(check_worker_token("has space in it 12345").is_err());
        assert!(check_worker_token("3f9c1d7e8a2b4c6d0e1f").is_ok());
    }
}

/// Token comparison time must not depend on how much of the secret a guess gets right. Not a
/// pass/fail test (timing on a shared machine is noise): it prints figures for
/// docs/RELIABILITY.md. Run optimized: `scripts/token-timing`.
#[cfg(test)]
mod timing {
    use std::collections::HashMap;
    use std::hint::black_box;
    use std::sync::RwLock;
    use std::time::Instant;

    use subtle::ConstantTimeEq;
    use tunnel_protocol::Role;

    use super::{Authenticator, KnownToken, TOKEN_PREFIX, Verified, sha256};

    const SECRET: &str = "3f9c1d7e8a2b4c6d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f7";

    /// Runs the two cases alternately, `rounds` times `per_round` calls each (so changes in the
    /// machine's load hit both), and gives each one's median nanoseconds per call.
    fn compare(
        rounds: usize,
        per_round: usize,
        mut a: impl FnMut(),
        mut b: impl FnMut(),
    ) -> (f64, f64) {
        let time = |f: &mut dyn FnMut()| {
            let start = Instant::now();
            for _ in 0..per_round {
                f();
            }
            start.elapsed().as_nanos() as f64 / per_round as f64
        };
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            xs.push(time(&mut a));
            ys.push(time(&mut b));
        }
        xs.sort_by(f64::total_cmp);
        ys.sort_by(f64::total_cmp);
        (xs[rounds / 2], ys[rounds / 2])
    }

    fn report(what: &str, (a, b): (f64, f64)) {
        println!(
            "{what}: prefix of 0 right {a:.2} ns, all but the last right {b:.2} ns \
             (difference {:+.2} ns, {:+.2} %)",
            b - a,
            (b - a) / a * 100.0
        );
    }

    /// A guess whose first character is wrong, and one whose last only is wrong.
    fn guesses(secret: &str) -> (String, String) {
        let flip = |c: u8| if c == b'0' { "1" } else { "0" };
        let b = secret.as_bytes();
        let none = format!("{}{}", flip(b[0]), &secret[1..]);
        let most = format!("{}{}", &secret[..b.len() - 1], flip(b[b.len() - 1]));
        (none, most)
    }

    #[test]
    #[ignore = "prints timing figures; run by scripts/token-timing"]
    fn token_timing() {
        let mut tokens = HashMap::new();
        tokens.insert(
            "a1b2c3d4e5f6".to_owned(),
            KnownToken {
                role: Role::Client,
                secret_sha256: sha256(SECRET.as_bytes()),
                revoked: false,
            },
        );
        let auth = Authenticator {
            worker_token_sha256: Some(sha256(SECRET.as_bytes())),
            tokens: RwLock::new(tokens),
            ephemeral: RwLock::new(HashMap::new()),
            verified: Verified::new(),
        };
        let rounds = 301;
        let (none, most) = guesses(SECRET);
        let token = |s: &str| format!("{TOKEN_PREFIX}a1b2c3d4e5f6_{s}");
        let (t_none, t_most) = (token(&none), token(&most));
        assert!(auth.verify(&token(SECRET)).is_some());
        report(
            "verify, tnl_ token with a wrong secret",
            compare(
                rounds,
                20_000,
                || assert!(black_box(&auth).verify(black_box(&t_none)).is_none()),
                || assert!(black_box(&auth).verify(black_box(&t_most)).is_none()),
            ),
        );
        report(
            "verify, wrong WORKER_TOKEN",
            compare(
                rounds,
                20_000,
                || assert!(black_box(&auth).verify(black_box(&none)).is_none()),
                || assert!(black_box(&auth).verify(black_box(&most)).is_none()),
            ),
        );
        // The comparison alone: 32-byte digests with 0 or 31 leading bytes equal.
        let d = sha256(b"x");
        let (mut d0, mut d31) = (d, d);
        d0[0] ^= 1;
        d31[31] ^= 1;
        report(
            "ct_eq of two SHA-256 digests (bytes)",
            compare(
                rounds,
                200_000,
                || assert!(!bool::from(black_box(&d).ct_eq(black_box(&d0)))),
                || assert!(!bool::from(black_box(&d).ct_eq(black_box(&d31)))),
            ),
        );
        // Control: a plain `==` does depend on the prefix, and this measurement sees it.
        let big = vec![7u8; 64 << 10];
        let mut big0 = big.clone();
        big0[0] = 8;
        let mut big_last = big.clone();
        *big_last.last_mut().unwrap() = 8;
        report(
            "control: `==` on 64 KiB (bytes)",
            compare(
                rounds,
                1_000,
                || assert!(black_box(&big) != black_box(&big0)),
                || assert!(black_box(&big) != black_box(&big_last)),
            ),
        );
    }
}
