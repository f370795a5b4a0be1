//! Upstream authentication: `WWW-Authenticate` challenges, bearer tokens from a realm, Basic.
//!
//! Registries answer `401` with a challenge. For `Bearer` we ask the realm for a token for the
//! repository's pull scope (anonymously, or with the configured credentials) and cache it per scope
//! until it expires; for `Basic` we send the configured credentials.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderValue;

use crate::config::Secret;

/// Tokens are dropped this long (at most a quarter of their lifetime) before the realm says they
/// expire, so a request never races the expiry on its way upstream.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The token spec's lifetime when the realm names none.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

impl Challenge {
    /// Parses the first `Bearer` or `Basic` challenge found in `WWW-Authenticate` values.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Option<Self> {
        values
            .into_iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(Self::parse_one)
    }

    fn parse_one(value: &str) -> Option<Self> {
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// `key="quoted, value",key2=token` → map, with lowercase keys and `\` escapes undone.
fn parse_params(input: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    params
}

/// A username and password (or token) for an upstream or its token realm.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    pub fn basic_header(&self) -> HeaderValue {
        let raw = format!("{}:{}", self.username, self.password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

/// The body a token realm answers with; registries use either field name.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The `Authorization` value and how long it may be used.
    pub fn into_authorization(self) -> Option<(HeaderValue, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        let lifetime = self
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        Some((value, lifetime))
    }
}

/// `Authorization` values per scope, each until it expires.
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<HeaderValue> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(scope) {
            Some((value, expires)) if Instant::now() < *expires => Some(value.clone()),
            Some(_) => {
                entries.remove(scope);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, scope: &str, value: HeaderValue, lifetime: Duration) {
        let expires = Instant::now() + lifetime - EXPIRY_MARGIN.min(lifetime / 4);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Expired entries are dropped on insert so the map stays as small as the live scopes.
        let now = Instant::now();
        entries.retain(|_, (_, expires)| *expires > now);
        entries.insert(scope.to_owned(), (value, expires));
    }

    pub fn remove(&self, scope: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(scope);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let value = HeaderValue::from_static(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(
            Challenge::parse([&value]),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:samalba/my-app:pull,push".into()),
            })
        );
    }

    #[test]
    fn parses_unquoted_escaped_and_basic() {
        let value = HeaderValue::from_static(
            r#"bearer realm=https://r/t, service="a\"b",error="insufficient_scope""#,
        );
        let Some(Challenge::Bearer {
            realm,
            service,
            scope,
        }) = Challenge::parse([&value])
        else {
            panic!("not parsed");
        };
        assert_eq!(
            (realm.as_str(), service.as_deref(), scope),
            ("https://r/t", Some("a\"b"), None)
        );
        let basic = HeaderValue::from_static(
            r#"Basic realm="https://123.dkr.ecr.us-east-1.amazonaws.com/""#,
        );
        assert_eq!(Challenge::parse([&basic]), Some(Challenge::Basic));
        assert_eq!(
            Challenge::parse([&HeaderValue::from_static("Negotiate")]),
            None
        );
        assert_eq!(
            Challenge::parse([&HeaderValue::from_static("Bearer service=x")]),
            None
        );
    }

    #[test]
    fn tokens_take_either_field_and_a_default_lifetime() {
        let parsed: TokenResponse =
            serde_json::from_str(r#"{"access_token":"abc","expires_in":5}"#).unwrap();
        let (value, lifetime) = parsed.into_authorization().unwrap();
        assert_eq!(value, "Bearer abc");
        assert_eq!(lifetime, Duration::from_secs(5));
        let parsed: TokenResponse = serde_json::from_str(r#"{"token":"abc"}"#).unwrap();
        assert_eq!(
            parsed.into_authorization().unwrap().1,
            Duration::from_secs(60)
        );
        let empty: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(empty.into_authorization().is_none());
    }

    #[test]
    fn cache_forgets_expired_tokens() {
        let cache = TokenCache::default();
        cache.insert(
            "a",
            HeaderValue::from_static("Bearer a"),
            Duration::from_secs(300),
        );
        cache.insert("b", HeaderValue::from_static("Bearer b"), Duration::ZERO);
        assert!(cache.get("a").is_some());
        assert!(
            cache.get("b").is_none(),
            "an expired token is not handed out"
        );
    }
}
