//! Client authentication (htpasswd, bcrypt) and per-repository pull rules.
//!
//! A mirror holding credentials to private upstreams is a door into them: who may pull what is
//! decided here, once per request, against `<registry>/<repository>` names. bcrypt is slow by
//! design, so a successful check is remembered for a few minutes (keyed by a hash of the password,
//! never the password itself).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use sha2::{Digest as _, Sha256};

use crate::config::ClientAuth;

/// How long a verified user/password pair is trusted without running bcrypt again.
const VERIFIED_FOR: Duration = Duration::from_secs(300);
const MAX_VERIFIED: usize = 10_000;
/// The user name rules use for requests without credentials.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("auth.htpasswd: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.htpasswd: {path} line {line}: {reason}")]
    Entry {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Who a request is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(String),
    /// Credentials were sent and are wrong.
    Rejected,
}

/// What the rules say about one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Credentials are needed (401 with a challenge).
    Authenticate,
    /// A known user without access (403 DENIED).
    Deny,
}

struct Rule {
    repositories: Vec<String>,
    users: Vec<String>,
}

pub struct Access {
    htpasswd: PathBuf,
    /// User → bcrypt hash; replaced whole by [`Access::reload`].
    users: RwLock<HashMap<String, String>>,
    realm: String,
    anonymous_pull: bool,
    rules: Vec<Rule>,
    verified: Mutex<HashMap<(String, [u8; 32]), Instant>>,
}

impl Access {
    pub fn load(config: &ClientAuth) -> Result<Self, AccessError> {
        Ok(Self {
            users: RwLock::new(read_htpasswd(&config.htpasswd)?),
            htpasswd: config.htpasswd.clone(),
            realm: config.realm.0.clone(),
            anonymous_pull: config.anonymous_pull,
            rules: config
                .rules
                .iter()
                .map(|rule| Rule {
                    repositories: rule.repositories.iter().map(|r| r.0.clone()).collect(),
                    users: rule.users.iter().map(|u| u.0.clone()).collect(),
                })
                .collect(),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Reads the htpasswd file again (SIGHUP). On success it replaces every user and forgets
    /// remembered password checks, so a removed user or changed password takes effect at once;
    /// on error the current users stay. Returns how many users there are now.
    pub fn reload(&self) -> Result<usize, AccessError> {
        let users = read_htpasswd(&self.htpasswd)?;
        let count = users.len();
        *self.users.write().unwrap_or_else(|e| e.into_inner()) = users;
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(count)
    }

    /// The user's bcrypt hash in the htpasswd file as last loaded.
    fn hash_of(&self, user: &str) -> Option<String> {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .cloned()
    }

    /// `WWW-Authenticate` for a 401: Basic, which docker login, containerd and podman all speak.
    pub fn challenge(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("Basic realm=\"{}\"", self.realm.replace('"', "")))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic realm=\"gantry\""))
    }

    /// Checks the request's Basic credentials (bcrypt runs on the blocking pool).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Identity {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Identity::Anonymous;
        };
        let Some((user, password)) = basic_credentials(value) else {
            return Identity::Rejected;
        };
        let Some(hash) = self.hash_of(&user) else {
            return Identity::Rejected;
        };
        let key = (user.clone(), Sha256::digest(password.as_bytes()).into());
        {
            let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified
                .get(&key)
                .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
            {
                return Identity::User(user);
            }
        }
        let checked_hash = hash.clone();
        let matches =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !matches {
            return Identity::Rejected;
        }
        // A reload during the check may have removed the user or changed the password: the
        // answer stands for this request, but is only remembered if the hash is still current.
        if self.hash_of(&user).as_ref() != Some(&checked_hash) {
            return Identity::User(user);
        }
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(key, Instant::now());
        Identity::User(user)
    }

    /// `GET /v2/` without valid credentials is always challenged, even with `anonymous_pull`:
    /// clients learn the auth scheme from this ping and send credentials only after a challenge
    /// (an anonymous client carries on without them, and the pull rules decide per repository).
    pub fn may_enter(&self, identity: &Identity) -> Decision {
        match identity {
            Identity::User(_) => Decision::Allow,
            _ => Decision::Authenticate,
        }
    }

    /// May this identity pull `qualified` (`<registry>/<repository>`)?
    pub fn may_pull(&self, identity: &Identity, qualified: &str) -> Decision {
        let name = match identity {
            Identity::Rejected => return Decision::Authenticate,
            Identity::Anonymous if !self.anonymous_pull => return Decision::Authenticate,
            Identity::Anonymous => ANONYMOUS,
            Identity::User(user) => user.as_str(),
        };
        if self.rules.is_empty() {
            return match identity {
                Identity::User(_) => Decision::Allow,
                _ => Decision::Authenticate,
            };
        }
        let Some(rule) = self.rules.iter().find(|rule| {
            rule.repositories
                .iter()
                .any(|pattern| glob(pattern, qualified))
        }) else {
            return refuse(identity);
        };
        let allowed = rule.users.iter().any(|user| {
            user == name
                || (user == "*" && matches!(identity, Identity::User(_)))
                || glob(user, name)
        });
        if allowed {
            Decision::Allow
        } else {
            refuse(identity)
        }
    }
}

/// Anonymous requests are asked to log in; known users are told no.
fn refuse(identity: &Identity) -> Decision {
    match identity {
        Identity::User(_) => Decision::Deny,
        _ => Decision::Authenticate,
    }
}

/// `user:hash` lines, bcrypt only; blank lines and `#` comments are skipped.
fn read_htpasswd(path: &Path) -> Result<HashMap<String, String>, AccessError> {
    let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut users = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry_error = |reason: &str| AccessError::Entry {
            path: path.to_owned(),
            line: index + 1,
            reason: reason.to_owned(),
        };
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| entry_error("expected user:hash"))?;
        if !hash.starts_with("$2") {
            return Err(entry_error(
                "only bcrypt entries are accepted (htpasswd -B)",
            ));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let encoded = value.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `*` matches within a path component, `**` across components, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn matches(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                (0..=t.len()).any(|i| matches(&p[2..], &t[i..]))
            }
            Some(b'*') => {
                let segment = t.iter().position(|b| *b == b'/').unwrap_or(t.len());
                (0..=segment).any(|i| matches(&p[1..], &t[i..]))
            }
            Some(b'?') => t.first().is_some_and(|c| *c != b'/') && matches(&p[1..], &t[1..]),
            Some(c) => t.first() == Some(c) && matches(&p[1..], &t[1..]),
        }
    }
    // Patterns are short and come from the config; the recursion is bounded by their length.
    pattern.len() <= 256 && matches(pattern.as_bytes(), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccessRule, Text};

    #[test]
    fn globs() {
        assert!(glob("docker.io/library/*", "docker.io/library/alpine"));
        assert!(!glob("docker.io/library/*", "docker.io/library/a/b"));
        assert!(glob("ghcr.io/team/**", "ghcr.io/team/a/b/c"));
        assert!(glob("**", "anything/at/all"));
        assert!(glob("ci-?", "ci-1"));
        assert!(!glob("ci-?", "ci-12"));
        assert!(!glob("docker.io/*", "ghcr.io/x"));
    }

    fn access(rules: Vec<(Vec<&str>, Vec<&str>)>, anonymous_pull: bool) -> Access {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        // bcrypt of "pw" at cost 4, for speed.
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(&path, format!("alice:{hash}\nbob:{hash}\n")).unwrap();
        let config = ClientAuth {
            htpasswd: path,
            realm: Text("gantry".into()),
            anonymous_pull,
            rules: rules
                .into_iter()
                .map(|(repositories, users)| AccessRule {
                    repositories: repositories.into_iter().map(|r| Text(r.into())).collect(),
                    users: users.into_iter().map(|u| Text(u.into())).collect(),
                })
                .collect(),
        };
        Access::load(&config).unwrap()
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        headers
    }

    #[tokio::test]
    async fn authenticates_against_bcrypt_entries() {
        let access = access(vec![], false);
        assert_eq!(
            access.authenticate(&basic("alice", "pw")).await,
            Identity::User("alice".into())
        );
        assert_eq!(
            access.authenticate(&basic("alice", "pw")).await,
            Identity::User("alice".into())
        );
        assert_eq!(
            access.authenticate(&basic("alice", "wrong")).await,
            Identity::Rejected
        );
        assert_eq!(
            access.authenticate(&basic("mallory", "pw")).await,
            Identity::Rejected
        );
        assert_eq!(
            access.authenticate(&HeaderMap::new()).await,
            Identity::Anonymous
        );
    }

    #[test]
    fn rules_decide_in_order() {
        let access = access(
            vec![
                (vec!["docker.io/library/*"], vec!["*", "anonymous"]),
                (vec!["ghcr.io/private/**"], vec!["alice"]),
            ],
            true,
        );
        let alice = Identity::User("alice".into());
        let bob = Identity::User("bob".into());
        assert_eq!(
            access.may_pull(&Identity::Anonymous, "docker.io/library/alpine"),
            Decision::Allow
        );
        assert_eq!(
            access.may_pull(&bob, "docker.io/library/alpine"),
            Decision::Allow
        );
        assert_eq!(
            access.may_pull(&alice, "ghcr.io/private/x/y"),
            Decision::Allow
        );
        assert_eq!(access.may_pull(&bob, "ghcr.io/private/x/y"), Decision::Deny);
        assert_eq!(
            access.may_pull(&Identity::Anonymous, "ghcr.io/private/x"),
            Decision::Authenticate
        );
        assert_eq!(
            access.may_pull(&alice, "quay.io/unlisted"),
            Decision::Deny,
            "no rule matches: denied"
        );
        assert_eq!(
            access.may_pull(&Identity::Rejected, "docker.io/library/alpine"),
            Decision::Authenticate
        );
    }

    #[test]
    fn without_rules_any_user_may_pull() {
        let access = access(vec![], false);
        assert_eq!(
            access.may_pull(&Identity::User("bob".into()), "x/y"),
            Decision::Allow
        );
        assert_eq!(
            access.may_pull(&Identity::Anonymous, "x/y"),
            Decision::Authenticate
        );
        assert_eq!(
            access.may_enter(&Identity::Anonymous),
            Decision::Authenticate
        );
    }
}
