//! `storage.s3`: the object tier, a second blob tier on S3-compatible object storage below the
//! local disk (see [`crate::store::object`]). Parsed like every section (unknown keys refused,
//! `_env:` substitution, secrets redacted when printed); what can only be learnt by asking the
//! server (a missing bucket, refused credentials) is checked at start-up by
//! [`ObjectTier::connect`](crate::store::object::ObjectTier::connect).

use serde::{Deserialize, Serialize};

use super::values::{BaseUrl, ByteSize, Secret, Text};

/// Concurrent uploads when `max_uploads` is not given: enough to keep up with a pull of a few
/// large layers, few enough that uploads never compete with clients for the disk or the uplink.
pub const DEFAULT_MAX_UPLOADS: usize = 4;
/// More concurrent uploads than this buys nothing but memory (each holds up to two parts).
const MOST_UPLOADS: usize = 64;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectTierConfig {
    /// The S3 API's base URL, e.g. `http://127.0.0.1:3900`; absent: AWS's own endpoint for
    /// `region`. Requests are path-style (`endpoint/bucket/key`) when an endpoint is given.
    #[serde(default)]
    pub endpoint: Option<BaseUrl>,
    pub bucket: Text,
    #[serde(default = "default_region")]
    pub region: Text,
    /// Put before every key (`{prefix}/blobs/...`), so several gantry fleets or other tenants can
    /// share a bucket.
    #[serde(default = "empty")]
    pub prefix: Text,
    /// Give both or neither; neither uses the AWS default chain (environment, web identity,
    /// instance metadata).
    #[serde(default)]
    pub access_key_id: Option<Text>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Allows a plain `http://` endpoint, like `insecure:` for upstreams.
    #[serde(default)]
    pub allow_http: bool,
    /// A size budget for `blobs/` that gantry enforces by deleting the oldest-uploaded blobs;
    /// absent: no budget (the bucket's own lifecycle rules apply).
    #[serde(default)]
    pub max_size: Option<ByteSize>,
    /// Blob uploads at once.
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
}

fn default_region() -> Text {
    Text("us-east-1".into())
}

fn empty() -> Text {
    Text(String::new())
}

fn default_max_uploads() -> usize {
    DEFAULT_MAX_UPLOADS
}

impl ObjectTierConfig {
    /// The key prefix without its slashes (`""` for none).
    pub fn key_prefix(&self) -> &str {
        self.prefix.0.trim_matches('/')
    }

    /// Adds every problem with the section to `problems`, each naming its key.
    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        const KEY: &str = "storage.s3";
        let bucket = &self.bucket.0;
        // S3's bucket naming rules, which every compatible server shares.
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !valid_bucket {
            problems.push(format!(
                "{KEY}.bucket: `{bucket}` is not a bucket name (3 to 63 lowercase letters, digits, dots and hyphens)"
            ));
        }
        if self.region.0.trim().is_empty() {
            problems.push(format!("{KEY}.region: must not be empty"));
        }
        let prefix = self.key_prefix();
        if !prefix.is_empty() && object_store::path::Path::parse(prefix).is_err() {
            problems.push(format!(
                "{KEY}.prefix: `{}` is not a key prefix (path segments separated by `/`, no `.` or `..` segments)",
                self.prefix.0
            ));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            problems.push(format!(
                "{KEY}.access_key_id, {KEY}.secret_access_key: give both or neither"
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            if !endpoint.is_https() && !self.allow_http {
                problems.push(format!(
                    "{KEY}.allow_http: the endpoint `{}` is plain http: set `allow_http: true` to allow it",
                    endpoint.origin()
                ));
            }
        }
        if self.max_size.is_some_and(|size| size.0 == 0) {
            problems.push(format!(
                "{KEY}.max_size: must be more than 0 (leave it out for no budget)"
            ));
        }
        if !(1..=MOST_UPLOADS).contains(&self.max_uploads) {
            problems.push(format!(
                "{KEY}.max_uploads: must be between 1 and {MOST_UPLOADS}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{ByteSize, Config};

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_yaml(text, Path::new("test.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_contract_parses() {
        std::env::set_var("GANTRY_OBJECT_TIER_TEST_KEY", "GK123");
        std::env::set_var("GANTRY_OBJECT_TIER_TEST_SECRET", "hush");
        let config = parse(
            r#"
storage:
  path: /var/lib/gantry
  max_size: 20GiB
  s3:
    endpoint: http://127.0.0.1:3900
    bucket: gantry
    region: us-east-1
    prefix: ""
    access_key_id: _env:GANTRY_OBJECT_TIER_TEST_KEY
    secret_access_key: _env:GANTRY_OBJECT_TIER_TEST_SECRET
    allow_http: true
    max_size: 500GiB
    max_uploads: 4
"#,
        )
        .unwrap();
        let s3 = config.storage.s3.as_ref().unwrap();
        assert_eq!(
            s3.endpoint.as_ref().unwrap().origin(),
            "http://127.0.0.1:3900"
        );
        assert_eq!(s3.bucket.0, "gantry");
        assert_eq!(s3.access_key_id.as_ref().unwrap().0, "GK123");
        assert_eq!(s3.secret_access_key.as_ref().unwrap().expose(), "hush");
        assert_eq!(s3.max_size, Some(ByteSize(500 << 30)));
        assert_eq!(s3.key_prefix(), "");
        let printed = config.to_redacted_yaml();
        assert!(!printed.contains("hush"), "{printed}");

        let minimal = parse("storage:\n  s3:\n    bucket: gantry\n").unwrap();
        let s3 = minimal.storage.s3.unwrap();
        assert_eq!(s3.region.0, "us-east-1");
        assert_eq!(s3.max_uploads, super::DEFAULT_MAX_UPLOADS);
        assert!(s3.endpoint.is_none() && s3.max_size.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let err =
            parse("storage:\n  s3:\n    bucket: gantry\n    endpoint: http://127.0.0.1:3900\n")
                .unwrap_err();
        assert!(err.contains("storage.s3.allow_http"), "{err}");
        let err = parse("storage:\n  s3:\n    bucket: Not_A_Bucket\n").unwrap_err();
        assert!(err.contains("storage.s3.bucket"), "{err}");
        let err = parse("storage:\n  s3:\n    bucket: gantry\n    access_key_id: k\n").unwrap_err();
        assert!(err.contains("storage.s3.access_key_id"), "{err}");
        let err = parse("storage:\n  s3:\n    bucket: gantry\n    max_uploads: 0\n").unwrap_err();
        assert!(err.contains("storage.s3.max_uploads"), "{err}");
        let err = parse("storage:\n  s3:\n    bucket: gantry\n    max_size: 0\n").unwrap_err();
        assert!(err.contains("storage.s3.max_size"), "{err}");
        let err = parse("storage:\n  s3:\n    bucket: gantry\n    prefix: a/../b\n").unwrap_err();
        assert!(err.contains("storage.s3.prefix"), "{err}");
        let err = parse("storage:\n  s3:\n    bucket: gantry\n    bukket: x\n").unwrap_err();
        assert!(err.contains("bukket") && err.contains("line 4"), "{err}");
        let err = parse("storage:\n  s3:\n    region: x\n").unwrap_err();
        assert!(err.contains("bucket"), "{err}");
    }
}
