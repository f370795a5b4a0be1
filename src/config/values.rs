//! Scalar config values that users write by hand: `_env:NAME[:default]` substitution, durations
//! (`10m`, `1h30m`, or plain seconds), byte sizes (`50GiB`), URLs and secrets.
//!
//! Each type parses inside its `Deserialize` impl, so a bad value is reported by serde_yaml with
//! the key's path and the line it stands on.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Resolves `_env:NAME` and `_env:NAME:default`; any other string is returned as written.
pub fn substitute_env(raw: &str) -> Result<String, String> {
    let Some(spec) = raw.strip_prefix("_env:") else {
        return Ok(raw.to_owned());
    };
    let (name, default) = match spec.split_once(':') {
        Some((name, default)) => (name, Some(default)),
        None => (spec, None),
    };
    if name.is_empty() {
        return Err(
            "`_env:` needs a variable name, as in `_env:NAME` or `_env:NAME:default`".into(),
        );
    }
    match (std::env::var(name), default) {
        (Ok(value), _) => Ok(value),
        (Err(_), Some(default)) => Ok(default.to_owned()),
        (Err(_), None) => Err(format!(
            "environment variable {name} is not set and no default is given"
        )),
    }
}

/// A scalar that may be written as a string (with `_env:` substitution) or as a number.
enum Scalar {
    Text(String),
    Number(u64),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a non-negative number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                substitute_env(v).map(Scalar::Text).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                u64::try_from(v)
                    .map(Scalar::Number)
                    .map_err(|_| E::custom("must not be negative"))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Scalar::Text(text) => text,
            Scalar::Number(n) => n.to_string(),
        }
    }
}

/// A plain string with `_env:` substitution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Text(Scalar::deserialize(deserializer)?.into_text()))
    }
}

/// A credential: substituted like [`Text`], never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Secret(Text::deserialize(deserializer)?.0))
    }
}

/// A duration: `90s`, `10m`, `1h30m`, `7d`, `250ms`, or a plain number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl Seconds {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(secs) = text.parse::<u64>() {
            return Ok(Seconds(Duration::from_secs(secs)));
        }
        let bad = || {
            format!("`{text}` is not a duration: write e.g. `90s`, `10m`, `1h30m`, `7d` or plain seconds")
        };
        let mut total = Duration::ZERO;
        let mut rest = text;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let amount: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(1),
                "s" => Duration::from_secs(1),
                "m" => Duration::from_secs(60),
                "h" => Duration::from_secs(3600),
                "d" => Duration::from_secs(86_400),
                _ => return Err(bad()),
            };
            let amount = u32::try_from(amount).map_err(|_| bad())?;
            total = total
                .checked_add(unit.checked_mul(amount).ok_or_else(bad)?)
                .ok_or_else(bad)?;
            rest = &rest[unit_len..];
        }
        Ok(Seconds(total))
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let secs = d.as_secs();
        match secs {
            0 => f.write_str("0s"),
            s if s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
            s if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            s if s % 60 == 0 => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Scalar::deserialize(deserializer)? {
            Scalar::Number(secs) => Ok(Seconds(Duration::from_secs(secs))),
            Scalar::Text(text) => Seconds::parse(&text).map_err(de::Error::custom),
        }
    }
}

/// A byte count: `50GiB`, `512MiB`, `10GB`, `4096`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || {
            format!("`{text}` is not a size: write e.g. `50GiB`, `512MiB`, `10GB` or plain bytes")
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        if split == 0 {
            return Err(bad());
        }
        let amount: u64 = text[..split].parse().map_err(|_| bad())?;
        let unit: u64 = match text[split..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        amount.checked_mul(unit).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, size) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Scalar::deserialize(deserializer)? {
            Scalar::Number(bytes) => Ok(ByteSize(bytes)),
            Scalar::Text(text) => ByteSize::parse(&text).map_err(de::Error::custom),
        }
    }
}

/// An `http://` or `https://` base URL with a host and no path, query or credentials, such as
/// `https://registry-1.docker.io`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl(pub http::Uri);

impl BaseUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: http::Uri = text
            .trim_end_matches('/')
            .parse()
            .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("`{text}` must start with http:// or https://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{text}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{text}` must not carry credentials: use username/password"
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!("`{text}` must not have a path or query"));
        }
        Ok(BaseUrl(uri))
    }

    pub fn is_https(&self) -> bool {
        self.0.scheme_str() == Some("https")
    }

    /// `host[:port]` as it appears in the URL.
    pub fn authority(&self) -> &str {
        self.0.authority().map(|a| a.as_str()).unwrap_or_default()
    }

    pub fn host(&self) -> &str {
        self.0.host().unwrap_or_default()
    }

    /// `scheme://authority` with no trailing slash.
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            self.0.scheme_str().unwrap_or("https"),
            self.authority()
        )
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.origin())
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BaseUrl::parse(&Text::deserialize(deserializer)?.0).map_err(de::Error::custom)
    }
}

/// A socket address such as `0.0.0.0:5000` or `[::1]:5000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub std::net::SocketAddr);

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Text::deserialize(deserializer)?.0;
        text.parse().map(ListenAddr).map_err(|_| {
            de::Error::custom(format!(
                "`{text}` is not an address: write e.g. `0.0.0.0:5000`"
            ))
        })
    }
}

/// An address range in CIDR form (`10.20.0.0/16`, `fd00::/8`, or one address): an internal network
/// an operator lets `allow_any_registry` reach on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    /// The first address of the range (host bits cleared).
    pub base: std::net::IpAddr,
    pub prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Result<Self, String> {
        let invalid =
            || format!("`{text}` is not a network: write e.g. `10.20.0.0/16` or `fd00::/8`");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: std::net::IpAddr = address.trim().parse().map_err(|_| invalid())?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(invalid)?,
            None => bits,
        };
        Ok(Self {
            base: mask(address, prefix),
            prefix,
        })
    }

    pub fn contains(&self, address: std::net::IpAddr) -> bool {
        address.is_ipv4() == self.base.is_ipv4() && mask(address, self.prefix) == self.base
    }
}

/// `address` with all but its first `prefix` bits cleared.
fn mask(address: std::net::IpAddr, prefix: u8) -> std::net::IpAddr {
    use std::net::IpAddr;
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((bits & kept).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((bits & kept).into())
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Network::parse(&Text::deserialize(deserializer)?.0).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let private = Network::parse("10.20.30.40/16").unwrap();
        assert_eq!(private.to_string(), "10.20.0.0/16");
        assert!(private.contains("10.20.255.1".parse().unwrap()));
        assert!(!private.contains("10.21.0.1".parse().unwrap()));
        assert!(!private.contains("::ffff:10.20.0.1".parse().unwrap()));
        let one = Network::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Network::parse("fd00::/8")
            .unwrap()
            .contains("fdab::1".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "host/8",
            "",
            "10.0.0.0/x",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            Seconds::parse("864000").unwrap().0,
            Duration::from_secs(864_000)
        );
        assert_eq!(Seconds::parse("10m").unwrap().0, Duration::from_secs(600));
        assert_eq!(
            Seconds::parse("1h30m").unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            Seconds::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(Seconds::parse("7d").unwrap().to_string(), "7d");
        for bad in ["", "m", "10x", "-5s", "1.5h", "h10"] {
            assert!(Seconds::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("50GiB").unwrap().0, 50 << 30);
        assert_eq!(ByteSize::parse("10GB").unwrap().0, 10_000_000_000);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert_eq!(ByteSize(50 << 30).to_string(), "50GiB");
        for bad in ["", "GiB", "5 XB", "-1", "99999999999TiB"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_substitution() {
        std::env::set_var("GANTRY_TEST_VALUES_SET", "from-env");
        assert_eq!(
            substitute_env("_env:GANTRY_TEST_VALUES_SET").unwrap(),
            "from-env"
        );
        assert_eq!(
            substitute_env("_env:GANTRY_TEST_VALUES_SET:fallback").unwrap(),
            "from-env"
        );
        assert_eq!(
            substitute_env("_env:GANTRY_TEST_VALUES_UNSET:fallback").unwrap(),
            "fallback"
        );
        assert_eq!(
            substitute_env("_env:GANTRY_TEST_VALUES_UNSET:").unwrap(),
            ""
        );
        assert!(substitute_env("_env:GANTRY_TEST_VALUES_UNSET").is_err());
        assert_eq!(substitute_env("plain").unwrap(), "plain");
    }

    #[test]
    fn urls() {
        assert_eq!(
            BaseUrl::parse("https://registry-1.docker.io/")
                .unwrap()
                .authority(),
            "registry-1.docker.io"
        );
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("https://u:p@x").is_err());
        assert!(BaseUrl::parse("https://x/path").is_err());
        assert!(BaseUrl::parse("registry-1.docker.io").is_err());
    }
}

/// `rate_limit_reserve`: the part of an upstream's announced rate limit kept for tags nobody has
/// cached, as a number of requests (`5`) or a share of the limit (`10%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    Requests(u64),
    Percent(u8),
}

impl Reserve {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || {
            format!("`{text}` is not a reserve: write a number of requests (`5`) or a percentage (`10%`)")
        };
        match text.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Self::Percent(p)),
                _ => Err(bad()),
            },
            None => text.parse().map(Self::Requests).map_err(|_| bad()),
        }
    }

    /// The reserve in requests for an announced `limit` (a share rounds up: 10% of 5 keeps 1).
    pub fn of(self, limit: u64) -> u64 {
        match self {
            Self::Requests(n) => n,
            Self::Percent(p) => (limit * u64::from(p)).div_ceil(100),
        }
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Self::Percent(10)
    }
}

impl fmt::Display for Reserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Requests(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Reserve {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reserve {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Scalar::deserialize(deserializer)? {
            Scalar::Number(n) => Ok(Self::Requests(n)),
            Scalar::Text(text) => Self::parse(&text).map_err(de::Error::custom),
        }
    }
}
